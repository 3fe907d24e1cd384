//! The node's HTTP front (hyper, on its own tokio threads, outside the GIL).
//!
//! Why: on the leader, aiohttp's per-request work on the Python event loop was the largest
//! share of a write's CPU (~80 µs of ~140 µs per write at 64 clients, scripts/bench-cluster):
//! parsing, routing, response writing and the socket calls, all holding the GIL the Raft
//! thread needs. Here the key-value hot path — `PUT` and `GET /v1/kv/{key}` in their plain
//! forms — is parsed in Rust and handed to Python in batches (`Front::take`), one wake-up
//! per batch; Python answers each with a status and a JSON body (`Front::respond`). Every
//! other request, and any hot-path request in a form this module does not recognise
//! (percent-escapes, dot segments, query parameters other than `consistency`, headers that
//! are not text, chunked bodies, `Expect`), is proxied unchanged to the node's aiohttp app on
//! a Unix socket in a directory only the node's user can enter (no second network listener:
//! with TLS, nothing reaches the app without passing the front's handshake). Classification only ever decides *which path* a request takes, never
//! policy: the credential is handed over as it came, and the Python side judges it and builds
//! the answer through the same request pipeline as the app.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, TRANSFER_ENCODING};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

mod backend;
mod tls;
pub use tls::TlsFiles;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

const KV_PREFIX: &str = "/v1/kv/";
const JSON: &str = "application/json; charset=utf-8";

/// A hot-path request waiting for Python's answer.
#[derive(Debug)]
pub struct HotRequest {
    pub id: u64,
    pub put: bool,
    pub key: String,
    /// The `consistency` query value of a GET, if given.
    pub consistency: Option<String>,
    pub request_id: Option<String>,
    /// The `Authorization` header as sent, for the Python side to judge.
    pub authorization: Option<String>,
    pub body: Bytes,
}

/// What a request is, as far as the front cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A put or get the Python side answers from a batch: (put?, key, consistency).
    Hot(bool, String, Option<String>),
    /// Anything else: the aiohttp app answers.
    Proxy,
}

/// Decides who answers. Only forms whose meaning cannot differ between this parser and
/// aiohttp's are hot: a key of unreserved characters and single slashes (no escapes, no dot
/// segments, no empty segments, so no URL normalisation can apply) and a body with a
/// Content-Length no larger than `max_body` for PUT and none for GET. Whether the request may
/// be answered at all (its token) is not decided here.
pub fn classify(method: &Method, uri: &Uri, headers: &HeaderMap, max_body: usize) -> Route {
    let put = match *method {
        Method::PUT => true,
        Method::GET => false,
        _ => return Route::Proxy,
    };
    let Some(key) = uri.path().strip_prefix(KV_PREFIX) else { return Route::Proxy };
    if !plain_key(key) {
        return Route::Proxy;
    }
    let consistency = match (put, uri.query()) {
        (_, None) => None,
        (false, Some(q)) => match q.strip_prefix("consistency=") {
            Some(v @ ("stale" | "linearizable")) => Some(v.to_string()),
            _ => return Route::Proxy,
        },
        (true, Some(_)) => return Route::Proxy,
    };
    if headers.contains_key(TRANSFER_ENCODING) || headers.contains_key(EXPECT) {
        return Route::Proxy;
    }
    let length = match headers.get_all(CONTENT_LENGTH).iter().collect::<Vec<_>>().as_slice() {
        [] => None,
        [v] => match v.to_str().ok().and_then(|s| s.parse::<usize>().ok()) {
            Some(n) => Some(n),
            None => return Route::Proxy,
        },
        _ => return Route::Proxy,
    };
    let body_ok = if put { matches!(length, Some(n) if n <= max_body) } else { matches!(length, None | Some(0)) };
    if !body_ok {
        return Route::Proxy;
    }
    Route::Hot(put, key.to_string(), consistency)
}

fn plain_key(key: &str) -> bool {
    !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b'.' | b'/'))
        && key.split('/').all(|segment| !matches!(segment, "" | "." | ".."))
}

/// Locks `mutex` even if a thread panicked while holding it. Every critical section here is
/// one push, take, insert or remove, so a panic elsewhere cannot leave the data half-changed,
/// and a poisoned lock must not turn into a panic across the Python boundary.
pub fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Reply {
    status: u16,
    body: Bytes,
}

struct Shared {
    queue: Mutex<Vec<HotRequest>>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    /// Set when a byte has been written to `notify` and Python has not taken the queue since.
    signalled: AtomicBool,
    notify: UnixStream,
    next_id: AtomicU64,
    max_body: usize,
    client: Client<backend::UnixConnector, Body>,
}

impl Shared {
    fn push(&self, request: HotRequest) {
        locked(&self.queue).push(request);
        // One byte per batch: Python clears the flag before it takes the queue, so a request
        // pushed after that take always writes a new byte.
        if !self.signalled.swap(true, Ordering::AcqRel) {
            // WouldBlock means the socket already holds unread bytes: Python will wake anyway.
            let _ = (&self.notify).write(&[1]);
        }
    }
}

/// The running front: a listener on the node's API address and the threads serving it.
pub struct Front {
    shared: Arc<Shared>,
    wake: UnixStream,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Front {
    /// Listens on `listen` (host:port; port 0 picks one) and proxies to the app listening on
    /// the Unix socket `backend`. `max_body` is the largest hot-path body. With `tls`, serves
    /// HTTPS only.
    pub fn start(listen: &str, backend: &str, max_body: usize, threads: usize, tls: Option<&TlsFiles>) -> io::Result<Front> {
        // Bad TLS files fail the start before anything listens.
        let acceptor = tls.map(tls::server_config).transpose()?.map(TlsAcceptor::from);
        let addrs: Vec<SocketAddr> = listen
            .to_socket_addrs()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve the API address {listen}: {e}")))?
            .collect();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("synapse-http")
            .enable_all()
            .build()?;
        let listeners = runtime.block_on(async { bind_all(&addrs) })?;
        let local_addr = match listeners.first() {
            Some(listener) => listener.local_addr()?,
            None => return Err(io::Error::new(io::ErrorKind::AddrNotAvailable, "no address to listen on")),
        };
        let (notify, wake) = UnixStream::pair()?;
        notify.set_nonblocking(true)?;
        wake.set_nonblocking(true)?;
        let client = Client::builder(TokioExecutor::new()).build(backend::UnixConnector::new(backend));
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            waiting: Mutex::new(HashMap::new()),
            signalled: AtomicBool::new(false),
            notify,
            next_id: AtomicU64::new(1),
            max_body,
            client,
        });
        let (stop, stopped) = watch::channel(false);
        for listener in listeners {
            runtime.spawn(accept_loop(listener, shared.clone(), acceptor.clone(), stopped.clone()));
        }
        Ok(Front { shared, wake, local_addr, stop, runtime: Some(runtime) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Readable when hot-path requests wait; `take` empties it.
    pub fn notify_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Every waiting hot-path request, oldest first.
    pub fn take(&self) -> Vec<HotRequest> {
        let mut sink = [0u8; 256];
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
        self.shared.signalled.store(false, Ordering::Release);
        std::mem::take(&mut *locked(&self.shared.queue))
    }

    /// Answers requests by id with a status and a JSON body. Unknown ids (a client that went
    /// away, a second answer) are ignored.
    pub fn respond(&self, replies: Vec<(u64, u16, Vec<u8>)>) {
        let mut waiting = locked(&self.shared.waiting);
        for (id, status, body) in replies {
            if let Some(tx) = waiting.remove(&id) {
                let _ = tx.send(Reply { status, body: Bytes::from(body) });
            }
        }
    }

    /// Stops listening and closes every connection; requests still waiting get a 503.
    pub fn stop(&mut self) {
        let _ = self.stop.send(true);
        locked(&self.shared.waiting).clear();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every address the API host resolves to, as aiohttp (asyncio's create_server) did: a host
/// such as `localhost` is served on both 127.0.0.1 and ::1.
fn bind_all(addrs: &[SocketAddr]) -> io::Result<Vec<tokio::net::TcpListener>> {
    let mut listeners: Vec<tokio::net::TcpListener> = Vec::new();
    let mut seen: Vec<SocketAddr> = Vec::new();
    for addr in addrs {
        if seen.contains(addr) {
            continue;
        }
        seen.push(*addr);
        let mut addr = *addr;
        if let (0, Some(first)) = (addr.port(), listeners.first()) {
            addr.set_port(first.local_addr()?.port()); // port 0: the one the kernel picked, everywhere
        }
        let addr = &addr;
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        // As aiohttp's reuse_address: a restarted node can listen again at once.
        socket.set_reuseaddr(true)?;
        let listener = socket
            .bind(*addr)
            .and_then(|_| socket.listen(1024))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        listeners.push(listener);
    }
    if listeners.is_empty() {
        return Err(io::Error::new(io::ErrorKind::AddrNotAvailable, "no address to listen on"));
    }
    Ok(listeners)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    acceptor: Option<TlsAcceptor>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => return,
        };
        let Ok((stream, _)) = accepted else {
            // EMFILE and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        match acceptor.clone() {
            None => {
                tokio::spawn(serve_connection(stream, shared));
            }
            Some(acceptor) => {
                tokio::spawn(serve_tls(stream, acceptor, shared));
            }
        }
    }
}

async fn serve_connection<S>(stream: S, shared: Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| serve(shared.clone(), req));
    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
}

/// How long a connection may take to finish its TLS handshake: a client that connects and
/// sends nothing must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve_tls(mut stream: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != tls::HANDSHAKE_RECORD => {
            // Plain HTTP (or anything else) on the TLS port: say so, then close.
            let _ = stream.write_all(&tls::plain_http_refusal()).await;
            let _ = stream.shutdown().await;
            return;
        }
        Ok(Ok(1)) => {}
        _ => return,
    }
    // A failed handshake (unknown CA, no client certificate) ends the connection: rustls has
    // already sent the client its alert.
    if let Ok(Ok(tls_stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        serve_connection(tls_stream, shared).await;
    }
}

async fn serve(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let Route::Hot(put, key, consistency) = classify(req.method(), req.uri(), req.headers(), shared.max_body) else {
        return Ok(proxy(&shared, req).await);
    };
    // Headers that are not text: the app says what is wrong with them.
    let (Ok(request_id), Ok(authorization)) = (text_header(req.headers(), "x-request-id"), text_header(req.headers(), AUTHORIZATION.as_str())) else {
        return Ok(proxy(&shared, req).await);
    };
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, "bad_request", &format!("the body could not be read: {e}"))),
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    locked(&shared.waiting).insert(id, tx);
    shared.push(HotRequest { id, put, key, consistency, request_id, authorization, body });
    Ok(match rx.await {
        Ok(reply) => json(StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), reply.body),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the node is shutting down; retry on another node"),
    })
}

/// A header's value as text (None if absent); Err if it is not text.
fn text_header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ()> {
    match headers.get(name).map(HeaderValue::to_str) {
        None => Ok(None),
        Some(Ok(v)) => Ok(Some(v.to_string())),
        Some(Err(_)) => Err(()),
    }
}

async fn proxy(shared: &Shared, mut req: Request<Incoming>) -> Response<Body> {
    let target = req.uri().path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    // The host is not used (the connector dials the app's socket); the path and query are.
    match format!("http://synapse-app{target}").parse::<Uri>() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &format!("the request target is not valid: {e}")),
    }
    let req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
    match shared.client.request(req).await {
        Ok(resp) => resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &format!("the node's API is not answering ({e}); retry")),
    }
}

fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

fn error(status: StatusCode, error: &str, message: &str) -> Response<Body> {
    let body = format!("{{\"error\":{},\"message\":{},\"retry\":true}}", quote(error), quote(message));
    json(status, Bytes::from(body))
}

/// A JSON string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Method, target: &str, headers: &[(&str, &str)]) -> Route {
        let uri: Uri = target.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        classify(&method, &uri, &map, 100)
    }

    const AUTH: (&str, &str) = ("authorization", "Bearer t0k");

    #[test]
    fn plain_puts_and_gets_are_hot() {
        assert_eq!(
            route(Method::PUT, "/v1/kv/bench/c64/w0/1", &[AUTH, ("content-length", "20")]),
            Route::Hot(true, "bench/c64/w0/1".into(), None)
        );
        assert_eq!(route(Method::GET, "/v1/kv/a.b-c_d~e", &[AUTH]), Route::Hot(false, "a.b-c_d~e".into(), None));
        assert_eq!(
            route(Method::GET, "/v1/kv/a?consistency=stale", &[AUTH]),
            Route::Hot(false, "a".into(), Some("stale".into()))
        );
    }

    #[test]
    fn anything_aiohttp_might_read_differently_is_proxied() {
        for target in ["/v1/kv/a%2Fb", "/v1/kv/a/../b", "/v1/kv/./a", "/v1/kv/a//b", "/v1/kv/a/", "/v1/kv/", "/v1/kv",
                       "/v1/kv/a?consistency=weird", "/v1/kv/a?consistency=stale&x=1", "/v1/kvx/a", "/v1/kv/é"] {
            if let Ok(uri) = target.parse::<Uri>() {
                let mut map = HeaderMap::new();
                map.insert(AUTHORIZATION, HeaderValue::from_static("Bearer t0k"));
                assert_eq!(classify(&Method::GET, &uri, &map, 100), Route::Proxy, "{target}");
            }
        }
        assert_eq!(route(Method::PUT, "/v1/kv/a?if_version=1", &[AUTH, ("content-length", "2")]), Route::Proxy);
        assert_eq!(route(Method::DELETE, "/v1/kv/a", &[AUTH]), Route::Proxy);
        assert_eq!(route(Method::POST, "/v1/kv/a", &[AUTH, ("content-length", "2")]), Route::Proxy);
    }

    #[test]
    fn the_token_is_not_judged_here() {
        // Any credential, or none, takes the hot path: the Python pipeline answers 401.
        assert_eq!(route(Method::GET, "/v1/kv/a", &[]), Route::Hot(false, "a".into(), None));
        assert_eq!(route(Method::GET, "/v1/kv/a", &[("authorization", "Bearer t0K")]), Route::Hot(false, "a".into(), None));
        assert_eq!(route(Method::GET, "/v1/kv/a", &[("authorization", "Basic x")]), Route::Hot(false, "a".into(), None));
    }

    #[test]
    fn bodies_must_have_a_bounded_length() {
        assert_eq!(route(Method::PUT, "/v1/kv/a", &[AUTH]), Route::Proxy);
        assert_eq!(route(Method::PUT, "/v1/kv/a", &[AUTH, ("content-length", "101")]), Route::Proxy);
        assert_eq!(route(Method::PUT, "/v1/kv/a", &[AUTH, ("transfer-encoding", "chunked")]), Route::Proxy);
        assert_eq!(route(Method::PUT, "/v1/kv/a", &[AUTH, ("content-length", "5"), ("content-length", "5")]), Route::Proxy);
        assert_eq!(route(Method::PUT, "/v1/kv/a", &[AUTH, ("content-length", "5"), ("expect", "100-continue")]), Route::Proxy);
        assert_eq!(route(Method::GET, "/v1/kv/a", &[AUTH, ("content-length", "3")]), Route::Proxy);
        assert_eq!(route(Method::GET, "/v1/kv/a", &[AUTH, ("content-length", "0")]), Route::Hot(false, "a".into(), None));
    }

    #[test]
    fn error_bodies_are_json() {
        assert_eq!(quote("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}

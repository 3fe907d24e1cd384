//! `synapse._core.HttpFront`: the node's HTTP front (rust/front) as Python sees it.

use std::sync::Mutex;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use synapse_front::{locked, Front, TlsFiles};

/// (id, put?, key, consistency or None, X-Request-Id or None, Authorization or None, body)
type Taken<'py> = (u64, bool, String, Option<String>, Option<String>, Option<String>, Bound<'py, PyBytes>);

#[pyclass(module = "synapse._core")]
pub struct HttpFront(Mutex<Option<Front>>);

impl HttpFront {
    fn with<T>(&self, f: impl FnOnce(&Front) -> T) -> PyResult<T> {
        match locked(&self.0).as_ref() {
            Some(front) => Ok(f(front)),
            None => Err(PyRuntimeError::new_err("the HTTP front is closed")),
        }
    }
}

#[pymethods]
impl HttpFront {
    /// Listens on `listen` ("host:port") now and proxies what it does not answer itself to the
    /// app on the Unix socket `backend`; raises OSError naming the address (or the TLS file)
    /// if it cannot. With `tls_cert` and `tls_key` it serves HTTPS only; with
    /// `tls_client_ca` too, every client must present a certificate that CA signed.
    #[new]
    #[pyo3(signature = (listen, backend, max_body, threads = 1, tls_cert = None, tls_key = None, tls_client_ca = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        listen: &str,
        backend: &str,
        max_body: usize,
        threads: usize,
        tls_cert: Option<String>,
        tls_key: Option<String>,
        tls_client_ca: Option<String>,
    ) -> PyResult<Self> {
        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca: tls_client_ca }),
            (None, None) if tls_client_ca.is_none() => None,
            _ => return Err(PyValueError::new_err("HTTPS needs both tls_cert and tls_key (and tls_client_ca only with them)")),
        };
        let front = py
            .allow_threads(|| Front::start(listen, backend, max_body, threads, tls.as_ref()))
            .map_err(|e| PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string())))?;
        Ok(HttpFront(Mutex::new(Some(front))))
    }

    /// The port it listens on (the one chosen, for port 0).
    fn port(&self) -> PyResult<u16> {
        self.with(|f| f.local_addr().port())
    }

    /// A file descriptor that becomes readable when hot-path requests wait.
    fn notify_fd(&self) -> PyResult<i32> {
        self.with(|f| f.notify_fd())
    }

    /// Every waiting hot-path request: (id, put?, key, consistency, request id, authorization, body).
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Vec<Taken<'py>>> {
        let taken = self.with(|f| f.take())?;
        Ok(taken
            .into_iter()
            .map(|r| (r.id, r.put, r.key, r.consistency, r.request_id, r.authorization, PyBytes::new(py, &r.body)))
            .collect())
    }

    /// Answers requests: a list of (id, HTTP status, JSON body bytes).
    fn respond(&self, replies: Vec<(u64, u16, Vec<u8>)>) -> PyResult<()> {
        self.with(|f| f.respond(replies))
    }

    /// Stops listening and closes every connection (idempotent).
    fn close(&self, py: Python<'_>) {
        let front = locked(&self.0).take();
        py.allow_threads(move || drop(front));
    }
}

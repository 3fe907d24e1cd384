//! HTTPS on the front: the server configuration built from PEM files, and the answer a plain
//! HTTP request gets on a TLS port.
//!
//! rustls with ring as its crypto provider (aws-lc-rs, its default, needs cmake and a long C
//! build). TLS 1.2 and 1.3, HTTP/1.1 by ALPN. With a client CA every connection must present a
//! certificate that CA signed (mutual TLS); the bearer token is still judged on every request —
//! the certificate says which machine connects, the token what it may do.

use std::fs::File;
use std::io::{self, BufReader};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// The PEM files of a TLS listener.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The certificate chain, the node's own first.
    pub cert: String,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// Clients must present a certificate this CA signed.
    pub client_ca: Option<String>,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn open(path: &str, what: &str) -> io::Result<BufReader<File>> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read the TLS {what} {path}: {e}")))
}

fn certificates(path: &str, what: &str) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut open(path, what)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("the TLS {what} {path} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(format!("the TLS {what} {path} holds no certificate (expected PEM 'BEGIN CERTIFICATE')")));
    }
    Ok(certs)
}

fn private_key(path: &str) -> io::Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut open(path, "key")?)
        .map_err(|e| invalid(format!("the TLS key {path} is not valid PEM: {e}")))?
        .ok_or_else(|| invalid(format!("the TLS key {path} holds no private key (expected PEM 'BEGIN PRIVATE KEY')")))
}

/// The server configuration, or an error naming the file and what is wrong with it.
pub fn server_config(files: &TlsFiles) -> io::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, "client CA")? {
                roots
                    .add(cert)
                    .map_err(|e| invalid(format!("the TLS client CA {path} holds a certificate rustls cannot use: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(format!("the TLS client CA {path} cannot verify clients: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certificates(&files.cert, "certificate")?, private_key(&files.key)?)
        .map_err(|e| invalid(format!("the TLS key {} does not fit the certificate {}: {e}", files.key, files.cert)))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The first byte of every TLS connection: a handshake record.
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// What a client that spoke plain HTTP to a TLS port reads before the connection closes
/// (as nginx's "plain HTTP request was sent to HTTPS port"): a clear error, not a reset.
pub fn plain_http_refusal() -> Vec<u8> {
    let body = r#"{"error":"tls_required","message":"this node serves HTTPS only: use an https:// URL (and --tls-ca with the cluster's CA certificate)","retry":false}"#;
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

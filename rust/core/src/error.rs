//! Errors of the core. The Python bindings map each variant to its own exception class, so
//! every message names the file (or buffer), the byte offset and what did not match.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{source_name}: truncated at byte {offset}: {detail}")]
    Truncated {
        source_name: String,
        offset: u64,
        detail: String,
    },
    #[error("{source_name}: corrupt at byte {offset}: {detail}")]
    Corrupt {
        source_name: String,
        offset: u64,
        detail: String,
    },
    #[error("{source_name}: {detail}")]
    Unsupported { source_name: String, detail: String },
    #[error("{0}")]
    DigestMismatch(String),
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T> = std::result::Result<T, CoreError>;

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

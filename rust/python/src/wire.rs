//! `FernetKey`: the Raft port's message seal (rust/wire) for synapse/cluster/wire.py.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use synapse_wire::{FernetKey as Key, IV_BYTES, KEY_BYTES};

/// Above this many bytes a seal or open runs with the GIL released (a dump chunk, a large
/// entry); below it releasing costs more than the work.
const RELEASE_GIL_BYTES: usize = 64 << 10;

fn released_if_large<T: Send>(py: Python<'_>, bytes: usize, work: impl FnOnce() -> T + Send) -> T {
    if bytes > RELEASE_GIL_BYTES {
        py.allow_threads(work)
    } else {
        work()
    }
}

#[pyclass(module = "synapse._core", frozen)]
pub struct FernetKey(Key);

#[pymethods]
impl FernetKey {
    #[new]
    fn new(key: &[u8]) -> PyResult<Self> {
        let key: &[u8; KEY_BYTES] =
            key.try_into().map_err(|_| PyValueError::new_err(format!("a Fernet key is {KEY_BYTES} bytes, not {}", key.len())))?;
        Ok(FernetKey(Key::new(key)))
    }

    /// The Fernet token of `message` at `timestamp` (seconds) with the 16 random bytes `iv`.
    fn seal<'py>(&self, py: Python<'py>, message: &[u8], timestamp: u64, iv: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let iv: &[u8; IV_BYTES] =
            iv.try_into().map_err(|_| PyValueError::new_err(format!("an IV is {IV_BYTES} bytes, not {}", iv.len())))?;
        let token = released_if_large(py, message.len(), || self.0.seal(message, timestamp, iv));
        Ok(PyBytes::new(py, &token))
    }

    /// (timestamp, message) of a token sealed with this key; ValueError for any other token
    /// (one message whatever the reason).
    fn open<'py>(&self, py: Python<'py>, token: &[u8]) -> PyResult<(u64, Bound<'py, PyBytes>)> {
        let (timestamp, message) = released_if_large(py, token.len(), || self.0.open(token))
            .map_err(|_| PyValueError::new_err("invalid Fernet token"))?;
        Ok((timestamp, PyBytes::new(py, &message)))
    }
}

//! PyO3 bindings: `synapse._core`. One Python→Rust crossing per batch; long work runs with
//! the GIL released; every core error becomes a specific exception (see synapse/_core.pyi).

use std::path::PathBuf;

mod front;
mod wake;
mod wire;

use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use synapse_core as core;
use synapse_core::tree::{self, Tree};
use synapse_core::{Change, CoreError as Error, Op};

// Every core error is a ValueError: each one reports bad data or a bad argument.
create_exception!(synapse._core, CoreError, PyValueError, "Base class of every error raised by the core.");
create_exception!(synapse._core, SnapshotError, CoreError, "A snapshot or diff file (or buffer) is unusable.");
create_exception!(synapse._core, CorruptSnapshotError, SnapshotError, "A checksum, length, order, count or digest does not match.");
create_exception!(synapse._core, TruncatedSnapshotError, SnapshotError, "The data ends before the end chunk.");
create_exception!(synapse._core, UnsupportedFormatError, SnapshotError, "Wrong magic bytes or an unknown format version.");
create_exception!(synapse._core, DigestMismatchError, CoreError, "A diff does not apply to this state or does not reach its digest.");

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Io { source, .. } => PyOSError::new_err((source.raw_os_error().unwrap_or(0), msg)),
        Error::Truncated { .. } => TruncatedSnapshotError::new_err(msg),
        Error::Corrupt { .. } => CorruptSnapshotError::new_err(msg),
        Error::Unsupported { .. } => UnsupportedFormatError::new_err(msg),
        Error::DigestMismatch(_) => DigestMismatchError::new_err(msg),
        Error::InvalidArgument(_) => PyValueError::new_err(msg),
    }
}

fn bytes<'py>(py: Python<'py>, b: &[u8]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, b)
}

fn pairs<'py>(py: Python<'py>, entries: &[(&[u8], &[u8])]) -> PyResult<Bound<'py, PyList>> {
    let items: Vec<Bound<'py, PyTuple>> = entries
        .iter()
        .map(|(k, v)| PyTuple::new(py, [bytes(py, k), bytes(py, v)]))
        .collect::<PyResult<_>>()?;
    PyList::new(py, items)
}

fn digest_arg(name: &str, d: &[u8]) -> PyResult<core::Digest> {
    d.try_into()
        .map_err(|_| PyValueError::new_err(format!("{name} must be {} bytes, got {}", core::DIGEST_SIZE, d.len())))
}

fn limit_arg(limit: Option<i64>) -> PyResult<usize> {
    match limit {
        None => Ok(usize::MAX),
        Some(n) if n >= 0 => Ok(n as usize),
        Some(n) => Err(PyValueError::new_err(format!("limit must be >= 0 or None, got {n}"))),
    }
}

#[pyclass(module = "synapse._core", name = "SnapshotInfo", frozen, get_all)]
struct SnapshotInfo {
    path: String,
    format: u32,
    entry_count: u64,
    log_index: u64,
    state_digest: Vec<u8>,
    file_size: u64,
}

#[pymethods]
impl SnapshotInfo {
    fn __repr__(&self) -> String {
        format!(
            "SnapshotInfo(path={:?}, entry_count={}, log_index={}, state_digest={}, file_size={})",
            self.path,
            self.entry_count,
            self.log_index,
            self.state_digest.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            self.file_size
        )
    }
}

impl From<core::SnapshotInfo> for SnapshotInfo {
    fn from(i: core::SnapshotInfo) -> Self {
        SnapshotInfo {
            path: i.path.display().to_string(),
            format: i.format,
            entry_count: i.entry_count,
            log_index: i.log_index,
            state_digest: i.state_digest.to_vec(),
            file_size: i.file_size,
        }
    }
}

#[pyclass(module = "synapse._core", name = "StateDiff", frozen)]
struct StateDiff(core::StateDiff);

#[pymethods]
impl StateDiff {
    #[getter]
    fn from_digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.0.from_digest)
    }
    #[getter]
    fn to_digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.0.to_digest)
    }
    #[getter]
    fn added<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.with_values(py, |c| matches!(c, Change::Added(_)))
    }
    #[getter]
    fn changed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.with_values(py, |c| matches!(c, Change::Changed(_)))
    }
    #[getter]
    fn removed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let keys: Vec<_> =
            self.0.records.iter().filter(|r| r.change == Change::Removed).map(|r| bytes(py, &r.key)).collect();
        PyList::new(py, keys)
    }
    fn __len__(&self) -> usize {
        self.0.records.len()
    }
    fn __eq__(&self, other: &Self) -> bool {
        self.0 == other.0
    }
    fn __repr__(&self) -> String {
        let count = |f: fn(&Change) -> bool| self.0.records.iter().filter(|r| f(&r.change)).count();
        format!(
            "StateDiff(added={}, changed={}, removed={})",
            count(|c| matches!(c, Change::Added(_))),
            count(|c| matches!(c, Change::Changed(_))),
            count(|c| matches!(c, Change::Removed))
        )
    }
    fn encode<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let encoded = py.allow_threads(|| self.0.encode());
        bytes(py, &encoded)
    }
    #[staticmethod]
    fn decode(py: Python<'_>, data: &[u8]) -> PyResult<StateDiff> {
        py.allow_threads(|| core::StateDiff::decode(data)).map(StateDiff).map_err(to_py)
    }
    fn write(&self, py: Python<'_>, path: PathBuf) -> PyResult<u64> {
        py.allow_threads(|| self.0.write(&path)).map_err(to_py)
    }
    #[staticmethod]
    fn read(py: Python<'_>, path: PathBuf) -> PyResult<StateDiff> {
        py.allow_threads(|| core::StateDiff::read(&path)).map(StateDiff).map_err(to_py)
    }
}

impl StateDiff {
    fn with_values<'py>(&self, py: Python<'py>, want: impl Fn(&Change) -> bool) -> PyResult<Bound<'py, PyList>> {
        let items: Vec<(&[u8], &[u8])> = self
            .0
            .records
            .iter()
            .filter(|r| want(&r.change))
            .filter_map(|r| match &r.change {
                Change::Added(v) | Change::Changed(v) => Some((r.key.as_slice(), v.as_slice())),
                Change::Removed => None,
            })
            .collect();
        pairs(py, &items)
    }
}

/// Converts a Python batch into core ops, raising before anything is mutated.
fn extract_ops(ops: &Bound<'_, PyAny>) -> PyResult<Vec<Op>> {
    let mut out = Vec::with_capacity(ops.len().unwrap_or(0));
    for (i, item) in ops.try_iter()?.enumerate() {
        let item = item?;
        let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract().map_err(|_| {
            PyTypeError::new_err(format!("op {i} must be a (key, value) tuple, got {}", type_name(&item)))
        })?;
        let key = key.downcast::<PyBytes>().map_err(|_| {
            PyTypeError::new_err(format!("op {i}: key must be bytes, got {}", type_name(&key)))
        })?;
        let op = if value.is_none() {
            Op::delete(key.as_bytes())
        } else {
            let value = value.downcast::<PyBytes>().map_err(|_| {
                PyTypeError::new_err(format!("op {i}: value must be bytes or None (delete), got {}", type_name(&value)))
            })?;
            Op::put(key.as_bytes(), value.as_bytes())
        };
        out.push(op);
    }
    Ok(out)
}

fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// The read-only methods of a state (lookups, digests, the bucket tree, bucket contents,
/// snapshots), generated for both `StateStore` and `FrozenState` from one text, plus each
/// class's own methods (`$own`). Each class has `fn contents(&self) -> &core::Contents`.
macro_rules! state_class {
    ($class:ident { $($own:tt)* }) => {
        #[pymethods]
        impl $class {
            $($own)*

            fn get<'py>(&self, py: Python<'py>, key: &[u8]) -> Option<Bound<'py, PyBytes>> {
                self.contents().get(key).map(|v| bytes(py, v))
            }

            fn get_many<'py>(&self, py: Python<'py>, keys: Vec<Vec<u8>>) -> PyResult<Bound<'py, PyList>> {
                let c = self.contents();
                let values: Vec<Option<Bound<'py, PyBytes>>> = keys.iter().map(|k| c.get(k).map(|v| bytes(py, v))).collect();
                PyList::new(py, values)
            }

            fn __len__(&self) -> usize {
                self.contents().len()
            }

            fn __contains__(&self, key: &[u8]) -> bool {
                self.contents().get(key).is_some()
            }

            fn digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
                bytes(py, &self.contents().digest())
            }

            fn hexdigest(&self) -> String {
                self.contents().digest().iter().map(|b| format!("{b:02x}")).collect()
            }

            fn recompute_digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
                let c = self.contents();
                let d = py.allow_threads(|| c.recompute_digest());
                bytes(py, &d)
            }

            fn node_digests<'py>(&self, py: Python<'py>, level: usize) -> PyResult<Bound<'py, PyBytes>> {
                tree::check_level(level).map_err(to_py)?;
                let size = tree::level_size(level);
                let mut out = Vec::with_capacity(size * 32);
                for i in 0..size {
                    out.extend_from_slice(&self.contents().node(level, i).to_bytes());
                }
                Ok(bytes(py, &out))
            }

            fn children_digests<'py>(&self, py: Python<'py>, level: usize, parents: Vec<usize>) -> PyResult<Bound<'py, PyBytes>> {
                let out = tree::children_digests(self.contents(), level, &parents).map_err(to_py)?;
                Ok(bytes(py, &out))
            }

            fn compare_children(&self, level: usize, parents: Vec<usize>, remote: &[u8]) -> PyResult<Vec<usize>> {
                tree::compare_children(self.contents(), level, &parents, remote).map_err(to_py)
            }

            fn bucket_entries<'py>(&self, py: Python<'py>, buckets: Vec<usize>) -> PyResult<Bound<'py, PyList>> {
                pairs(py, &self.contents().bucket_entries(&buckets).map_err(to_py)?)
            }

            fn bucket_element_hashes<'py>(&self, py: Python<'py>, buckets: Vec<usize>) -> PyResult<Bound<'py, PyList>> {
                let rows = self.contents().bucket_element_hashes(&buckets).map_err(to_py)?;
                let items: Vec<Bound<'py, PyTuple>> = rows
                    .iter()
                    .map(|(k, h)| PyTuple::new(py, [bytes(py, k), bytes(py, &h[..])]))
                    .collect::<PyResult<_>>()?;
                PyList::new(py, items)
            }

            fn diff_buckets(&self, py: Python<'_>, buckets: Vec<usize>, remote_entries: Vec<(Vec<u8>, Vec<u8>)>) -> PyResult<StateDiff> {
                let c = self.contents();
                py.allow_threads(|| c.diff_buckets(&buckets, remote_entries)).map(StateDiff).map_err(to_py)
            }

            #[pyo3(signature = (path, log_index, prefix = b"".as_slice()))]
            fn write_snapshot(&self, py: Python<'_>, path: PathBuf, log_index: u64, prefix: &[u8]) -> PyResult<SnapshotInfo> {
                let c = self.contents();
                py.allow_threads(|| core::write_snapshot_with_prefix(c, &path, log_index, prefix)).map(Into::into).map_err(to_py)
            }

            fn diff_snapshot(&self, py: Python<'_>, path: PathBuf) -> PyResult<StateDiff> {
                let c = self.contents();
                py.allow_threads(|| core::diff_store_to_snapshot(c, &path)).map(StateDiff).map_err(to_py)
            }
        }
    };
}

#[pyclass(module = "synapse._core", name = "StateStore")]
#[derive(Default)]
struct StateStore(core::StateStore);

impl StateStore {
    fn contents(&self) -> &core::Contents {
        &self.0
    }
}

state_class!(StateStore {
    #[new]
    fn new() -> Self {
        StateStore::default()
    }

    fn apply(&mut self, py: Python<'_>, ops: &Bound<'_, PyAny>) -> PyResult<usize> {
        let ops = extract_ops(ops)?;
        let n = ops.len();
        let store = &mut self.0;
        py.allow_threads(|| store.apply(ops)).map_err(to_py)?;
        Ok(n)
    }

    /// A log entry of plain puts, deletes and noops applied whole in Rust (core `kv_apply`): its
    /// commands, the dedup bound and the audit chain link, as `CommandProcessor.apply_entry`
    /// would. Returns `(results, changes, chain)` — result dicts, `KvChange` field tuples —
    /// or None having changed nothing: the entry is the Python processor's to apply.
    fn apply_kv_entry<'py>(
        &mut self,
        py: Python<'py>,
        index: u64,
        payload: &[u8],
        dedup_capacity: u64,
    ) -> PyResult<Option<(Bound<'py, PyList>, Bound<'py, PyList>, Bound<'py, PyBytes>)>> {
        let store = &mut self.0;
        let Some(out) = py.allow_threads(|| core::apply_kv_entry(store, index, payload, dedup_capacity)) else {
            return Ok(None);
        };
        let results: Vec<Bound<'py, PyDict>> = out
            .results
            .iter()
            .map(|r| {
                let d = PyDict::new(py);
                d.set_item("ok", true)?;
                match r {
                    core::KvResult::Put { key, version } => {
                        d.set_item("key", key)?;
                        d.set_item("version", version)?;
                    }
                    core::KvResult::Delete { key, deleted } => {
                        d.set_item("key", key)?;
                        d.set_item("deleted", deleted)?;
                    }
                    core::KvResult::Noop => {}
                }
                d.set_item("index", index)?;
                Ok(d)
            })
            .collect::<PyResult<_>>()?;
        let changes: Vec<Bound<'py, PyTuple>> = out
            .changes
            .iter()
            .map(|c| {
                let value = c.value.as_deref().map(|v| bytes(py, v).into_any()).unwrap_or_else(|| py.None().into_bound(py));
                (c.key.as_str(), value, c.version, c.create_index, c.mod_index, index).into_pyobject(py)
            })
            .collect::<PyResult<_>>()?;
        Ok(Some((PyList::new(py, results)?, PyList::new(py, changes)?, bytes(py, &out.chain))))
    }

    #[pyo3(signature = (start = b"".as_slice(), end = None, limit = None))]
    fn scan<'py>(&self, py: Python<'py>, start: &[u8], end: Option<&[u8]>, limit: Option<i64>) -> PyResult<Bound<'py, PyList>> {
        pairs(py, &self.0.scan(start, end, limit_arg(limit)?))
    }

    #[pyo3(signature = (prefix, limit = None))]
    fn scan_prefix<'py>(&self, py: Python<'py>, prefix: &[u8], limit: Option<i64>) -> PyResult<Bound<'py, PyList>> {
        pairs(py, &self.0.scan_prefix(prefix, limit_arg(limit)?))
    }

    fn memory_usage(&self) -> usize {
        self.0.memory_usage()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("entries", self.0.len())?;
        d.set_item("key_bytes", self.0.key_bytes())?;
        d.set_item("value_bytes", self.0.value_bytes())?;
        d.set_item("memory_usage", self.0.memory_usage())?;
        Ok(d)
    }

    fn clone(&self, py: Python<'_>) -> StateStore {
        let store = &self.0;
        StateStore(py.allow_threads(|| store.clone()))
    }

    /// An immutable view of the state now, readable from any thread while this store goes on
    /// changing: O(buckets) to take, and each later write copies only the bucket it touches.
    fn freeze(&self) -> FrozenState {
        FrozenState(self.0.freeze())
    }

    /// A store holding a frozen view's state (its key index rebuilt, GIL released).
    #[staticmethod]
    fn thaw(py: Python<'_>, frozen: PyRef<'_, FrozenState>) -> StateStore {
        let contents = frozen.0.clone();
        StateStore(py.allow_threads(|| core::StateStore::thaw(contents)))
    }

    #[staticmethod]
    fn bucket_of(key: &[u8]) -> usize {
        core::bucket_of(key)
    }

    fn differing_buckets(&self, other: PyRef<'_, StateStore>) -> Vec<usize> {
        self.0.differing_buckets(&other.0)
    }

    fn diff(&self, py: Python<'_>, other: PyRef<'_, StateStore>) -> StateDiff {
        let (a, b) = (&self.0, &other.0);
        StateDiff(py.allow_threads(|| a.diff(b)))
    }

    fn apply_diff(&mut self, py: Python<'_>, diff: PyRef<'_, StateDiff>) -> PyResult<()> {
        let (store, d) = (&mut self.0, &diff.0);
        py.allow_threads(|| store.apply_diff(d)).map_err(to_py)
    }

    #[staticmethod]
    #[pyo3(signature = (path, offset = 0))]
    fn load_snapshot(py: Python<'_>, path: PathBuf, offset: u64) -> PyResult<(StateStore, SnapshotInfo)> {
        let (store, info) = py.allow_threads(|| core::load_snapshot_at(&path, offset)).map_err(to_py)?;
        Ok((StateStore(store), info.into()))
    }

    fn __repr__(&self) -> String {
        format!("StateStore(entries={}, digest={})", self.0.len(), self.hexdigest())
    }
});

/// A state frozen at one moment (`StateStore.freeze()`): immutable, so any thread may read it
/// without the store's lock while the store goes on applying.
#[pyclass(module = "synapse._core", name = "FrozenState", frozen)]
struct FrozenState(core::Contents);

impl FrozenState {
    fn contents(&self) -> &core::Contents {
        &self.0
    }
}

state_class!(FrozenState {
    fn diff(&self, py: Python<'_>, other: PyRef<'_, FrozenState>) -> StateDiff {
        let (a, b) = (&self.0, &other.0);
        StateDiff(py.allow_threads(|| a.diff(b)))
    }

    fn __repr__(&self) -> String {
        format!("FrozenState(entries={}, digest={})", self.0.len(), self.hexdigest())
    }
});

#[pyfunction]
fn read_snapshot_info(py: Python<'_>, path: PathBuf) -> PyResult<SnapshotInfo> {
    py.allow_threads(|| core::read_snapshot_info(&path)).map(Into::into).map_err(to_py)
}

#[pyfunction]
fn diff_snapshots(py: Python<'_>, old: PathBuf, new: PathBuf) -> PyResult<StateDiff> {
    py.allow_threads(|| core::diff_snapshots(&old, &new)).map(StateDiff).map_err(to_py)
}

#[pyfunction]
fn chain<'py>(py: Python<'py>, prev: &[u8], index: u64, entry: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    Ok(bytes(py, &core::chain(&digest_arg("prev", prev)?, index, entry)))
}

#[pyfunction]
fn chain_many<'py>(py: Python<'py>, prev: &[u8], entries: Vec<(u64, Vec<u8>)>) -> PyResult<Bound<'py, PyList>> {
    let mut cur = digest_arg("prev", prev)?;
    let links: Vec<core::Digest> = py.allow_threads(|| {
        entries
            .iter()
            .map(|(i, e)| {
                cur = core::chain(&cur, *i, e);
                cur
            })
            .collect()
    });
    PyList::new(py, links.iter().map(|d| bytes(py, d)))
}

#[pyfunction]
fn element_hash<'py>(py: Python<'py>, key: &[u8], value: &[u8]) -> Bound<'py, PyBytes> {
    bytes(py, &core::element_hash(key, value))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("BUCKETS", core::BUCKETS)?;
    m.add("FANOUT", core::FANOUT)?;
    m.add("TREE_DEPTH", core::TREE_DEPTH)?;
    m.add("DIGEST_SIZE", core::DIGEST_SIZE)?;
    m.add("SNAPSHOT_FORMAT", core::SNAPSHOT_FORMAT)?;
    m.add("CoreError", py.get_type::<CoreError>())?;
    m.add("SnapshotError", py.get_type::<SnapshotError>())?;
    m.add("CorruptSnapshotError", py.get_type::<CorruptSnapshotError>())?;
    m.add("TruncatedSnapshotError", py.get_type::<TruncatedSnapshotError>())?;
    m.add("UnsupportedFormatError", py.get_type::<UnsupportedFormatError>())?;
    m.add("DigestMismatchError", py.get_type::<DigestMismatchError>())?;
    m.add_class::<StateStore>()?;
    m.add_class::<FrozenState>()?;
    m.add_class::<StateDiff>()?;
    m.add_class::<SnapshotInfo>()?;
    m.add_class::<front::HttpFront>()?;
    m.add_class::<wire::FernetKey>()?;
    m.add_function(wrap_pyfunction!(wake::wake_pipe, m)?)?;
    m.add_function(wrap_pyfunction!(read_snapshot_info, m)?)?;
    m.add_function(wrap_pyfunction!(diff_snapshots, m)?)?;
    m.add_function(wrap_pyfunction!(chain, m)?)?;
    m.add_function(wrap_pyfunction!(chain_many, m)?)?;
    m.add_function(wrap_pyfunction!(element_hash, m)?)?;
    Ok(())
}

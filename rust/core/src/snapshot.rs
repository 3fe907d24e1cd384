//! Snapshot files: streaming write (fsynced, atomically renamed) and fully verified load.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::codec::{corrupt, decode_header, encode_header, put_bytes, ChunkReader, Fields, FORMAT_VERSION, SNAPSHOT};
use crate::hashing::Lattice;
use crate::key::Key;
use crate::store::{Contents, StateStore, Value};
use crate::{hex, CoreError, Digest, Result};

const IO_BUFFER: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub path: PathBuf,
    pub format: u32,
    pub entry_count: u64,
    pub log_index: u64,
    pub state_digest: Digest,
    pub file_size: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CoreError + '_ {
    move |source| CoreError::Io { path: path.to_path_buf(), source }
}

/// Writes `path + ".tmp"`, fsyncs it, renames it over `path` and fsyncs the directory, so a
/// crash leaves either the old snapshot or the new one, never a torn file.
pub fn write_snapshot(store: &Contents, path: &Path, log_index: u64) -> Result<SnapshotInfo> {
    write_snapshot_with_prefix(store, path, log_index, &[])
}

/// As `write_snapshot`, with `prefix` written before the snapshot's first byte: a container
/// (the Raft dump file) can carry its own metadata and the snapshot in one atomic file. Load
/// it back with `load_snapshot_at(path, prefix.len())`.
pub fn write_snapshot_with_prefix(store: &Contents, path: &Path, log_index: u64, prefix: &[u8]) -> Result<SnapshotInfo> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = File::create(&tmp).map_err(io(&tmp))?;
    let mut out = BufWriter::with_capacity(IO_BUFFER, file);
    out.write_all(prefix).map_err(io(&tmp))?;
    let digest = store.digest();
    let mut fields = Vec::with_capacity(48);
    fields.extend_from_slice(&(store.len() as u64).to_le_bytes());
    fields.extend_from_slice(&log_index.to_le_bytes());
    fields.extend_from_slice(&digest);
    let header = encode_header(&SNAPSHOT, &fields);
    out.write_all(&header).map_err(io(&tmp))?;
    let mut chunks = crate::codec::ChunkWriter::new(out, &SNAPSHOT, header.len() as u64);
    for (k, v) in store.sorted_entries() {
        let rec = chunks.record();
        put_bytes(rec, k);
        put_bytes(rec, v);
        chunks.maybe_close().map_err(io(&tmp))?;
    }
    let (out, size) = chunks.finish().map_err(io(&tmp))?;
    let file = out.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    let file_size = size + prefix.len() as u64;
    Ok(SnapshotInfo { path: path.to_path_buf(), format: FORMAT_VERSION, entry_count: store.len() as u64, log_index, state_digest: digest, file_size })
}

struct Header {
    entry_count: u64,
    log_index: u64,
    state_digest: Digest,
}

fn read_header(input: &mut impl Read, source: &str) -> Result<Header> {
    let f = decode_header(&SNAPSHOT, input, source)?;
    Ok(Header {
        entry_count: u64::from_le_bytes(f[0..8].try_into().expect("8 bytes")),
        log_index: u64::from_le_bytes(f[8..16].try_into().expect("8 bytes")),
        state_digest: f[16..48].try_into().expect("32 bytes"),
    })
}

/// Opens a snapshot that starts `offset` bytes into the file. Error offsets count from the
/// snapshot's first byte.
fn open(path: &Path, offset: u64) -> Result<(BufReader<File>, u64, String)> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(path).map_err(io(path))?;
    let size = file.metadata().map_err(io(path))?.len();
    file.seek(SeekFrom::Start(offset)).map_err(io(path))?;
    Ok((BufReader::with_capacity(IO_BUFFER, file), size, path.display().to_string()))
}

/// Verifies the header checksum only: cheap, for listing snapshots.
pub fn read_snapshot_info(path: &Path) -> Result<SnapshotInfo> {
    let (mut input, size, source) = open(path, 0)?;
    let h = read_header(&mut input, &source)?;
    Ok(SnapshotInfo { path: path.to_path_buf(), format: FORMAT_VERSION, entry_count: h.entry_count, log_index: h.log_index, state_digest: h.state_digest, file_size: size })
}

/// Parses a verified chunk's records, checking strict key order against `last`.
fn for_each_entry(
    chunk: &crate::codec::Chunk,
    source: &str,
    last: &mut Option<Vec<u8>>,
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<()> {
    let mut fields = Fields::new(chunk, source);
    for _ in 0..chunk.count {
        let at = fields.offset();
        let k = fields.bytes()?;
        let v = fields.bytes()?;
        if last.as_deref().is_some_and(|prev| prev >= k) {
            return Err(corrupt(source, at, format!("key {:?} is out of order", String::from_utf8_lossy(k))));
        }
        f(k, v);
        *last = Some(k.to_vec());
    }
    fields.finish()
}

fn check_totals(source: &str, h: &Header, count: u64, digest: &Digest) -> Result<()> {
    if count != h.entry_count {
        return Err(corrupt(source, 16, format!("header promises {} entries, file holds {count}", h.entry_count)));
    }
    if *digest != h.state_digest {
        return Err(corrupt(
            source,
            32,
            format!("entries hash to {} but the header records {}", hex(digest), hex(&h.state_digest)),
        ));
    }
    Ok(())
}

/// Loads a snapshot, verifying every chunk, the key order, the count and the state digest.
pub fn load_snapshot(path: &Path) -> Result<(StateStore, SnapshotInfo)> {
    load_snapshot_at(path, 0)
}

/// Loads a snapshot that starts `offset` bytes into the file (see `write_snapshot_with_prefix`).
pub fn load_snapshot_at(path: &Path, offset: u64) -> Result<(StateStore, SnapshotInfo)> {
    let (mut input, size, source) = open(path, offset)?;
    let h = read_header(&mut input, &source)?;
    let mut reader = ChunkReader::new(input, &SNAPSHOT, &source);
    // Capacity from the header is only a hint: a corrupt count must not allocate.
    let mut entries: Vec<(Key, Value)> = Vec::with_capacity((h.entry_count as usize).min(1 << 20));
    let mut last = None;
    while let Some(chunk) = reader.next_chunk()? {
        for_each_entry(&chunk, &source, &mut last, |k, v| entries.push((Key::new(k), v.into())))?;
    }
    let count = entries.len() as u64;
    let store = StateStore::from_sorted(entries);
    check_totals(&source, &h, count, &store.digest())?;
    let info = SnapshotInfo { path: path.to_path_buf(), format: FORMAT_VERSION, entry_count: count, log_index: h.log_index, state_digest: h.state_digest, file_size: size };
    Ok((store, info))
}

/// A snapshot's entries in key order, verified as they stream; the last item is an error if
/// the count or digest does not match the header.
pub struct SnapshotEntries {
    reader: ChunkReader<BufReader<File>>,
    header: Header,
    pending: std::vec::IntoIter<(Vec<u8>, Vec<u8>)>,
    last: Option<Vec<u8>>,
    lattice: Lattice,
    hasher: blake3::Hasher,
    count: u64,
    finished: bool,
}

impl SnapshotEntries {
    pub fn open(path: &Path) -> Result<SnapshotEntries> {
        let (mut input, _, source) = open(path, 0)?;
        let header = read_header(&mut input, &source)?;
        Ok(SnapshotEntries {
            reader: ChunkReader::new(input, &SNAPSHOT, &source),
            header,
            pending: Vec::new().into_iter(),
            last: None,
            lattice: Lattice::default(),
            hasher: blake3::Hasher::new(),
            count: 0,
            finished: false,
        })
    }

    pub fn state_digest(&self) -> Digest {
        self.header.state_digest
    }

    fn refill(&mut self) -> Result<bool> {
        let Some(chunk) = self.reader.next_chunk()? else {
            check_totals(self.reader.source(), &self.header, self.count, &self.lattice.digest())?;
            return Ok(false);
        };
        let mut batch = Vec::with_capacity(chunk.count as usize);
        let (lattice, hasher, count) = (&mut self.lattice, &mut self.hasher, &mut self.count);
        for_each_entry(&chunk, self.reader.source(), &mut self.last, |k, v| {
            lattice.mix_entry(hasher, k, v, false);
            *count += 1;
            batch.push((k.to_vec(), v.to_vec()));
        })?;
        self.pending = batch.into_iter();
        Ok(true)
    }
}

impl Iterator for SnapshotEntries {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.pending.next() {
                return Some(Ok(e));
            }
            if self.finished {
                return None;
            }
            match self.refill() {
                Ok(true) => continue,
                Ok(false) => {
                    self.finished = true;
                    return None;
                }
                Err(e) => {
                    self.finished = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Op;

    fn sample(n: u32, value_len: usize) -> StateStore {
        let mut s = StateStore::new();
        s.apply((0..n).map(|i| Op::put(format!("key-{i:06}").as_bytes(), &vec![i as u8; value_len])).collect()).expect("the operation under test succeeds");
        s
    }

    #[test]
    fn round_trip_multi_chunk() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let p = dir.path().join("s.snap");
        let s = sample(3000, 200);
        let info = write_snapshot(&s, &p, 42).expect("the operation under test succeeds");
        assert_eq!(info.file_size, std::fs::metadata(&p).expect("the operation under test succeeds").len());
        let (t, linfo) = load_snapshot(&p).expect("the operation under test succeeds");
        assert_eq!(t.digest(), s.digest());
        assert_eq!(linfo.log_index, 42);
        assert_eq!(t.sorted_entries(), s.sorted_entries());
        assert_eq!(read_snapshot_info(&p).expect("the operation under test succeeds").entry_count, 3000);
        let streamed: Vec<_> = SnapshotEntries::open(&p).expect("the operation under test succeeds").collect::<Result<_>>().expect("the operation under test succeeds");
        assert_eq!(streamed.len(), 3000);
    }

    #[test]
    fn every_truncation_and_flip_is_rejected() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let p = dir.path().join("s.snap");
        write_snapshot(&sample(5, 3), &p, 1).expect("the operation under test succeeds");
        let bytes = std::fs::read(&p).expect("the snapshot just written");
        let q = dir.path().join("bad.snap");
        for cut in 0..bytes.len() {
            std::fs::write(&q, &bytes[..cut]).expect("a scratch file");
            assert!(load_snapshot(&q).is_err(), "truncation at {cut} accepted");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            std::fs::write(&q, &b).expect("a scratch file");
            assert!(load_snapshot(&q).is_err(), "flip at {i} accepted");
        }
        let mut b = bytes.clone();
        b.push(0);
        std::fs::write(&q, &b).expect("a scratch file");
        assert!(matches!(load_snapshot(&q), Err(CoreError::Corrupt { .. })));
    }

    #[test]
    fn prefixed_container_round_trips() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let p = dir.path().join("dump");
        let s = sample(10, 5);
        let info = write_snapshot_with_prefix(&s, &p, 9, b"meta!").expect("the operation under test succeeds");
        assert_eq!(info.file_size, std::fs::metadata(&p).expect("the operation under test succeeds").len());
        let (t, i) = load_snapshot_at(&p, 5).expect("the operation under test succeeds");
        assert_eq!((t.digest(), i.log_index), (s.digest(), 9));
        assert!(load_snapshot_at(&p, 4).is_err());
    }

    #[test]
    fn empty_state_round_trips() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let p = dir.path().join("e.snap");
        let info = write_snapshot(&StateStore::new(), &p, 0).expect("the operation under test succeeds");
        assert_eq!(info.file_size, 80 + 8 + 16);
        assert_eq!(load_snapshot(&p).expect("the operation under test succeeds").0.digest(), StateStore::new().digest());
    }
}

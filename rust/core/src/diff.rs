//! State diffs: the merge that finds them, and their checksummed encoding.

use std::io::{Read, Write};
use std::path::Path;

use crate::codec::{corrupt, decode_header, encode_header, put_bytes, ChunkReader, ChunkWriter, Fields, DIFF};
use crate::{CoreError, Digest, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Added(Vec<u8>),
    Changed(Vec<u8>),
    Removed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffRecord {
    pub key: Vec<u8>,
    pub change: Change,
}

/// Records, in strictly increasing key order, that take `from_digest`'s state to `to_digest`'s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDiff {
    pub from_digest: Digest,
    pub to_digest: Digest,
    pub records: Vec<DiffRecord>,
}

const OP_ADDED: u8 = 1;
const OP_CHANGED: u8 = 2;
const OP_REMOVED: u8 = 3;

/// Merge-joins two key-ordered entry streams (old state, new state) into diff records.
pub fn merge_sorted<KA, VA, KB, VB>(
    old: impl Iterator<Item = Result<(KA, VA)>>,
    new: impl Iterator<Item = Result<(KB, VB)>>,
) -> Result<Vec<DiffRecord>>
where
    KA: AsRef<[u8]>,
    VA: AsRef<[u8]>,
    KB: AsRef<[u8]>,
    VB: AsRef<[u8]>,
{
    let (mut old, mut new) = (old, new);
    let mut a = old.next().transpose()?;
    let mut b = new.next().transpose()?;
    let mut out = Vec::new();
    loop {
        let order = match (&a, &b) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.as_ref().cmp(kb.as_ref()),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (k, _) = a.take().expect("present");
                out.push(DiffRecord { key: k.as_ref().to_vec(), change: Change::Removed });
                a = old.next().transpose()?;
            }
            std::cmp::Ordering::Greater => {
                let (k, v) = b.take().expect("present");
                out.push(DiffRecord { key: k.as_ref().to_vec(), change: Change::Added(v.as_ref().to_vec()) });
                b = new.next().transpose()?;
            }
            std::cmp::Ordering::Equal => {
                let (k, va) = a.take().expect("present");
                let (_, vb) = b.take().expect("present");
                if va.as_ref() != vb.as_ref() {
                    out.push(DiffRecord { key: k.as_ref().to_vec(), change: Change::Changed(vb.as_ref().to_vec()) });
                }
                a = old.next().transpose()?;
                b = new.next().transpose()?;
            }
        }
    }
    Ok(out)
}

impl StateDiff {
    pub fn encode_to(&self, out: impl Write) -> std::io::Result<u64> {
        let mut out = out;
        let mut fields = Vec::with_capacity(72);
        fields.extend_from_slice(&(self.records.len() as u64).to_le_bytes());
        fields.extend_from_slice(&self.from_digest);
        fields.extend_from_slice(&self.to_digest);
        let header = encode_header(&DIFF, &fields);
        out.write_all(&header)?;
        let mut chunks = ChunkWriter::new(out, &DIFF, header.len() as u64);
        for r in &self.records {
            let rec = chunks.record();
            match &r.change {
                Change::Added(v) | Change::Changed(v) => {
                    rec.push(if matches!(r.change, Change::Added(_)) { OP_ADDED } else { OP_CHANGED });
                    put_bytes(rec, &r.key);
                    put_bytes(rec, v);
                }
                Change::Removed => {
                    rec.push(OP_REMOVED);
                    put_bytes(rec, &r.key);
                }
            }
            chunks.maybe_close()?;
        }
        let (mut out, size) = chunks.finish()?;
        out.flush()?;
        Ok(size)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_to(&mut v).expect("writing to memory cannot fail");
        v
    }

    pub fn decode_from(input: impl Read, source: &str) -> Result<StateDiff> {
        let mut input = input;
        let f = decode_header(&DIFF, &mut input, source)?;
        let count = u64::from_le_bytes(f[0..8].try_into().expect("8 bytes"));
        let from_digest: Digest = f[8..40].try_into().expect("32 bytes");
        let to_digest: Digest = f[40..72].try_into().expect("32 bytes");
        let mut reader = ChunkReader::new(input, &DIFF, source);
        let mut records: Vec<DiffRecord> = Vec::new();
        while let Some(chunk) = reader.next_chunk()? {
            let mut fields = Fields::new(&chunk, source);
            for _ in 0..chunk.count {
                let at = fields.offset();
                let op = fields.u8()?;
                let key = fields.bytes()?.to_vec();
                let change = match op {
                    OP_ADDED => Change::Added(fields.bytes()?.to_vec()),
                    OP_CHANGED => Change::Changed(fields.bytes()?.to_vec()),
                    OP_REMOVED => Change::Removed,
                    other => return Err(corrupt(source, at, format!("unknown diff record kind {other}"))),
                };
                if records.last().is_some_and(|r| r.key >= key) {
                    return Err(corrupt(source, at, format!("key {:?} is out of order", String::from_utf8_lossy(&key))));
                }
                records.push(DiffRecord { key, change });
            }
            fields.finish()?;
        }
        if records.len() as u64 != count {
            return Err(corrupt(source, 16, format!("header promises {count} records, the diff holds {}", records.len())));
        }
        Ok(StateDiff { from_digest, to_digest, records })
    }

    pub fn decode(bytes: &[u8]) -> Result<StateDiff> {
        StateDiff::decode_from(bytes, "<diff buffer>")
    }

    pub fn write(&self, path: &Path) -> Result<u64> {
        let io = |source| CoreError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::create(path).map_err(io)?;
        let mut out = std::io::BufWriter::new(file);
        let n = self.encode_to(&mut out).map_err(io)?;
        out.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
        Ok(n)
    }

    pub fn read(path: &Path) -> Result<StateDiff> {
        let file = std::fs::File::open(path).map_err(|source| CoreError::Io { path: path.to_path_buf(), source })?;
        StateDiff::decode_from(std::io::BufReader::new(file), &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_and_rejects_every_flip() {
        let d = StateDiff {
            from_digest: [1; 32],
            to_digest: [2; 32],
            records: vec![
                DiffRecord { key: b"a".to_vec(), change: Change::Added(b"x".to_vec()) },
                DiffRecord { key: b"b".to_vec(), change: Change::Changed(b"y".to_vec()) },
                DiffRecord { key: b"c".to_vec(), change: Change::Removed },
            ],
        };
        let bytes = d.encode();
        assert_eq!(StateDiff::decode(&bytes).expect("a freshly encoded diff decodes"), d);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(StateDiff::decode(&b).is_err(), "flip at {i} accepted");
        }
        for cut in 0..bytes.len() {
            assert!(StateDiff::decode(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
    }
}

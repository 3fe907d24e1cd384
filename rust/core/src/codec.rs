//! Checksummed chunk framing shared by the snapshot and diff formats (rust/DESIGN.md).
//! The writer and reader here are the only code that knows the framing.

use std::io::{Read, Write};

use crate::{CoreError, Result};

/// A chunk is closed as soon as its payload reaches this size.
pub const CHUNK_TARGET: usize = 262_144;
const CHECK_LEN: usize = 16;

/// The tags that make one format's bytes useless as another's.
pub struct Format {
    pub name: &'static str,
    pub magic: &'static [u8; 8],
    pub header_tag: &'static [u8; 8],
    pub chunk_tag: &'static [u8; 8],
    pub header_len: usize,
}

pub const SNAPSHOT: Format = Format {
    name: "snapshot",
    magic: b"SYNSNAP\0",
    header_tag: b"SYNSNAPH",
    chunk_tag: b"SYNSNAPC",
    header_len: 80,
};

pub const DIFF: Format = Format {
    name: "diff",
    magic: b"SYNDIFF\0",
    header_tag: b"SYNDIFFH",
    chunk_tag: b"SYNDIFFC",
    header_len: 104,
};

pub const FORMAT_VERSION: u32 = 1;

fn check(tag: &[u8; 8], parts: &[&[u8]]) -> [u8; CHECK_LEN] {
    let mut h = blake3::Hasher::new();
    h.update(tag);
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECK_LEN]);
    out
}

/// Header = magic ‖ u32 format ‖ u32 flags ‖ `fields` ‖ 16-byte check.
pub fn encode_header(format: &Format, fields: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(format.header_len);
    h.extend_from_slice(format.magic);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(fields);
    let c = check(format.header_tag, &[&h]);
    h.extend_from_slice(&c);
    debug_assert_eq!(h.len(), format.header_len);
    h
}

/// Reads and verifies a header; returns its `fields` (the bytes between flags and check).
pub fn decode_header(format: &Format, input: &mut impl Read, source: &str) -> Result<Vec<u8>> {
    let mut h = vec![0u8; format.header_len];
    let got = read_full(input, &mut h, source)?;
    if got >= 8 && &h[..8] != format.magic || got < 8 && h[..got] != format.magic[..got] {
        return Err(CoreError::Unsupported {
            source_name: source.to_string(),
            detail: format!("not a Synapse {} file (magic bytes {:?})", format.name, String::from_utf8_lossy(&h[..got.min(8)])),
        });
    }
    // The version is read before the checksum: a newer format may lay its header out
    // differently, and an old binary must say "unsupported", not call good data corrupt.
    if got >= 12 {
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(CoreError::Unsupported {
                source_name: source.to_string(),
                detail: format!(
                    "{} format version {version}; this build reads version {FORMAT_VERSION} (upgrade Synapse to read it)",
                    format.name
                ),
            });
        }
    }
    if got < h.len() {
        return Err(truncated(source, got as u64, format!("the {}-byte header is incomplete", format.header_len)));
    }
    let body = format.header_len - CHECK_LEN;
    if check(format.header_tag, &[&h[..body]])[..] != h[body..] {
        return Err(corrupt(source, body as u64, "header checksum does not match".into()));
    }
    let flags = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    if flags != 0 {
        return Err(CoreError::Unsupported {
            source_name: source.to_string(),
            detail: format!("unknown {} flags {flags:#x}", format.name),
        });
    }
    Ok(h[16..body].to_vec())
}

pub fn truncated(source: &str, offset: u64, detail: String) -> CoreError {
    CoreError::Truncated { source_name: source.to_string(), offset, detail }
}

pub fn corrupt(source: &str, offset: u64, detail: String) -> CoreError {
    CoreError::Corrupt { source_name: source.to_string(), offset, detail }
}

fn io_error(source: &str, e: std::io::Error) -> CoreError {
    CoreError::Io { path: source.into(), source: e }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8], source: &str) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(source, e)),
        }
    }
    Ok(got)
}

/// Appends records to chunks and writes each chunk once its payload reaches CHUNK_TARGET.
pub struct ChunkWriter<W: Write> {
    out: W,
    tag: &'static [u8; 8],
    seq: u64,
    count: u32,
    payload: Vec<u8>,
    written: u64,
}

impl<W: Write> ChunkWriter<W> {
    pub fn new(out: W, format: &Format, header_len: u64) -> Self {
        ChunkWriter { out, tag: format.chunk_tag, seq: 0, count: 0, payload: Vec::with_capacity(CHUNK_TARGET + 1024), written: header_len }
    }

    /// The open chunk's payload, to append one record to.
    pub fn record(&mut self) -> &mut Vec<u8> {
        self.count += 1;
        &mut self.payload
    }

    /// Closes the open chunk if it is full; call after each record.
    pub fn maybe_close(&mut self) -> std::io::Result<()> {
        if self.payload.len() >= CHUNK_TARGET {
            self.close_chunk()?;
        }
        Ok(())
    }

    fn close_chunk(&mut self) -> std::io::Result<()> {
        let count = self.count.to_le_bytes();
        let len = (self.payload.len() as u32).to_le_bytes();
        let c = check(self.tag, &[&self.seq.to_le_bytes(), &count, &len, &self.payload]);
        self.out.write_all(&count)?;
        self.out.write_all(&len)?;
        self.out.write_all(&self.payload)?;
        self.out.write_all(&c)?;
        self.written += (8 + self.payload.len() + CHECK_LEN) as u64;
        self.seq += 1;
        self.count = 0;
        self.payload.clear();
        Ok(())
    }

    /// Writes the last data chunk and the end chunk; returns the output and total bytes.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        if self.count > 0 {
            self.close_chunk()?;
        }
        self.close_chunk()?;
        Ok((self.out, self.written))
    }
}

pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Reads chunks back, verifying each check before its payload is used.
pub struct ChunkReader<R: Read> {
    input: R,
    tag: &'static [u8; 8],
    seq: u64,
    offset: u64,
    source: String,
    done: bool,
}

/// A verified chunk: its record count, payload, and the payload's offset in the file.
pub struct Chunk {
    pub count: u32,
    pub payload: Vec<u8>,
    pub offset: u64,
}

impl<R: Read> ChunkReader<R> {
    pub fn new(input: R, format: &Format, source: &str) -> Self {
        ChunkReader { input, tag: format.chunk_tag, seq: 0, offset: format.header_len as u64, source: source.to_string(), done: false }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The next data chunk, or None after the end chunk (and nothing after it).
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>> {
        if self.done {
            return Ok(None);
        }
        let start = self.offset;
        let mut head = [0u8; 8];
        let got = read_full(&mut self.input, &mut head, &self.source)?;
        if got < 8 {
            return Err(truncated(&self.source, start + got as u64, format!("chunk {} header is incomplete (no end chunk)", self.seq)));
        }
        let count = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as u64;
        // Read incrementally: a corrupt length must not allocate more than the file holds.
        let mut payload = Vec::new();
        let got = (&mut self.input).take(len).read_to_end(&mut payload).map_err(|e| io_error(&self.source, e))? as u64;
        if got < len {
            return Err(truncated(&self.source, start + 8 + got, format!("chunk {} declares {len} payload bytes, {got} present", self.seq)));
        }
        let mut c = [0u8; CHECK_LEN];
        let got = read_full(&mut self.input, &mut c, &self.source)?;
        if got < CHECK_LEN {
            return Err(truncated(&self.source, start + 8 + len + got as u64, format!("chunk {} checksum is incomplete", self.seq)));
        }
        let want = check(self.tag, &[&self.seq.to_le_bytes(), &head[..4], &head[4..], &payload]);
        if want != c {
            return Err(corrupt(&self.source, start, format!("chunk {} checksum does not match", self.seq)));
        }
        self.offset = start + 8 + len + CHECK_LEN as u64;
        self.seq += 1;
        if count == 0 && len == 0 {
            let mut extra = [0u8; 1];
            if read_full(&mut self.input, &mut extra, &self.source)? > 0 {
                return Err(corrupt(&self.source, self.offset, "data after the end chunk".into()));
            }
            self.done = true;
            return Ok(None);
        }
        if count == 0 {
            return Err(corrupt(&self.source, start, format!("chunk {} holds payload but no records", self.seq - 1)));
        }
        Ok(Some(Chunk { count, payload, offset: start + 8 }))
    }
}

/// Reads length-prefixed fields out of a verified payload.
pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
    source: &'a str,
}

impl<'a> Fields<'a> {
    pub fn new(chunk: &'a Chunk, source: &'a str) -> Self {
        Fields { buf: &chunk.payload, pos: 0, base: chunk.offset, source }
    }

    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(corrupt(self.source, self.offset(), format!("a record needs {n} bytes but its chunk ends first")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize;
        self.take(n)
    }

    pub fn finish(&self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(corrupt(self.source, self.offset(), "chunk holds bytes beyond its declared records".into()));
        }
        Ok(())
    }
}

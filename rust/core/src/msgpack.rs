//! The msgpack the replicated state is written in, as Python's `msgpack` (1.x, `use_bin_type=True`,
//! `raw=False`) reads and writes it: enough to decode a log entry and to encode records byte for
//! byte as `synapse/state/keys.py` does (the state digest covers those bytes).
//!
//! The reader is strict where the Python reader would fail (truncated data, trailing bytes, a
//! string that is not UTF-8) and returns `None` for anything it does not model (ext types,
//! nesting deeper than `MAX_DEPTH`): its caller then leaves the entry to the Python processor.

/// Deeper documents are never valid commands; the Python processor reports them.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Nil,
    Bool(bool),
    /// Every msgpack integer (uint 64 and int 64 both fit).
    Int(i128),
    Float(f64),
    Str(&'a str),
    Bin(&'a [u8]),
    Array(Vec<Value<'a>>),
    /// In document order, duplicates kept (Python keeps the last; callers refuse duplicates).
    Map(Vec<(Value<'a>, Value<'a>)>),
}

impl<'a> Value<'a> {
    pub fn as_str(&self) -> Option<&'a str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An integer in 0..=u64::MAX (a bool is not an integer).
    pub fn as_uint(&self) -> Option<u64> {
        match self {
            Value::Int(n) => u64::try_from(*n).ok(),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value<'a>]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The value of a string key of a map (None: not a map, no such key, or the key more
    /// than once — Python would read the last; a state this code wrote never repeats one).
    pub fn field(&self, name: &str) -> Option<&Value<'a>> {
        let Value::Map(pairs) = self else { return None };
        let mut found = pairs.iter().filter(|(k, _)| k.as_str() == Some(name));
        match (found.next(), found.next()) {
            (Some((_, v)), None) => Some(v),
            _ => None,
        }
    }
}

/// The one document `data` holds, or None (malformed, trailing bytes, unmodelled types).
pub fn decode(data: &[u8]) -> Option<Value<'_>> {
    let mut r = Reader { data, pos: 0 };
    let v = r.value(0)?;
    (r.pos == data.len()).then_some(v)
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn be(&mut self, n: usize) -> Option<u64> {
        Some(self.take(n)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn value(&mut self, depth: usize) -> Option<Value<'a>> {
        if depth > MAX_DEPTH {
            return None;
        }
        let m = self.take(1)?[0];
        Some(match m {
            0x00..=0x7f => Value::Int(i128::from(m)),
            0x80..=0x8f => self.map(usize::from(m & 0x0f), depth)?,
            0x90..=0x9f => self.array(usize::from(m & 0x0f), depth)?,
            0xa0..=0xbf => self.str(usize::from(m & 0x1f))?,
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let n = self.len(1 << (m - 0xc4))?;
                self.take(n).map(Value::Bin)?
            }
            0xca => Value::Float(f64::from(f32::from_bits(self.be(4)? as u32))),
            0xcb => Value::Float(f64::from_bits(self.be(8)?)),
            0xcc => Value::Int(i128::from(self.be(1)?)),
            0xcd => Value::Int(i128::from(self.be(2)?)),
            0xce => Value::Int(i128::from(self.be(4)?)),
            0xcf => Value::Int(i128::from(self.be(8)?)),
            0xd0 => Value::Int(i128::from(self.be(1)? as u8 as i8)),
            0xd1 => Value::Int(i128::from(self.be(2)? as u16 as i16)),
            0xd2 => Value::Int(i128::from(self.be(4)? as u32 as i32)),
            0xd3 => Value::Int(i128::from(self.be(8)? as i64)),
            // Lengths of 1, 2 or 4 bytes (str8/16/32), 2 or 4 (array16/32, map16/32).
            0xd9..=0xdb => {
                let n = self.len(1 << (m - 0xd9))?;
                self.str(n)?
            }
            0xdc | 0xdd => {
                let n = self.len(2 << (m - 0xdc))?;
                self.array(n, depth)?
            }
            0xde | 0xdf => {
                let n = self.len(2 << (m - 0xde))?;
                self.map(n, depth)?
            }
            0xe0..=0xff => Value::Int(i128::from(m as i8)),
            // 0xc1 (never used), ext and fixext: not modelled.
            _ => return None,
        })
    }

    fn str(&mut self, n: usize) -> Option<Value<'a>> {
        std::str::from_utf8(self.take(n)?).ok().map(Value::Str)
    }

    /// A big-endian length of `width` bytes.
    fn len(&mut self, width: usize) -> Option<usize> {
        usize::try_from(self.be(width)?).ok()
    }

    fn array(&mut self, n: usize, depth: usize) -> Option<Value<'a>> {
        // Every element takes at least one byte: a forged count cannot reserve more than the
        // data could hold.
        let mut items = Vec::with_capacity(n.min(self.data.len() - self.pos));
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Some(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Option<Value<'a>> {
        let mut pairs = Vec::with_capacity(n.min((self.data.len() - self.pos) / 2));
        for _ in 0..n {
            let k = self.value(depth + 1)?;
            // Python's reader (strict_map_key) refuses any other key type.
            if !matches!(k, Value::Str(_) | Value::Bin(_)) {
                return None;
            }
            let v = self.value(depth + 1)?;
            pairs.push((k, v));
        }
        Some(Value::Map(pairs))
    }
}

/// Appends msgpack to a buffer in the smallest form, as Python's `msgpack.packb` does.
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn new() -> Writer {
        Writer(Vec::new())
    }

    fn head(&mut self, fix: Option<u8>, n: usize, markers: [u8; 3]) {
        // `fix`: the fixed form's marker when `n` fits it; else 8-bit (if any), 16, 32-bit lengths.
        if let Some(f) = fix {
            self.0.push(f | n as u8);
        } else if n < 256 && markers[0] != 0 {
            self.0.extend_from_slice(&[markers[0], n as u8]);
        } else if n < 65_536 {
            self.0.push(markers[1]);
            self.0.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.0.push(markers[2]);
            self.0.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }

    pub fn uint(&mut self, n: u64) -> &mut Writer {
        if n < 128 {
            self.0.push(n as u8);
        } else if n < 256 {
            self.0.extend_from_slice(&[0xcc, n as u8]);
        } else if n < 65_536 {
            self.0.push(0xcd);
            self.0.extend_from_slice(&(n as u16).to_be_bytes());
        } else if n <= u64::from(u32::MAX) {
            self.0.push(0xce);
            self.0.extend_from_slice(&(n as u32).to_be_bytes());
        } else {
            self.0.push(0xcf);
            self.0.extend_from_slice(&n.to_be_bytes());
        }
        self
    }

    pub fn bool(&mut self, b: bool) -> &mut Writer {
        self.0.push(if b { 0xc3 } else { 0xc2 });
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Writer {
        let n = s.len();
        self.head((n < 32).then_some(0xa0), n, [0xd9, 0xda, 0xdb]);
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    pub fn bin(&mut self, b: &[u8]) -> &mut Writer {
        self.head(None, b.len(), [0xc4, 0xc5, 0xc6]);
        self.0.extend_from_slice(b);
        self
    }

    pub fn array(&mut self, n: usize) -> &mut Writer {
        self.head((n < 16).then_some(0x90), n, [0, 0xdc, 0xdd]);
        self
    }

    pub fn map(&mut self, n: usize) -> &mut Writer {
        self.head((n < 16).then_some(0x80), n, [0, 0xde, 0xdf]);
        self
    }
}

impl Default for Writer {
    fn default() -> Writer {
        Writer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_take_the_smallest_form_and_read_back() {
        for (n, len) in [(0u64, 1), (127, 1), (128, 2), (255, 2), (256, 3), (65_535, 3), (65_536, 5), (u64::from(u32::MAX), 5), (1 << 32, 9), (u64::MAX, 9)] {
            let mut w = Writer::new();
            w.uint(n);
            assert_eq!(w.0.len(), len, "{n}");
            assert_eq!(decode(&w.0), Some(Value::Int(i128::from(n))));
        }
    }

    #[test]
    fn strings_bins_arrays_and_maps_round_trip_at_every_length_boundary() {
        for n in [0usize, 15, 16, 31, 32, 255, 256, 65_535, 65_536] {
            let s = "x".repeat(n);
            let mut w = Writer::new();
            w.map(1).str(&s).array(n.min(20));
            for _ in 0..n.min(20) {
                w.bin(s.as_bytes());
            }
            let v = decode(&w.0).expect("decodes");
            assert_eq!(v.field(&s).and_then(|a| a.as_array()).map(|a| a.len()), Some(n.min(20)));
        }
    }

    #[test]
    fn malformed_documents_are_refused() {
        assert_eq!(decode(&[]), None); // empty
        assert_eq!(decode(&[0x92, 0x01]), None); // truncated array
        assert_eq!(decode(&[0x01, 0x02]), None); // trailing bytes
        assert_eq!(decode(&[0xa2, 0xff, 0xfe]), None); // not UTF-8
        assert_eq!(decode(&[0xa3, 0xed, 0xa0, 0x80]), None); // a surrogate: not UTF-8
        assert_eq!(decode(&[0xd4, 0x01, 0x00]), None); // ext
        assert_eq!(decode(&[0x81, 0x01, 0x02]), None); // an integer map key
        assert_eq!(decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]), None); // a forged count
        let deep: Vec<u8> = std::iter::repeat(0x91).take(MAX_DEPTH + 2).chain([0xc0]).collect();
        assert_eq!(decode(&deep), None);
        assert_eq!(decode(&[0xd0, 0xff]), Some(Value::Int(-1)));
        assert_eq!(decode(&[0xc3]), Some(Value::Bool(true)));
        let repeated = decode(&[0x82, 0xa1, b'a', 0x01, 0xa1, b'a', 0x02]).unwrap();
        assert_eq!(repeated.field("a"), None, "a repeated key is not read");
    }
}

//! Byte-level writing and reading of the stored state (pure logic, no I/O): LEB128 varints,
//! zigzag for signed numbers, little-endian `f64`, length-prefixed strings. The record layout
//! built from these lives with the types ([`crate::agg`], [`crate::features`],
//! [`crate::emitted`], [`crate::record`]); this module only knows bytes.
//!
//! A [`Reader`] never panics and never allocates more than the input can hold: a length larger
//! than the bytes left is an error, as is reading past the end.

/// Appends `v` as an unsigned LEB128 varint (1 byte below 128, at most 10).
pub fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `v` zigzag-encoded (small magnitudes of either sign are short).
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_u64(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// Appends the 8 bytes of `v` (little-endian; every bit pattern, NaN and −0 included, survives).
///
/// (`extend` of the array, not `extend_from_slice`: the latter became a `memmove` call per
/// number in the worker's build, several per encoded key.)
pub fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend(v.to_le_bytes());
}

/// Appends a length-prefixed string (short ones byte by byte, for the reason of [`put_f64`]).
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    if s.len() <= 16 {
        out.extend(s.bytes());
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

/// Reads what the `put_*` functions wrote.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads from the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// Whether every byte has been read.
    pub fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn short(&self, what: &str) -> String {
        format!("{} bytes: ends inside {what} at byte {}", self.bytes.len(), self.pos)
    }

    /// One byte.
    pub fn u8(&mut self, what: &str) -> Result<u8, String> {
        let b = *self.bytes.get(self.pos).ok_or_else(|| self.short(what))?;
        self.pos += 1;
        Ok(b)
    }

    /// An unsigned varint.
    pub fn u64(&mut self, what: &str) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("{what}: a varint longer than 10 bytes at byte {}", self.pos))
    }

    /// A zigzag varint.
    pub fn i64(&mut self, what: &str) -> Result<i64, String> {
        let u = self.u64(what)?;
        Ok((u >> 1) as i64 ^ -((u & 1) as i64))
    }

    /// A count of items of at least `min_bytes` each: refused when the bytes left cannot hold
    /// that many (a corrupt length never becomes a huge allocation).
    pub fn len(&mut self, what: &str, min_bytes: usize) -> Result<usize, String> {
        let n = self.u64(what)?;
        if n.saturating_mul(min_bytes.max(1) as u64) > self.remaining() as u64 {
            return Err(format!("{what}: length {n} at byte {} exceeds the {} bytes left", self.pos, self.remaining()));
        }
        Ok(n as usize)
    }

    /// 8 little-endian bytes.
    pub fn f64(&mut self, what: &str) -> Result<f64, String> {
        let end = self.pos + 8;
        let b = self.bytes.get(self.pos..end).ok_or_else(|| self.short(what))?;
        self.pos = end;
        Ok(f64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self, what: &str) -> Result<String, String> {
        self.str_ref(what).map(str::to_owned)
    }

    /// A length-prefixed UTF-8 string, borrowed from the input.
    pub fn str_ref(&mut self, what: &str) -> Result<&'a str, String> {
        let n = self.len(what, 1)?;
        let b: &'a [u8] = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        std::str::from_utf8(b).map_err(|_| format!("{what}: not UTF-8 at byte {}", self.pos - n))
    }

    /// An error unless every byte has been read.
    pub fn finish(&self, what: &str) -> Result<(), String> {
        if self.at_end() {
            Ok(())
        } else {
            Err(format!("{what}: {} bytes left over at byte {}", self.remaining(), self.pos))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_at_their_edges_and_are_short_when_small() {
        let mut out = Vec::new();
        let us = [0, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX];
        let is = [0, -1, 1, -64, 63, -65, 64, i64::MIN, i64::MAX, 1_795_500_000_000];
        let fs = [0.0, -0.0, 1.5, f64::NAN, f64::INFINITY, -1e300, f64::MIN_POSITIVE];
        us.iter().for_each(|v| put_u64(&mut out, *v));
        is.iter().for_each(|v| put_i64(&mut out, *v));
        fs.iter().for_each(|v| put_f64(&mut out, *v));
        put_str(&mut out, "purchase");
        put_str(&mut out, "");
        let mut r = Reader::new(&out);
        for v in us {
            assert_eq!(r.u64("u").unwrap(), v);
        }
        for v in is {
            assert_eq!(r.i64("i").unwrap(), v);
        }
        for v in fs {
            assert_eq!(r.f64("f").unwrap().to_bits(), v.to_bits());
        }
        assert_eq!(r.str("s").unwrap(), "purchase");
        assert_eq!(r.str("s").unwrap(), "");
        r.finish("all").unwrap();
        // Sizes: 1 byte up to 127 (unsigned) and ±63 (signed); 10 bytes at most.
        let size = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut o = Vec::new();
            f(&mut o);
            o.len()
        };
        assert_eq!(size(&|o| put_u64(o, 127)), 1);
        assert_eq!(size(&|o| put_u64(o, 128)), 2);
        assert_eq!(size(&|o| put_i64(o, -64)), 1);
        assert_eq!(size(&|o| put_u64(o, u64::MAX)), 10);
    }

    #[test]
    fn short_and_corrupt_input_is_an_error_never_a_panic_or_a_huge_allocation() {
        assert!(Reader::new(&[]).u8("x").unwrap_err().contains("ends inside x"));
        assert!(Reader::new(&[0x80]).u64("x").is_err());
        assert!(Reader::new(&[0xff; 11]).u64("x").unwrap_err().contains("longer than 10"));
        assert!(Reader::new(&[1, 2, 3]).f64("x").is_err());
        // A length of 2^63 with 2 bytes left.
        let mut out = Vec::new();
        put_u64(&mut out, 1 << 63);
        out.extend_from_slice(b"ab");
        assert!(Reader::new(&out).len("list", 1).unwrap_err().contains("exceeds"));
        assert!(Reader::new(&out).str("s").is_err());
        assert!(Reader::new(&[2, 0xff, 0xfe]).str("s").unwrap_err().contains("UTF-8"));
        let r = Reader::new(&[1]);
        assert!(r.finish("rec").unwrap_err().contains("1 bytes left over"));
    }
}

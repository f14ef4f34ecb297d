//! The compact binary encoding of message fields: big-endian integers, length-prefixed byte
//! strings and counted lists. Decoding trusts no length: every read is bounds-checked against
//! the payload, so a hostile payload can cause an error but never a panic or a huge allocation.

use std::fmt;

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Appends fields to a buffer. The first bytes of the buffer may be reserved for a frame header
/// (see `frame::encode`), so a message is encoded once and sent with a single write.
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An encoder whose buffer starts with `reserved` zero bytes.
    pub fn with_reserved(reserved: usize) -> Encoder {
        Encoder { buf: vec![0; reserved] }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }

    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    /// A u32 length followed by the bytes. Lengths beyond u32 cannot occur: the frame limit is
    /// far smaller, and `frame::encode` rejects oversized payloads before anything is sent.
    pub fn bytes(&mut self, v: &[u8]) {
        self.count(v.len());
        self.buf.extend_from_slice(v);
    }

    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    /// A list or byte-string length, saturated at u32::MAX (such a payload fails the frame limit).
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }

    pub fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }

    pub fn strings(&mut self, v: &[String]) {
        self.count(v.len());
        for s in v {
            self.str(s);
        }
    }

    pub fn pairs(&mut self, v: &[(String, String)]) {
        self.count(v.len());
        for (k, val) in v {
            self.str(k);
            self.str(val);
        }
    }
}

/// Reads fields from a payload in order. `finish` rejects trailing bytes, so every byte of a
/// frame is accounted for.
pub struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(data: &'a [u8]) -> Decoder<'a> {
        Decoder { data, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let remaining = self.data.len() - self.pos;
        if n > remaining {
            return Err(DecodeError(format!(
                "payload ends inside {what} at offset {} (needs {n} bytes, {remaining} left)",
                self.pos
            )));
        }
        let slice = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1, "a u8")?[0])
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError(format!("invalid boolean byte {other} at offset {}", self.pos - 1))),
        }
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array("a u16")?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array("a u32")?))
    }

    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array("an i32")?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array("a u64")?))
    }

    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array("an i64")?))
    }

    pub fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let len = self.u32()? as usize;
        Ok(self.take(len, "a byte string")?.to_vec())
    }

    pub fn string(&mut self) -> Result<String, DecodeError> {
        let at = self.pos;
        let raw = self.bytes()?;
        String::from_utf8(raw).map_err(|_| DecodeError(format!("string at offset {at} is not UTF-8")))
    }

    /// A list length, checked against the bytes left: each item takes at least `min_item_len`
    /// bytes, so a forged count cannot make the caller reserve more than the payload's size.
    pub fn count(&mut self, min_item_len: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.u32()? as usize;
        let remaining = self.data.len() - self.pos;
        if n.saturating_mul(min_item_len.max(1)) > remaining {
            return Err(DecodeError(format!("list at offset {at} claims {n} items but only {remaining} bytes follow")));
        }
        Ok(n)
    }

    pub fn opt_string(&mut self) -> Result<Option<String>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            other => Err(DecodeError(format!("invalid option tag {other} at offset {}", self.pos - 1))),
        }
    }

    pub fn strings(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.count(4)?;
        (0..n).map(|_| self.string()).collect()
    }

    pub fn pairs(&mut self) -> Result<Vec<(String, String)>, DecodeError> {
        let n = self.count(8)?;
        (0..n).map(|_| Ok((self.string()?, self.string()?))).collect()
    }

    /// Whether every byte was read: an optional field added at the end of a message is absent
    /// when its sender predates it.
    pub fn at_end(&self) -> bool {
        self.pos == self.data.len()
    }

    /// Succeeds only if the whole payload was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(DecodeError(format!("{} unexpected trailing bytes", self.data.len() - self.pos)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let mut e = Encoder::with_reserved(0);
        e.u8(7);
        e.bool(true);
        e.u16(0xBEEF);
        e.u32(0xDEAD_BEEF);
        e.i32(-5);
        e.u64(u64::MAX - 1);
        e.i64(i64::MIN);
        e.bytes(&[0, 255, 10]);
        e.str("héllo");
        e.opt_str(None);
        e.opt_str(Some("x"));
        e.strings(&["a".into(), String::new()]);
        e.pairs(&[("K".into(), "V".into())]);
        let buf = e.into_inner();

        let mut d = Decoder::new(&buf);
        assert_eq!(d.u8().unwrap(), 7);
        assert!(d.bool().unwrap());
        assert_eq!(d.u16().unwrap(), 0xBEEF);
        assert_eq!(d.u32().unwrap(), 0xDEAD_BEEF);
        assert_eq!(d.i32().unwrap(), -5);
        assert_eq!(d.u64().unwrap(), u64::MAX - 1);
        assert_eq!(d.i64().unwrap(), i64::MIN);
        assert_eq!(d.bytes().unwrap(), vec![0, 255, 10]);
        assert_eq!(d.string().unwrap(), "héllo");
        assert_eq!(d.opt_string().unwrap(), None);
        assert_eq!(d.opt_string().unwrap(), Some("x".to_string()));
        assert_eq!(d.strings().unwrap(), vec!["a".to_string(), String::new()]);
        assert_eq!(d.pairs().unwrap(), vec![("K".to_string(), "V".to_string())]);
        d.finish().unwrap();
    }

    #[test]
    fn reserved_prefix_is_kept() {
        let mut e = Encoder::with_reserved(3);
        e.u8(9);
        assert_eq!(e.into_inner(), vec![0, 0, 0, 9]);
    }

    #[test]
    fn truncated_fields_are_errors() {
        assert!(Decoder::new(&[0, 0, 1]).u32().is_err());
        // A byte string claiming 10 bytes with 2 present.
        assert!(Decoder::new(&[0, 0, 0, 10, 1, 2]).bytes().is_err());
        assert!(Decoder::new(&[]).u8().is_err());
    }

    #[test]
    fn forged_counts_are_rejected_before_allocation() {
        let err = Decoder::new(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0]).strings().unwrap_err();
        assert!(err.0.contains("claims"), "{err}");
    }

    #[test]
    fn invalid_bool_option_and_utf8_are_errors() {
        assert!(Decoder::new(&[2]).bool().is_err());
        assert!(Decoder::new(&[3]).opt_string().is_err());
        assert!(Decoder::new(&[0, 0, 0, 2, 0xC3, 0x28]).string().is_err());
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut d = Decoder::new(&[1, 2]);
        d.u8().unwrap();
        assert!(d.finish().is_err());
    }
}

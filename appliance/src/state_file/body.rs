//! The body codec of state files: little-endian integers, length-prefixed strings and
//! counts, every length checked before use; and the parsers of the pre-format files.

use super::Malformed;

/// Builds a body: little-endian integers and length-prefixed strings.
#[derive(Default)]
pub(super) struct BodyWriter(pub(super) Vec<u8>);

impl BodyWriter {
    pub(super) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(super) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(super) fn str(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
}

/// Reads a body, checking every length against what is left before using it.
pub(super) struct BodyReader<'a> {
    rest: &'a [u8],
}

impl<'a> BodyReader<'a> {
    pub(super) fn new(body: &'a [u8]) -> Self {
        BodyReader { rest: body }
    }
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.rest.len() < n {
            return Err(format!(
                "body ends early ({} bytes left, {n} needed)",
                self.rest.len()
            )
            .into());
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    pub(super) fn u32(&mut self) -> Result<u32, Malformed> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    pub(super) fn u64(&mut self) -> Result<u64, Malformed> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    pub(super) fn str(&mut self) -> Result<String, Malformed> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Malformed::from("a name is not UTF-8"))
    }
    /// A count of items of at least `item_len` bytes each, checked against what is left
    /// so a bad count cannot make the reader allocate.
    pub(super) fn count(&mut self, item_len: usize) -> Result<usize, Malformed> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item_len) > self.rest.len() {
            return Err(format!("count {n} does not fit the body").into());
        }
        Ok(n)
    }
    pub(super) fn finish(self) -> Result<(), Malformed> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes after the last field", self.rest.len()).into())
        }
    }
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Malformed> {
    serde_json::from_slice(bytes).map_err(|e| Malformed(format!("unreadable: {e}")))
}

pub(super) fn parse_decimal(bytes: &[u8]) -> Result<u64, Malformed> {
    std::str::from_utf8(bytes)
        .map_err(|_| Malformed::from("not text"))?
        .trim()
        .parse()
        .map_err(|e| Malformed(format!("not a number: {e}")))
}

//! Chunked transfer coding: an incremental decoder with bounded state and an encoder.

use std::fmt;

const MAX_SIZE_DIGITS: usize = 16;
const MAX_EXTENSION_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkError {
    BadSize,
    SizeTooLarge,
    ExtensionTooLong,
    MissingCrlf,
    TrailersTooLarge,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BadSize => "malformed chunk size",
            Self::SizeTooLarge => "chunk size too large",
            Self::ExtensionTooLong => "chunk extension too long",
            Self::MissingCrlf => "chunk not terminated by CRLF",
            Self::TrailersTooLarge => "trailer section too large",
        })
    }
}

impl std::error::Error for ChunkError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Size { digits: usize },
    SizeWhitespace,
    Extension { len: usize },
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerLineStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// Incremental decoder: feed raw bytes, get body bytes; stops exactly at the end
/// of the message so the following bytes belong to the next request.
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    trailers: Vec<u8>,
    max_trailer_bytes: usize,
}

impl ChunkedDecoder {
    pub fn new(max_trailer_bytes: usize) -> Self {
        Self { state: State::Size { digits: 0 }, size: 0, trailers: Vec::new(), max_trailer_bytes }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Raw trailer field lines, each ending in CRLF (empty when there were none).
    pub fn trailers(&self) -> &[u8] {
        &self.trailers
    }

    /// Decodes from `input`, appending body bytes to `out`. Returns how many input
    /// bytes were consumed; fewer than `input.len()` only once the message is done.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let take = usize::try_from(self.size).unwrap_or(usize::MAX).min(input.len() - i);
                out.extend_from_slice(&input[i..i + take]);
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = input[i];
            self.state = match self.state {
                State::Size { digits } => match hex_value(b) {
                    Some(v) => {
                        if digits == MAX_SIZE_DIGITS || self.size > (u64::MAX >> 4) {
                            return Err(ChunkError::SizeTooLarge);
                        }
                        self.size = (self.size << 4) | u64::from(v);
                        State::Size { digits: digits + 1 }
                    }
                    None if digits == 0 => return Err(ChunkError::BadSize),
                    None => self.after_size(b)?,
                },
                State::SizeWhitespace => self.after_size(b)?,
                State::Extension { len } => match b {
                    b'\r' => State::SizeLf,
                    b'\n' => return Err(ChunkError::MissingCrlf),
                    _ if len == MAX_EXTENSION_BYTES => return Err(ChunkError::ExtensionTooLong),
                    _ => State::Extension { len: len + 1 },
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    if self.size == 0 {
                        State::TrailerLineStart
                    } else {
                        State::Data
                    }
                }
                State::Data => State::Data,
                State::DataCr => expect_byte(b, b'\r', State::DataLf)?,
                State::DataLf => {
                    expect_byte(b, b'\n', State::Size { digits: 0 })?;
                    self.size = 0;
                    State::Size { digits: 0 }
                }
                State::TrailerLineStart => {
                    if b == b'\r' {
                        State::FinalLf
                    } else {
                        self.push_trailer(b)?;
                        State::TrailerLine
                    }
                }
                State::TrailerLine => {
                    self.push_trailer(b)?;
                    match b {
                        b'\r' => State::TrailerLf,
                        b'\n' => return Err(ChunkError::MissingCrlf),
                        _ => State::TrailerLine,
                    }
                }
                State::TrailerLf => {
                    self.push_trailer(b)?;
                    expect_byte(b, b'\n', State::TrailerLineStart)?
                }
                State::FinalLf => expect_byte(b, b'\n', State::Done)?,
                State::Done => return Ok(i),
            };
            i += 1;
            if self.state == State::Done {
                return Ok(i);
            }
        }
        Ok(i)
    }

    fn after_size(&mut self, b: u8) -> Result<State, ChunkError> {
        match b {
            b' ' | b'\t' => Ok(State::SizeWhitespace),
            b';' => Ok(State::Extension { len: 0 }),
            b'\r' => Ok(State::SizeLf),
            _ => Err(ChunkError::BadSize),
        }
    }

    fn push_trailer(&mut self, b: u8) -> Result<(), ChunkError> {
        if self.trailers.len() >= self.max_trailer_bytes {
            return Err(ChunkError::TrailersTooLarge);
        }
        self.trailers.push(b);
        Ok(())
    }
}

fn expect_byte(b: u8, want: u8, next: State) -> Result<State, ChunkError> {
    if b == want {
        Ok(next)
    } else {
        Err(ChunkError::MissingCrlf)
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends one chunk. An empty `data` would end the body, so it writes nothing.
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

const CHUNK_SIZE_DIGITS: usize = 8;

/// Starts a chunk whose data the caller appends to `wire` next: a fixed-width size
/// placeholder (leading zeros are valid), so a chunk is assembled with one copy.
/// Returns where the chunk starts, for [`end_chunk`].
pub fn begin_chunk(wire: &mut Vec<u8>) -> usize {
    let at = wire.len();
    wire.extend_from_slice(b"00000000\r\n");
    at
}

/// Fills in the size of the chunk begun at `at`, or removes it if empty (an empty
/// chunk would end the body).
pub fn end_chunk(wire: &mut Vec<u8>, at: usize) {
    let data_len = wire.len() - at - CHUNK_SIZE_DIGITS - 2;
    if data_len == 0 {
        wire.truncate(at);
        return;
    }
    let digits = format!("{data_len:0CHUNK_SIZE_DIGITS$x}");
    if digits.len() == CHUNK_SIZE_DIGITS {
        wire[at..at + CHUNK_SIZE_DIGITS].copy_from_slice(digits.as_bytes());
        wire.extend_from_slice(b"\r\n");
    } else {
        // Over 4 GiB in one chunk cannot happen with bounded reads; re-encode anyway.
        let data = wire.split_off(at + CHUNK_SIZE_DIGITS + 2);
        wire.truncate(at);
        encode_chunk(&data, wire);
    }
}

/// Appends the last chunk and the trailer section (`trailers`: lines ending in CRLF).
pub fn encode_last(trailers: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    out.extend_from_slice(trailers);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(pieces: &[&[u8]]) -> Result<(Vec<u8>, Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::new(1024);
        let mut out = Vec::new();
        let mut consumed = 0;
        for p in pieces {
            consumed += d.decode(p, &mut out)?;
        }
        assert!(d.is_done());
        Ok((out, d.trailers().to_vec(), consumed))
    }

    #[test]
    fn decodes_across_every_split_and_stops_at_message_end() {
        let wire = b"5;ext=\"x\"\r\nhello\r\nA \r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let body_end = wire.len() - 4;
        for k in 0..=wire.len() {
            let (out, trailers, consumed) = decode_all(&[&wire[..k], &wire[k..]]).unwrap();
            assert_eq!(out, b"hello0123456789");
            assert_eq!(trailers, b"X-T: 1\r\n");
            assert_eq!(consumed, body_end, "split {k}");
        }
    }

    #[test]
    fn rejects_malformed_chunks() {
        let bad = |w: &[u8]| {
            let mut d = ChunkedDecoder::new(16);
            d.decode(w, &mut Vec::new()).err()
        };
        assert_eq!(bad(b"g\r\n"), Some(ChunkError::BadSize));
        assert_eq!(bad(b"\r\n"), Some(ChunkError::BadSize));
        assert_eq!(bad(b"11111111111111111\r\n"), Some(ChunkError::SizeTooLarge));
        assert_eq!(bad(b"1\nx"), Some(ChunkError::BadSize));
        assert_eq!(bad(b"1\r\nxy"), Some(ChunkError::MissingCrlf));
        assert_eq!(bad(b"0\r\nA-very-long-trailer-line: 1234567890\r\n\r\n"), Some(ChunkError::TrailersTooLarge));
    }

    #[test]
    fn encoder_round_trips_through_decoder() {
        let mut wire = Vec::new();
        encode_chunk(b"abc", &mut wire);
        encode_chunk(b"", &mut wire);
        encode_chunk(&[7u8; 300], &mut wire);
        encode_last(b"", &mut wire);
        let (out, trailers, consumed) = decode_all(&[&wire]).unwrap();
        assert_eq!(out.len(), 303);
        assert!(trailers.is_empty());
        assert_eq!(consumed, wire.len());
    }
}

//! The frame reader (`frame::read_frame`) on an arbitrary byte stream delivered in arbitrary
//! pieces (with `Interrupted` errors mixed in), as either end of the agent protocol reads it.
//! It must never panic or hang, must split the stream exactly as a whole-buffer reference
//! built on `frame::parse_header` does, and every frame it returns is decoded as a request and
//! as a reply (a decoded value must re-encode to the same frame).
//! Input: byte 0 is the length of a read-size pattern that follows (0 in the pattern means
//! "fail this read with Interrupted"); the rest is the stream.
#![no_main]

use agent_protocol::frame::{self, FrameError, HEADER_LEN, MAGIC, MAX_PAYLOAD};
use agent_protocol::message::{Reply, Request};
use agent_protocol::transport::TimedRead;
use libfuzzer_sys::fuzz_target;
use std::io::{self, Read};
use std::time::Duration;

/// A stream that hands out `data` in pieces whose sizes cycle through `pattern`. A 0 fails the
/// read with `Interrupted`, but never twice in a row (a signal does not arrive forever).
struct Pieces<'a> {
    data: &'a [u8],
    pos: usize,
    pattern: &'a [u8],
    turn: usize,
    interrupted: bool,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size =
            if self.pattern.is_empty() { usize::MAX } else { self.pattern[self.turn % self.pattern.len()] as usize };
        self.turn += 1;
        if size == 0 && !self.interrupted && self.pos < self.data.len() {
            self.interrupted = true;
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        self.interrupted = false;
        let n = size.max(1).min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl TimedRead for Pieces<'_> {
    fn set_read_timeout(&self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// How the reference ends: the kind of error `read_frame` must report.
#[derive(Debug, PartialEq)]
enum End {
    Closed,
    Truncated,
    BadMagic(u8),
    UnsupportedVersion(u8),
    TooLarge(u64),
}

/// The frames of `stream` read with whole-buffer slicing, and how the stream ends.
fn reference(mut stream: &[u8]) -> (Vec<(u8, &[u8])>, End) {
    let mut frames = Vec::new();
    loop {
        let Some(&first) = stream.first() else { return (frames, End::Closed) };
        if first != MAGIC[0] {
            return (frames, End::BadMagic(first));
        }
        if stream.len() < HEADER_LEN {
            return (frames, End::Truncated);
        }
        let (kind, len) = match frame::parse_header(&stream[..HEADER_LEN]) {
            Ok(header) => header,
            Err(FrameError::BadMagic(b)) => return (frames, End::BadMagic(b)),
            Err(FrameError::UnsupportedVersion(v)) => return (frames, End::UnsupportedVersion(v)),
            Err(FrameError::TooLarge(n)) => return (frames, End::TooLarge(n)),
            Err(other) => panic!("parse_header on a full header: {other:?}"),
        };
        let end = HEADER_LEN + len as usize;
        if stream.len() < end {
            return (frames, End::Truncated);
        }
        frames.push((kind, &stream[HEADER_LEN..end]));
        stream = &stream[end..];
    }
}

fn check_decodes(kind: u8, payload: &[u8]) {
    if let Ok(request) = Request::decode(kind, payload) {
        let bytes = request.to_frame().expect("fits a frame");
        assert_eq!(&bytes[HEADER_LEN..], payload);
        assert_eq!(bytes[3], kind);
    }
    if let Ok(reply) = Reply::decode(kind, payload) {
        let bytes = reply.to_frame().expect("fits a frame");
        assert_eq!(&bytes[HEADER_LEN..], payload);
        assert_eq!(bytes[3], kind);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pattern_len, rest)) = data.split_first() else { return };
    let pattern_len = usize::from(pattern_len % 8).min(rest.len());
    let (pattern, stream) = rest.split_at(pattern_len);
    let (expected, expected_end) = reference(stream);

    let mut reader = Pieces { data: stream, pos: 0, pattern, turn: 0, interrupted: false };
    let long = Duration::from_secs(60);
    let mut got = 0;
    let end = loop {
        match frame::read_frame(&mut reader, Some(long), long) {
            Ok(f) => {
                assert!(f.payload.len() <= MAX_PAYLOAD);
                let (kind, payload) = expected.get(got).copied().expect("read_frame returned an extra frame");
                assert_eq!(f.kind, kind);
                assert_eq!(f.payload, payload);
                check_decodes(f.kind, &f.payload);
                got += 1;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(got, expected.len(), "read_frame stopped early with {end:?}");
    let end = match end {
        FrameError::Closed => End::Closed,
        FrameError::Truncated { got, want } => {
            assert!(got < want);
            End::Truncated
        }
        FrameError::BadMagic(b) => End::BadMagic(b),
        FrameError::UnsupportedVersion(v) => End::UnsupportedVersion(v),
        FrameError::TooLarge(n) => End::TooLarge(n),
        other => panic!("unexpected end of a non-blocking stream: {other:?}"),
    };
    assert_eq!(end, expected_end);
});

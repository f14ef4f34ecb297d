//! Framing: every message travels as an 8-byte header (magic `OC`, protocol version, message
//! kind, payload length as u32 big-endian) followed by at most `MAX_PAYLOAD` bytes of payload.
//! Reading is bounded in size and in time, so a peer can make a read fail but never hang it.

use crate::transport::TimedRead;
use std::fmt;
use std::io;
use std::time::{Duration, Instant};

pub const MAGIC: [u8; 2] = *b"OC";
/// The protocol version carried in every header. A receiver rejects any other version.
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
/// The largest payload either side sends or accepts (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// One received frame, its payload not yet decoded.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    Closed,
    /// No frame began within the idle timeout.
    Idle,
    /// The peer closed the connection inside a frame.
    Truncated {
        got: usize,
        want: usize,
    },
    /// A frame began but was not complete within the frame timeout.
    Stalled {
        got: usize,
        want: usize,
    },
    BadMagic(u8),
    UnsupportedVersion(u8),
    TooLarge(u64),
    Io(io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Closed => write!(f, "connection closed"),
            FrameError::Idle => write!(f, "no frame arrived within the timeout"),
            FrameError::Truncated { got, want } => {
                write!(f, "connection closed inside a frame ({got} of {want} bytes)")
            }
            FrameError::Stalled { got, want } => {
                write!(f, "frame incomplete after the frame timeout ({got} of {want} bytes)")
            }
            FrameError::BadMagic(byte) => {
                write!(f, "not an agent protocol frame (byte 0x{byte:02x} where the magic \"OC\" belongs)")
            }
            FrameError::UnsupportedVersion(v) => {
                write!(f, "unsupported protocol version {v} (this side speaks version {VERSION})")
            }
            FrameError::TooLarge(len) => {
                write!(f, "frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD} bytes")
            }
            FrameError::Io(e) => write!(f, "connection error: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Fills in the header of `buf`, whose first `HEADER_LEN` bytes were reserved for it.
pub fn seal(mut buf: Vec<u8>, kind: u8) -> Result<Vec<u8>, FrameError> {
    let payload_len = buf.len().saturating_sub(HEADER_LEN);
    if buf.len() < HEADER_LEN || payload_len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(payload_len as u64));
    }
    buf[..2].copy_from_slice(&MAGIC);
    buf[2] = VERSION;
    buf[3] = kind;
    buf[4..8].copy_from_slice(&(payload_len as u32).to_be_bytes());
    Ok(buf)
}

/// Validates a header and returns (kind, payload length).
pub fn parse_header(header: &[u8]) -> Result<(u8, u32), FrameError> {
    if header.len() < HEADER_LEN {
        return Err(FrameError::Truncated { got: header.len(), want: HEADER_LEN });
    }
    if let Some(pos) = (0..2).find(|&i| header[i] != MAGIC[i]) {
        return Err(FrameError::BadMagic(header[pos]));
    }
    if header[2] != VERSION {
        return Err(FrameError::UnsupportedVersion(header[2]));
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if len as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(u64::from(len)));
    }
    Ok((header[3], len))
}

/// Reads one frame. `idle` bounds the wait for its first byte (None: wait as long as it takes);
/// once it has begun, the whole frame must arrive within `within`.
pub fn read_frame<R: TimedRead>(r: &mut R, idle: Option<Duration>, within: Duration) -> Result<Frame, FrameError> {
    r.set_read_timeout(idle.map(at_least_1ms)).map_err(FrameError::Io)?;
    let mut header = [0u8; HEADER_LEN];
    loop {
        match r.read(&mut header[..1]) {
            Ok(0) => return Err(FrameError::Closed),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(FrameError::Idle),
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    // Reject garbage at once rather than waiting for a header that will never make sense.
    if header[0] != MAGIC[0] {
        return Err(FrameError::BadMagic(header[0]));
    }
    let deadline = Instant::now() + within;
    fill(r, &mut header, 1, deadline, HEADER_LEN)?;
    let (kind, len) = parse_header(&header)?;
    let want = HEADER_LEN + len as usize;
    let mut payload = vec![0u8; len as usize];
    fill(r, &mut payload, 0, deadline, want).map_err(|e| match e {
        FrameError::Truncated { got, .. } => FrameError::Truncated { got: HEADER_LEN + got, want },
        FrameError::Stalled { got, .. } => FrameError::Stalled { got: HEADER_LEN + got, want },
        other => other,
    })?;
    Ok(Frame { kind, payload })
}

/// Fills `buf[from..]` before `deadline`.
fn fill<R: TimedRead>(
    r: &mut R,
    buf: &mut [u8],
    from: usize,
    deadline: Instant,
    want: usize,
) -> Result<(), FrameError> {
    let mut got = from;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FrameError::Stalled { got, want });
        }
        r.set_read_timeout(Some(at_least_1ms(left))).map_err(FrameError::Io)?;
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(FrameError::Truncated { got, want }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(FrameError::Stalled { got, want }),
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

/// A zero timeout means "block forever" to the socket layer, so round up.
fn at_least_1ms(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// SO_RCVTIMEO expiry shows up as EAGAIN on Linux sockets.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    const SHORT: Duration = Duration::from_millis(200);

    fn frame_bytes(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; HEADER_LEN];
        buf.extend_from_slice(payload);
        seal(buf, kind).unwrap()
    }

    #[test]
    fn a_frame_round_trips_over_a_socket() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&frame_bytes(0x42, b"payload")).unwrap();
        let frame = read_frame(&mut b, Some(SHORT), SHORT).unwrap();
        assert_eq!(frame.kind, 0x42);
        assert_eq!(frame.payload, b"payload");
    }

    #[test]
    fn header_fields_are_checked() {
        let good = frame_bytes(1, &[]);
        assert!(parse_header(&good).is_ok());
        let mut bad = good.clone();
        bad[1] = b'X';
        assert!(matches!(parse_header(&bad), Err(FrameError::BadMagic(b'X'))));
        let mut bad = good.clone();
        bad[2] = 9;
        assert!(matches!(parse_header(&bad), Err(FrameError::UnsupportedVersion(9))));
        let mut bad = good;
        bad[4..8].copy_from_slice(&((MAX_PAYLOAD as u32) + 1).to_be_bytes());
        assert!(matches!(parse_header(&bad), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn the_largest_payload_is_accepted_and_one_more_byte_is_not() {
        assert!(seal(vec![0; HEADER_LEN + MAX_PAYLOAD], 1).is_ok());
        assert!(matches!(seal(vec![0; HEADER_LEN + MAX_PAYLOAD + 1], 1), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn eof_between_frames_is_closed_and_inside_a_frame_is_truncated() {
        let (a, mut b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(read_frame(&mut b, Some(SHORT), SHORT), Err(FrameError::Closed)));

        let (mut a, mut b) = UnixStream::pair().unwrap();
        let bytes = frame_bytes(1, b"0123456789");
        a.write_all(&bytes[..12]).unwrap();
        drop(a);
        match read_frame(&mut b, Some(SHORT), SHORT) {
            Err(FrameError::Truncated { got, want }) => assert_eq!((got, want), (12, 18)),
            other => panic!("expected truncation, got {other:?}"),
        }
    }

    #[test]
    fn a_stalled_frame_times_out_and_an_idle_connection_is_reported() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        assert!(matches!(read_frame(&mut b, Some(SHORT), SHORT), Err(FrameError::Idle)));
        a.write_all(&frame_bytes(1, b"abc")[..10]).unwrap();
        let started = Instant::now();
        assert!(matches!(read_frame(&mut b, None, SHORT), Err(FrameError::Stalled { got: 10, want: 11 })));
        assert!(started.elapsed() < Duration::from_secs(2));
        // A header cut short stalls the same way.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"OC\x01").unwrap();
        assert!(matches!(read_frame(&mut b, None, SHORT), Err(FrameError::Stalled { got: 3, want: 8 })));
    }

    #[test]
    fn garbage_is_rejected_on_its_first_byte() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"G").unwrap();
        // No further bytes: the reader must not wait for a full header to decide.
        assert!(matches!(read_frame(&mut b, Some(SHORT), Duration::from_secs(30)), Err(FrameError::BadMagic(b'G'))));
    }
}

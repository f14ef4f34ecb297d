//! Server side of RFC 6455, as much as exec sessions need: the handshake key,
//! reading masked client frames (with fragmentation, ping/pong, close) and writing
//! unmasked binary frames.

use std::io::{self, Read, Write};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest message a client may send (stdin chunks are small).
pub const MAX_MESSAGE: usize = 1 << 20;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(client_key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(client_key.trim().as_bytes());
    sha.update(GUID.as_bytes());
    base64(&sha.digest().bytes())
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close,
}

#[derive(Debug)]
pub enum WsError {
    Io(io::Error),
    /// The client broke the protocol; the u16 is the close code to send.
    Protocol(u16, &'static str),
}

impl From<io::Error> for WsError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

struct RawFrame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

fn read_frame(r: &mut impl Read, max: usize) -> Result<RawFrame, WsError> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head)?;
    let fin = head[0] & 0x80 != 0;
    if head[0] & 0x70 != 0 {
        return Err(WsError::Protocol(1002, "reserved bits set"));
    }
    let opcode = head[0] & 0x0f;
    if head[1] & 0x80 == 0 {
        return Err(WsError::Protocol(1002, "client frames must be masked"));
    }
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if opcode >= 0x8 && (len > 125 || !fin) {
        return Err(WsError::Protocol(1002, "invalid control frame"));
    }
    let len = usize::try_from(len).ok().filter(|l| *l <= max).ok_or(WsError::Protocol(1009, "message too big"))?;
    let mut mask = [0u8; 4];
    r.read_exact(&mut mask)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
    Ok(RawFrame { fin, opcode, payload })
}

/// Reads the next message, joining fragments and surfacing control frames.
pub fn read_message(r: &mut impl Read) -> Result<Incoming, WsError> {
    let mut message: Option<Vec<u8>> = None;
    loop {
        let frame = read_frame(r, MAX_MESSAGE)?;
        match frame.opcode {
            OP_PING => return Ok(Incoming::Ping(frame.payload)),
            OP_PONG => return Ok(Incoming::Pong),
            OP_CLOSE => return Ok(Incoming::Close),
            OP_TEXT | OP_BINARY if message.is_none() => {
                if frame.fin {
                    return Ok(Incoming::Data(frame.payload));
                }
                message = Some(frame.payload);
            }
            OP_CONTINUATION => {
                let Some(buf) = message.as_mut() else {
                    return Err(WsError::Protocol(1002, "continuation without a message"));
                };
                if buf.len() + frame.payload.len() > MAX_MESSAGE {
                    return Err(WsError::Protocol(1009, "message too big"));
                }
                buf.extend_from_slice(&frame.payload);
                if frame.fin {
                    return Ok(Incoming::Data(message.take().unwrap_or_default()));
                }
            }
            _ => return Err(WsError::Protocol(1002, "unexpected opcode")),
        }
    }
}

/// Writes one unmasked frame (servers never mask).
pub fn write_frame(w: &mut impl Write, opcode: u8, payload: &[u8]) -> io::Result<()> {
    let mut head = Vec::with_capacity(10);
    head.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => head.push(n as u8),
        n if u16::try_from(n).is_ok() => {
            head.push(126);
            head.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            head.push(127);
            head.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

pub fn write_close(w: &mut impl Write, code: u16, reason: &str) -> io::Result<()> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(120)]);
    write_frame(w, OP_CLOSE, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![opcode_byte, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        // The sample handshake of RFC 6455 section 1.3.
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn reads_masked_fragmented_and_control_frames() {
        let mut wire = masked(0x02, b"\x00hel"); // FIN=0, binary
        wire[0] = 0x02;
        let mut tail = masked(0x80, b"lo"); // FIN=1, continuation
        let mut ping = masked(0x89, b"p");
        wire.append(&mut tail);
        wire.append(&mut ping);
        wire.extend(masked(0x88, b""));
        let mut r = &wire[..];
        assert_eq!(read_message(&mut r).expect("data"), Incoming::Data(b"\x00hello".to_vec()));
        assert_eq!(read_message(&mut r).expect("ping"), Incoming::Ping(b"p".to_vec()));
        assert_eq!(read_message(&mut r).expect("close"), Incoming::Close);
    }

    #[test]
    fn rejects_unmasked_and_oversized_frames() {
        let unmasked = [0x82u8, 0x01, 0x00];
        assert!(matches!(read_message(&mut &unmasked[..]), Err(WsError::Protocol(1002, _))));
        let mut huge = vec![0x82u8, 0x80 | 127];
        huge.extend_from_slice(&(u64::MAX).to_be_bytes());
        huge.extend_from_slice(&[0, 0, 0, 0]);
        assert!(matches!(read_message(&mut &huge[..]), Err(WsError::Protocol(1009, _))));
    }

    #[test]
    fn writes_length_forms() {
        let mut out = Vec::new();
        write_frame(&mut out, OP_BINARY, &[7u8; 300]).expect("write");
        assert_eq!(&out[..4], &[0x82, 126, 0x01, 0x2c]);
        assert_eq!(out.len(), 4 + 300);
    }
}

//! Scrubbing a WebSocket connection's server-to-client frames (RFC 6455 section 5).
//!
//! Replacing a value by a token changes a payload's length, so frames are re-framed:
//! each data message is re-emitted as fragments, one per piece of payload read, holding
//! back across fragments only what the scrubber holds back (an intermediary may change
//! fragmentation when no extension is negotiated, and the proxy strips extension offers
//! from the upgrade request). Control frames (close, ping, pong; at most 125 bytes) are
//! scrubbed whole and cut to 125 bytes if the token made them longer. A frame using an
//! extension bit (compression the server applied anyway) cannot be scrubbed: the
//! connection is dropped instead. Memory is bounded by one read and one held-back tail.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::io::Inbound;
use crate::relay::{fill, RelayError, Relayed};
use crate::scrub::{ScrubSet, Scrubber};

const OPCODE_CONTINUATION: u8 = 0;
const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame header as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHeader {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    /// Bytes the header took on the wire.
    size: usize,
}

/// Parses a header from the start of `buf`; `None` if more bytes are needed.
fn parse_header(buf: &[u8]) -> Option<FrameHeader> {
    let (&b0, rest) = buf.split_first()?;
    let &b1 = rest.first()?;
    let masked = b1 & 0x80 != 0;
    let (len, mut size) = match b1 & 0x7f {
        126 => (u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)), 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let key: [u8; 4] = buf.get(size..size + 4)?.try_into().ok()?;
        size += 4;
        Some(key)
    } else {
        None
    };
    Some(FrameHeader { fin: b0 & 0x80 != 0, rsv: (b0 >> 4) & 0x7, opcode: b0 & 0x0f, mask, len, size })
}

/// Appends an unmasked frame (server-to-client frames are never masked).
fn encode_frame(fin: bool, opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let n = payload.len();
    match (u8::try_from(n), u16::try_from(n)) {
        (Ok(short), _) if short < 126 => out.push(short),
        (_, Ok(medium)) => {
            out.push(126);
            out.extend_from_slice(&medium.to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

fn unmask(data: &mut [u8], key: [u8; 4], offset: u64) {
    for (i, b) in data.iter_mut().enumerate() {
        // The key repeats every 4 bytes of the payload; offset is where `data` starts.
        *b ^= key[((offset + i as u64) % 4) as usize];
    }
}

fn protocol_error(message: &str) -> RelayError {
    RelayError::BadResponse { message: format!("WebSocket from the upstream: {message}"), started: true }
}

/// The message being re-framed: its opcode and whether a fragment of it went out.
struct Message {
    opcode: u8,
    started: bool,
    scrubber: Scrubber,
}

/// Relays frames until the upstream closes, scrubbing every payload.
pub async fn relay_frames<R, W>(
    up: &mut Inbound<R>,
    client: &mut W,
    scrub: &Arc<ScrubSet>,
    totals: &mut Relayed,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut message: Option<Message> = None;
    let mut wire = Zeroizing::new(Vec::with_capacity(64 * 1024));
    let mut scrubbed = Zeroizing::new(Vec::with_capacity(64 * 1024));
    loop {
        let header = loop {
            if let Some(h) = parse_header(up.buffered()) {
                break h;
            }
            if fill(up).await? == 0 {
                return if up.buffered().is_empty() {
                    Ok(())
                } else {
                    Err(protocol_error("cut off in a frame header"))
                };
            }
        };
        up.consume(header.size);
        if header.rsv != 0 {
            return Err(protocol_error("a frame uses an extension (compression?), so it cannot be scrubbed"));
        }
        if header.opcode >= 8 {
            let len = usize::try_from(header.len).unwrap_or(usize::MAX);
            if len > MAX_CONTROL_PAYLOAD || !header.fin {
                return Err(protocol_error("malformed control frame"));
            }
            while up.buffered().len() < len {
                if fill(up).await? == 0 {
                    return Err(protocol_error("cut off in a control frame"));
                }
            }
            let mut payload = Zeroizing::new(up.buffered()[..len].to_vec());
            up.consume(len);
            if let Some(key) = header.mask {
                unmask(&mut payload, key, 0);
            }
            scrubbed.clear();
            totals.scrubbed += scrub.scrub_all(&payload, &mut scrubbed);
            scrubbed.truncate(MAX_CONTROL_PAYLOAD);
            wire.clear();
            encode_frame(true, header.opcode, &scrubbed, &mut wire);
            send(client, &mut wire, totals).await?;
            continue;
        }
        let msg = match (header.opcode, message.as_mut()) {
            (OPCODE_CONTINUATION, Some(m)) => m,
            (OPCODE_CONTINUATION, None) => return Err(protocol_error("continuation frame outside a message")),
            (_, Some(_)) => return Err(protocol_error("new message before the last one ended")),
            (opcode, None) => {
                message.insert(Message { opcode, started: false, scrubber: Scrubber::new(scrub.clone()) })
            }
        };
        let mut remaining = header.len;
        let mut offset = 0u64;
        while remaining > 0 {
            if up.buffered().is_empty() && fill(up).await? == 0 {
                return Err(protocol_error("cut off in a frame"));
            }
            let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(up.buffered().len());
            let mut piece = Zeroizing::new(up.buffered()[..take].to_vec());
            up.consume(take);
            if let Some(key) = header.mask {
                unmask(&mut piece, key, offset);
            }
            offset += take as u64;
            remaining -= take as u64;
            scrubbed.clear();
            msg.scrubber.push(&piece, &mut scrubbed);
            if !scrubbed.is_empty() {
                emit_fragment(msg, false, &scrubbed, &mut wire);
                send(client, &mut wire, totals).await?;
            }
        }
        if header.fin {
            scrubbed.clear();
            msg.scrubber.finish(&mut scrubbed);
            totals.scrubbed += msg.scrubber.replaced();
            emit_fragment(msg, true, &scrubbed, &mut wire);
            send(client, &mut wire, totals).await?;
            message = None;
        }
    }
}

fn emit_fragment(msg: &mut Message, fin: bool, payload: &[u8], wire: &mut Vec<u8>) {
    let opcode = if msg.started { OPCODE_CONTINUATION } else { msg.opcode };
    msg.started = true;
    wire.clear();
    encode_frame(fin, opcode, payload, wire);
}

async fn send<W: AsyncWrite + Unpin>(client: &mut W, wire: &mut Vec<u8>, totals: &mut Relayed) -> std::io::Result<()> {
    client.write_all(wire).await?;
    client.flush().await?;
    totals.bytes += wire.len() as u64;
    wire.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_at_every_length_class() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![7u8; len];
            let mut wire = Vec::new();
            encode_frame(true, 2, &payload, &mut wire);
            let h = parse_header(&wire).unwrap();
            assert_eq!((h.fin, h.opcode, h.len, h.mask), (true, 2, len as u64, None));
            assert_eq!(h.size + len, wire.len());
            assert_eq!(parse_header(&wire[..h.size - 1]), None, "{len}: a cut header needs more bytes");
        }
        let masked = [0x81, 0x83, 1, 2, 3, 4, b'a' ^ 1, b'b' ^ 2, b'c' ^ 3];
        let h = parse_header(&masked).unwrap();
        let mut p = masked[h.size..].to_vec();
        unmask(&mut p, h.mask.unwrap(), 0);
        assert_eq!(p, b"abc");
    }
}

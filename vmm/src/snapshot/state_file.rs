//! The snapshot's state file: a fixed header (magic, format version, CRC-32 and length of the
//! body), then the machine state as JSON. A file from another program, another format version,
//! cut short or with a flipped bit is refused with a sentence saying which.

use serde::{Deserialize, Serialize};

use super::MachineState;

const MAGIC: &[u8; 8] = b"OCVMSNAP";
/// Bumped whenever `MachineState` changes shape or meaning: a VMM only restores its own format.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8;
/// A real state is tens of KiB; anything near this is not one of ours.
const MAX_BODY: u64 = 64 << 20;

pub fn encode(state: &MachineState) -> Result<Vec<u8>, String> {
    let body = serde_json::to_vec(state).map_err(|e| format!("cannot encode the machine state: {e}"))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

pub fn decode(bytes: &[u8]) -> Result<MachineState, String> {
    decode_as(bytes)
}

fn decode_as<T: for<'de> Deserialize<'de> + Serialize>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err("not a snapshot state file (no OCVMSNAP header)".into());
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(format!("snapshot format version {version}; this VMM restores version {FORMAT_VERSION} only"));
    }
    let crc = word(12);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_BODY {
        return Err(format!("snapshot state claims {len} bytes; not a state file"));
    }
    let body = &bytes[HEADER_LEN..];
    if (body.len() as u64) != len {
        return Err(format!("snapshot state is cut short or padded: {} bytes of {len}", body.len()));
    }
    if crc32fast::hash(body) != crc {
        return Err("snapshot state is damaged (CRC-32 mismatch)".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("snapshot state does not parse: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Small {
        a: u32,
        b: Vec<u8>,
    }

    fn encode_small(s: &Small) -> Vec<u8> {
        let body = serde_json::to_vec(s).unwrap();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn round_trip_and_every_kind_of_damage() {
        let s = Small { a: 7, b: vec![1, 2, 3] };
        let good = encode_small(&s);
        assert_eq!(decode_as::<Small>(&good).unwrap(), s);

        let err = |bytes: &[u8]| decode_as::<Small>(bytes).unwrap_err();
        assert!(err(b"#!/bin/sh\necho hi\n").contains("not a snapshot state file"));
        assert!(err(&good[..10]).contains("not a snapshot state file"));
        let mut other_version = good.clone();
        other_version[8] = 9;
        assert!(err(&other_version).contains("format version 9"));
        assert!(err(&good[..good.len() - 1]).contains("cut short"));
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        assert!(err(&flipped).contains("damaged"));
        let mut huge = good;
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&huge).contains("not a state file"));
    }
}

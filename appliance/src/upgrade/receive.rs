//! Streams an upload to the staging file, hashing it on the way (SHA-256) and leaving all-zero
//! blocks as holes, so a disk image's empty slot costs no space on the data disk.

use orion::hazardous::hash::sha2::sha256::Sha256;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

const CHUNK: usize = 1 << 20;

#[derive(Debug)]
pub enum ReceiveError {
    TooLarge(u64),
    Read(String),
    Write(String),
}

/// Copies `body` to `dest` (replacing it); returns the byte count and the SHA-256 in hex.
/// On any error the partial file is removed.
pub fn receive(body: &mut dyn Read, dest: &Path, limit: u64) -> Result<(u64, String), ReceiveError> {
    let result = copy(body, dest, limit);
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

fn copy(body: &mut dyn Read, dest: &Path, limit: u64) -> Result<(u64, String), ReceiveError> {
    let werr = |e: std::io::Error| ReceiveError::Write(format!("{}: {e}", dest.display()));
    let mut out = File::create(dest).map_err(werr)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    loop {
        let n = fill(body, &mut buf).map_err(|e| ReceiveError::Read(e.to_string()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(ReceiveError::TooLarge(limit));
        }
        let chunk = &buf[..n];
        hasher.update(chunk).map_err(|_| ReceiveError::Read("hashing failed".into()))?;
        if chunk.iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(n as i64)).map_err(werr)?;
        } else {
            out.write_all(chunk).map_err(werr)?;
        }
    }
    out.set_len(total).map_err(werr)?;
    out.sync_all().map_err(werr)?;
    let digest = hasher.finalize().map_err(|_| ReceiveError::Read("hashing failed".into()))?;
    Ok((total, digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()))
}

fn fill(body: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match body.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_the_bytes_sparse_and_reports_their_sha256() {
        let dest = std::env::temp_dir().join(format!("appliance-receive-{}", std::process::id()));
        let mut body = vec![0u8; 3 * CHUNK];
        body.extend_from_slice(b"abc");
        let (n, sha) = receive(&mut &body[..], &dest, 10 * CHUNK as u64).expect("received");
        assert_eq!(n, body.len() as u64);
        assert_eq!(std::fs::read(&dest).expect("read"), body);
        let (_, abc) = receive(&mut &b"abc"[..], &dest, 10).expect("received");
        assert_eq!(abc, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_ne!(sha, abc);
        assert!(matches!(receive(&mut &body[..], &dest, 100), Err(ReceiveError::TooLarge(100))));
        assert!(!dest.exists(), "nothing left behind on bad input");
    }
}

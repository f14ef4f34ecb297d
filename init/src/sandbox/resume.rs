//! After the sandbox is resumed from a snapshot: its wall clock stands where the snapshot left
//! it, and its random pool is the snapshot's, shared with every other sandbox resumed from the
//! same one. The appliance sends the time and fresh entropy; this sets the one and mixes in the
//! other, then forces the kernel's generator to reseed so the next read already differs.

use std::fs::File;
use std::os::unix::io::AsRawFd;

use super::error::OpError;

/// `RNDADDENTROPY`: _IOW('R', 0x03, int[2]).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: _IO('R', 0x07).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// More than the kernel's pool can hold is pointless; a bigger request is refused.
pub const MAX_ENTROPY: usize = 512;

pub fn apply(wall_clock_ns: u64, entropy: &[u8]) -> Result<(), OpError> {
    set_wall_clock(wall_clock_ns)?;
    add_entropy(entropy)
}

fn set_wall_clock(ns: u64) -> Result<(), OpError> {
    let ts =
        libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as libc::c_long };
    // SAFETY: clock_settime reads one timespec that lives across the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &raw const ts) } != 0 {
        return Err(OpError::io("setting the wall clock", &std::io::Error::last_os_error()));
    }
    Ok(())
}

fn add_entropy(entropy: &[u8]) -> Result<(), OpError> {
    if entropy.is_empty() || entropy.len() > MAX_ENTROPY {
        return Err(OpError::bad_request(format!("entropy must be 1..={MAX_ENTROPY} bytes, got {}", entropy.len())));
    }
    let random = File::options().write(true).open("/dev/urandom").map_err(|e| OpError::io("/dev/urandom", &e))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, laid out by hand
    // as u32 words: the bytes are credited in full (they come from the appliance's generator).
    let words = entropy.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (entropy.len() * 8) as u32;
    info[1] = entropy.len() as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: the buffer is a rand_pool_info whose buf_size (info[1]) bytes follow the header
    // inside the allocation; the kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(OpError::io("adding entropy", &std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(OpError::io("reseeding the random generator", &std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux() {
        // _IOW('R', 3, int[2]): dir write (1) << 30 | size 8 << 16 | 'R' << 8 | 3.
        assert_eq!(RNDADDENTROPY, (1 << 30) | (8 << 16) | (u64::from(b'R') << 8) as libc::c_ulong | 3);
        assert_eq!(RNDRESEEDCRNG, (u64::from(b'R') << 8) as libc::c_ulong | 7);
    }

    #[test]
    fn empty_or_oversized_entropy_is_refused() {
        assert!(add_entropy(&[]).unwrap_err().message.contains("entropy must be"));
        assert!(add_entropy(&[0; MAX_ENTROPY + 1]).unwrap_err().message.contains("entropy must be"));
    }
}

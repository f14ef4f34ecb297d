//! Finds the TCP socket behind an upgraded tiny_http connection. tiny_http's upgrade
//! returns one `Read + Write` object that cannot be split, but a WebSocket session
//! must read client frames and write output at the same time; so we locate the
//! connection's file descriptor by its address pair and `dup` it into a `TcpStream`.

use std::fs;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::os::unix::io::{FromRawFd, RawFd};

fn sockaddr_of(fd: RawFd, peer: bool) -> Option<SocketAddr> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is a writable sockaddr_storage and `len` holds its size, as
    // getsockname/getpeername require; an fd that is not a socket just fails.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, storage.as_mut_ptr().cast(), &raw mut len)
        } else {
            libc::getsockname(fd, storage.as_mut_ptr().cast(), &raw mut len)
        }
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: the call succeeded, so the kernel initialised the structure (it was
    // zeroed before, so even unwritten bytes are defined).
    let storage = unsafe { storage.assume_init() };
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in, which fits in sockaddr_storage.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6, which fits in sockaddr_storage.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A duplicate of the connected socket whose peer is `peer` and whose local port is
/// `local_port`, or None if no such socket is open in this process.
pub fn dup_connection(peer: SocketAddr, local_port: u16) -> Option<TcpStream> {
    let entries = fs::read_dir("/proc/self/fd").ok()?;
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else { continue };
        if sockaddr_of(fd, true) != Some(peer) {
            continue;
        }
        if sockaddr_of(fd, false).map(|a| a.port()) != Some(local_port) {
            continue;
        }
        // SAFETY: dup on an fd that is open (we just queried it); the result is a new
        // descriptor owned by nobody else.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if copy < 0 {
            return None;
        }
        // SAFETY: `copy` is a freshly duplicated, open TCP socket descriptor that we own.
        return Some(unsafe { TcpStream::from_raw_fd(copy) });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn finds_and_duplicates_an_accepted_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (_server_side, peer) = listener.accept().expect("accept");
        let mut dup = dup_connection(peer, port).expect("found");
        dup.write_all(b"hi").expect("write");
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");
        assert!(dup_connection("127.0.0.1:1".parse().expect("addr"), port).is_none());
    }
}

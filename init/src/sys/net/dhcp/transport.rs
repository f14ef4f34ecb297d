//! How DHCP messages travel. Before the interface has an address we use an AF_PACKET socket
//! (we build IP/UDP ourselves and see replies even when a server unicasts them to the offered
//! address). When packet sockets are unavailable (af_packet not loaded) or once we hold an
//! address (renewal), a UDP socket on port 68 bound to the interface is used; without an
//! address it only works with servers that broadcast replies, which our BROADCAST flag asks for.

use super::frame;
use crate::sys::check;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

/// Largest datagram we read: a jumbo frame's worth; anything beyond is cut and then rejected.
const RECV_BUFFER: usize = 9216;
/// sll_pkttype of frames the interface itself sent (linux/if_packet.h).
const PACKET_OUTGOING: u8 = 4;

pub trait Transport {
    /// Sends one DHCP message to the server port of `to`, or broadcasts it when `to` is None.
    fn send(&mut self, message: &[u8], to: Option<Ipv4Addr>) -> Result<(), String>;
    /// The next DHCP payload that arrives for the client port before `deadline`, None once the
    /// deadline has passed. Packets that are not DHCP replies at all are skipped here.
    fn recv(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, String>;
    /// A short name for logs.
    fn kind(&self) -> &'static str;
}

/// Opens the transport for a client without an address: a packet socket, or a UDP socket when
/// the kernel has no packet socket support.
pub fn open_unconfigured(iface: &str) -> Result<Box<dyn Transport + Send>, String> {
    match PacketTransport::open(iface) {
        Ok(t) => Ok(Box::new(t)),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            Ok(Box::new(UdpTransport::open(iface).map_err(|e| e.to_string())?))
        }
        Err(e) => Err(e.to_string()),
    }
}

pub struct PacketTransport {
    fd: OwnedFd,
    ifindex: libc::c_int,
    buf: Vec<u8>,
}

impl PacketTransport {
    pub fn open(iface: &str) -> io::Result<PacketTransport> {
        let name = crate::sys::cstr(iface)?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(err.kind(), format!("interface {iface}: {err}")));
        }
        let protocol = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket(2) call with constant arguments; no pointers involved.
        let fd = unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::c_int::from(protocol))
        };
        let fd = check(fd, || "packet socket".into())?;
        // SAFETY: socket() just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = link_addr(ifindex as libc::c_int, protocol, None);
        // SAFETY: `addr` is a fully initialised sockaddr_ll and the length passed is its size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(ret, || format!("bind packet socket to {iface}"))?;
        Ok(PacketTransport { fd, ifindex: ifindex as libc::c_int, buf: vec![0; RECV_BUFFER] })
    }
}

fn link_addr(ifindex: libc::c_int, protocol_be: u16, dest: Option<[u8; 6]>) -> libc::sockaddr_ll {
    let mut sll_addr = [0u8; 8];
    if let Some(mac) = dest {
        sll_addr[..6].copy_from_slice(&mac);
    }
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: protocol_be,
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: if dest.is_some() { 6 } else { 0 },
        sll_addr,
    }
}

impl Transport for PacketTransport {
    fn send(&mut self, message: &[u8], to: Option<Ipv4Addr>) -> Result<(), String> {
        if let Some(to) = to {
            return Err(format!("cannot unicast to {to} without an address (packet socket)"));
        }
        let datagram = frame::broadcast_datagram(message)?;
        let dest = link_addr(self.ifindex, (libc::ETH_P_IP as u16).to_be(), Some([0xff; 6]));
        // SAFETY: the buffer and destination are live for the call and their lengths are exact.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                datagram.as_ptr().cast(),
                datagram.len(),
                0,
                (&raw const dest).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(format!("send DHCP broadcast: {}", io::Error::last_os_error()));
        }
        Ok(())
    }

    fn recv(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, String> {
        loop {
            if !wait_readable(self.fd.as_raw_fd(), deadline)? {
                return Ok(None);
            }
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its full length; `from`/`from_len` describe a live
            // sockaddr_ll the kernel may fill.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast(),
                    &raw mut from_len,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                    continue;
                }
                return Err(format!("receive on packet socket: {err}"));
            }
            if from.sll_pkttype == PACKET_OUTGOING {
                continue; // our own DISCOVER/REQUEST, looped back to packet taps
            }
            if let Ok(payload) = frame::udp_payload(&self.buf[..n as usize], frame::CLIENT_PORT) {
                return Ok(Some(payload.to_vec()));
            }
        }
    }

    fn kind(&self) -> &'static str {
        "packet socket"
    }
}

pub struct UdpTransport {
    socket: UdpSocket,
    buf: Vec<u8>,
}

impl UdpTransport {
    /// A UDP socket on 0.0.0.0:68 that sends and receives only through `iface`.
    pub fn open(iface: &str) -> io::Result<UdpTransport> {
        // SAFETY: plain socket(2) call with constant arguments; no pointers involved.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        let fd = check(fd, || "UDP socket".into())?;
        // SAFETY: socket() just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_int_option(&fd, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
        set_int_option(&fd, libc::SO_BROADCAST, 1, "SO_BROADCAST")?;
        let name = iface.as_bytes();
        // SAFETY: the option value is the live bytes of the interface name with their exact length.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                name.as_ptr().cast(),
                name.len() as libc::socklen_t,
            )
        };
        check(ret, || format!("SO_BINDTODEVICE {iface}"))?;
        let local = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: frame::CLIENT_PORT.to_be(),
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        // SAFETY: `local` is an initialised sockaddr_in and the length passed is its size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const local).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        check(ret, || format!("bind UDP port {} on {iface}", frame::CLIENT_PORT))?;
        let socket = UdpSocket::from(fd);
        // Non-blocking: poll decides when to read, a spurious wake-up must not block past the deadline.
        socket.set_nonblocking(true)?;
        Ok(UdpTransport { socket, buf: vec![0; RECV_BUFFER] })
    }
}

fn set_int_option(fd: &OwnedFd, option: libc::c_int, value: libc::c_int, what: &str) -> io::Result<()> {
    // SAFETY: the option value points at a live c_int and the length is its size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(ret, || what.to_string()).map(|_| ())
}

impl Transport for UdpTransport {
    fn send(&mut self, message: &[u8], to: Option<Ipv4Addr>) -> Result<(), String> {
        let dest = SocketAddrV4::new(to.unwrap_or(Ipv4Addr::BROADCAST), frame::SERVER_PORT);
        self.socket.send_to(message, dest).map(|_| ()).map_err(|e| format!("send DHCP message to {dest}: {e}"))
    }

    fn recv(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, String> {
        loop {
            if !wait_readable(self.socket.as_raw_fd(), deadline)? {
                return Ok(None);
            }
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, from)) if from.port() == frame::SERVER_PORT => return Ok(Some(self.buf[..n].to_vec())),
                // Another port's datagram, or nothing yet: keep waiting.
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(e) => return Err(format!("receive on UDP port {}: {e}", frame::CLIENT_PORT)),
            }
        }
    }

    fn kind(&self) -> &'static str {
        "UDP socket"
    }
}

/// Waits for `fd` to become readable; false when `deadline` passes first.
fn wait_readable(fd: libc::c_int, deadline: Instant) -> Result<bool, String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        // Round up so that a sub-millisecond remainder still waits instead of spinning.
        let ms = left.as_millis().saturating_add(1).min(i32::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: `pfd` is one live pollfd and the count passed is 1.
        let ret = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {err}"));
        }
        if ret > 0 {
            return Ok(true);
        }
    }
}

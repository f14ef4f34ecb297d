//! Interface and route configuration through the classic socket ioctls (SIOCSIFFLAGS,
//! SIOCSIFADDR, SIOCSIFNETMASK, SIOCADDRT/SIOCDELRT): one IPv4 address and a few routes per
//! interface is all PID 1 needs, and these ioctls do it without a netlink implementation.

use super::dhcp::message::prefix_to_mask;
use crate::sys::check;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An AF_INET datagram socket, the handle the kernel takes interface ioctls on. The socket's
/// network namespace decides which interfaces are seen.
pub struct IfControl {
    fd: OwnedFd,
}

impl IfControl {
    pub fn new() -> io::Result<IfControl> {
        // SAFETY: plain socket(2) call with constant arguments; no pointers involved.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        let fd = check(fd, || "control socket".into())?;
        // SAFETY: socket() just returned this descriptor and nothing else owns it.
        Ok(IfControl { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn ioctl(&self, request: libc::c_ulong, req: &mut libc::ifreq, what: impl FnOnce() -> String) -> io::Result<()> {
        // SAFETY: every request used here reads or writes exactly one struct ifreq, and `req`
        // is a live, initialised ifreq for the duration of the call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request, std::ptr::from_mut::<libc::ifreq>(req)) };
        check(ret, what).map(|_| ())
    }

    /// Sets IFF_UP, keeping the other flags.
    pub fn set_up(&self, iface: &str) -> io::Result<()> {
        let mut req = ifreq(iface)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req, || format!("read flags of {iface}"))?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, || format!("bring {iface} up"))
    }

    /// The Ethernet MAC address; an error for interfaces of another link type.
    pub fn mac(&self, iface: &str) -> io::Result<[u8; 6]> {
        let mut req = ifreq(iface)?;
        self.ioctl(libc::SIOCGIFHWADDR, &mut req, || format!("read hardware address of {iface}"))?;
        // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        if hw.sa_family != libc::ARPHRD_ETHER {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{iface} is not an Ethernet interface (link type {}); DHCP needs one", hw.sa_family),
            ));
        }
        let mut mac = [0u8; 6];
        for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
            *dst = *src as u8;
        }
        Ok(mac)
    }

    /// Sets the interface's primary IPv4 address and netmask; the kernel adds the subnet route.
    pub fn set_address(&self, iface: &str, address: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
        let mut req = ifreq(iface)?;
        req.ifr_ifru.ifru_addr = sockaddr_v4(address);
        self.ioctl(libc::SIOCSIFADDR, &mut req, || format!("set address {address} on {iface}"))?;
        let mask = prefix_to_mask(prefix_len);
        let mut req = ifreq(iface)?;
        req.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
        self.ioctl(libc::SIOCSIFNETMASK, &mut req, || format!("set netmask {mask} on {iface}"))
    }

    /// Removes the IPv4 address; the kernel drops the routes through it with it.
    pub fn clear_address(&self, iface: &str) -> io::Result<()> {
        let mut req = ifreq(iface)?;
        req.ifr_ifru.ifru_addr = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        self.ioctl(libc::SIOCSIFADDR, &mut req, || format!("remove address of {iface}"))
    }

    /// Adds a route to `dest`/`prefix_len` out of `iface`, via `gateway` or on-link. An
    /// identical existing route is not an error.
    pub fn add_route(&self, iface: &str, dest: Ipv4Addr, prefix_len: u8, gateway: Option<Ipv4Addr>) -> io::Result<()> {
        match self.route(libc::SIOCADDRT, iface, dest, prefix_len, gateway) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Deletes such a route; a route that is already gone is not an error.
    pub fn delete_route(
        &self,
        iface: &str,
        dest: Ipv4Addr,
        prefix_len: u8,
        gateway: Option<Ipv4Addr>,
    ) -> io::Result<()> {
        match self.route(libc::SIOCDELRT, iface, dest, prefix_len, gateway) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    fn route(
        &self,
        request: libc::c_ulong,
        iface: &str,
        dest: Ipv4Addr,
        prefix_len: u8,
        gateway: Option<Ipv4Addr>,
    ) -> io::Result<()> {
        let dev = crate::sys::cstr(iface)?;
        // SAFETY: rtentry is plain old data (integers, sockaddrs, a nullable pointer); all-zero
        // is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        let mask = prefix_to_mask(prefix_len);
        rt.rt_dst = sockaddr_v4(Ipv4Addr::from(u32::from(dest) & u32::from(mask)));
        rt.rt_genmask = sockaddr_v4(mask);
        rt.rt_flags = libc::RTF_UP;
        if let Some(gw) = gateway {
            rt.rt_gateway = sockaddr_v4(gw);
            rt.rt_flags |= libc::RTF_GATEWAY;
        }
        if prefix_len == 32 {
            rt.rt_flags |= libc::RTF_HOST;
        }
        // The kernel only reads the name through this pointer.
        rt.rt_dev = dev.as_ptr().cast_mut();
        let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        let what = || {
            let verb = if request == libc::SIOCADDRT { "add" } else { "delete" };
            format!("{verb} route {dest}/{prefix_len}{via} dev {iface}")
        };
        // SAFETY: SIOCADDRT/SIOCDELRT read one struct rtentry; `rt` is initialised and `dev`
        // (which rt_dev points into) outlives the call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request, &raw mut rt) };
        check(ret, what).map(|_| ())
    }
}

/// An ifreq naming `iface`, the rest zero.
fn ifreq(iface: &str) -> io::Result<libc::ifreq> {
    if iface.is_empty() || iface.len() >= libc::IFNAMSIZ || iface.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{iface:?} is not an interface name")));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers and sockaddrs);
    // all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-old-data structs; the kernel
    // interprets an AF_INET sockaddr as exactly this sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_before_any_ioctl() {
        assert!(ifreq("").is_err());
        assert!(ifreq("sixteen-chars-xx").is_err());
        assert!(ifreq("eth\0").is_err());
        let req = ifreq("eth0").unwrap();
        assert_eq!(&req.ifr_name[..5], &[b'e' as libc::c_char, b't' as _, b'h' as _, b'0' as _, 0]);
    }

    #[test]
    fn sockaddr_carries_the_address_in_network_order() {
        let sa = sockaddr_v4(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // sa_data: 2 bytes of port, then the address bytes in order.
        let bytes: Vec<u8> = sa.sa_data[..6].iter().map(|&b| b as u8).collect();
        assert_eq!(bytes, vec![0, 0, 10, 0, 2, 15]);
    }

    #[test]
    fn missing_interface_is_a_clear_error() {
        let ctl = IfControl::new().unwrap();
        let err = ctl.set_up("oc-nonexist0").unwrap_err();
        assert!(err.to_string().contains("oc-nonexist0"), "{err}");
    }
}

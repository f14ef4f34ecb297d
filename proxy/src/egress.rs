//! Where the proxy may connect: name resolution (with operator overrides), refusal
//! of restricted destinations, and dialing with a timeout.
//!
//! The addresses that are checked are the ones that are dialed, so a name that
//! resolves differently between check and use (DNS rebinding) gains nothing.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

/// An address block, e.g. `127.0.0.0/8` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("invalid address block {s:?} (expected ADDR/PREFIX)");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| err())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix).ok_or_else(err)
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// Why an address may not be dialed without an explicit operator allowance.
pub fn restriction(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => restriction_v4(v4),
        IpAddr::V6(v6) => restriction_v6(v6),
    }
}

fn restriction_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local (metadata)")
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) || (o[0] == 198 && (o[1] & 0xfe) == 18) {
        Some("private")
    } else if o[0] == 0
        || ip.is_broadcast()
        || ip.is_multicast()
        || o[0] >= 240
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
    {
        Some("reserved")
    } else {
        None
    }
}

fn restriction_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) embed an IPv4 destination.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let o = ip.octets();
        return restriction_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if s[0] == 0x2002 {
        let o = ip.octets();
        return restriction_v4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if ip.is_loopback() {
        Some("loopback")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local (metadata)")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("private")
    } else if ip.is_unspecified() || ip.is_multicast() || (s[0] == 0x2001 && s[1] == 0xdb8) || s[0] == 0 {
        Some("reserved")
    } else {
        None
    }
}

/// Addresses of this machine's interfaces (the appliance's own addresses).
pub fn own_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a heap-allocated list head into `list`; on success we
    // own it until freeifaddrs below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return out;
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs, not yet freed.
        let entry = unsafe { &*cur };
        if !entry.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose sa_family tells its real type;
            // we only reinterpret it as the matching sockaddr_in/sockaddr_in6.
            // The casts below go to a type with stricter alignment; getifaddrs allocates each
            // address as its real type, so the pointer is aligned for it.
            #[allow(clippy::cast_ptr_alignment)]
            unsafe {
                match i32::from((*entry.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
        }
        cur = entry.ifa_next;
    }
    // SAFETY: `list` came from a successful getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(list) };
    out
}

#[derive(Debug)]
pub enum EgressError {
    /// Name resolution failed or gave nothing.
    Resolve(String),
    /// Every address was restricted; carries one example and the reason.
    Refused {
        addr: IpAddr,
        reason: &'static str,
    },
    Connect(std::io::Error),
    Timeout,
}

impl fmt::Display for EgressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Resolve(msg) => write!(f, "name resolution failed: {msg}"),
            Self::Refused { addr, reason } => {
                write!(f, "destination address {addr} is {reason} and not allowed by the operator")
            }
            Self::Connect(e) => write!(f, "connection failed: {e}"),
            Self::Timeout => f.write_str("connection timed out"),
        }
    }
}

impl std::error::Error for EgressError {}

/// The egress rules the proxy applies before dialing.
#[derive(Clone, Debug)]
pub struct EgressPolicy {
    pub overrides: HashMap<String, IpAddr>,
    pub allowed: Vec<Cidr>,
    pub connect_timeout: Duration,
}

impl EgressPolicy {
    /// Why `ip` is refused, or `None` if it may be dialed.
    pub fn refusal(&self, ip: IpAddr, own: &[IpAddr]) -> Option<&'static str> {
        let reason =
            restriction(ip).or_else(|| own.contains(&canonical(ip)).then_some("an address of this appliance"))?;
        if self.allowed.iter().any(|c| c.contains(ip)) {
            None
        } else {
            Some(reason)
        }
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, EgressError> {
        if let Some(ip) = self.overrides.get(host) {
            return Ok(vec![SocketAddr::new(*ip, port)]);
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| EgressError::Resolve(e.kind().to_string()))?
            .collect();
        if addrs.is_empty() {
            return Err(EgressError::Resolve("no addresses".into()));
        }
        Ok(addrs)
    }

    /// Resolves `host` and connects to the first permitted address that answers.
    pub async fn dial(&self, host: &str, port: u16) -> Result<(TcpStream, SocketAddr), EgressError> {
        let attempt = async {
            let addrs = self.resolve(host, port).await?;
            let own = own_addresses();
            let mut last_err = None;
            let mut refused = None;
            for addr in addrs {
                if let Some(reason) = self.refusal(addr.ip(), &own) {
                    refused.get_or_insert(EgressError::Refused { addr: addr.ip(), reason });
                    continue;
                }
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        // Small writes (heads, short responses) must not wait for Nagle.
                        let _ = s.set_nodelay(true);
                        return Ok((s, addr));
                    }
                    Err(e) => last_err = Some(EgressError::Connect(e)),
                }
            }
            Err(last_err.or(refused).unwrap_or_else(|| EgressError::Resolve("no addresses".into())))
        };
        tokio::time::timeout(self.connect_timeout, attempt).await.unwrap_or(Err(EgressError::Timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_restricted_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "::",
        ] {
            assert!(restriction(ip(a)).is_some(), "{a} should be restricted");
        }
        for a in ["1.1.1.1", "93.184.216.34", "2606:4700::1111", "172.32.0.1"] {
            assert!(restriction(ip(a)).is_none(), "{a} should be public");
        }
    }

    #[test]
    fn allowance_and_own_addresses() {
        let p = EgressPolicy {
            overrides: HashMap::new(),
            allowed: vec!["127.0.0.0/8".parse().unwrap()],
            connect_timeout: Duration::from_secs(1),
        };
        assert_eq!(p.refusal(ip("127.0.0.2"), &[]), None);
        assert_eq!(p.refusal(ip("::ffff:127.0.0.2"), &[]), None);
        assert!(p.refusal(ip("10.0.0.1"), &[]).is_some());
        assert_eq!(p.refusal(ip("203.0.114.7"), &[ip("203.0.114.7")]), Some("an address of this appliance"));
        assert!(own_addresses().contains(&ip("127.0.0.1")));
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let c: Cidr = "10.0.0.0/9".parse().unwrap();
        assert!(c.contains(ip("10.127.255.255")));
        assert!(!c.contains(ip("10.128.0.0")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/8".parse::<Cidr>().unwrap().contains(ip("fdff::1")));
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap(), Cidr::new(ip("1.2.3.4"), 32).unwrap());
    }
}

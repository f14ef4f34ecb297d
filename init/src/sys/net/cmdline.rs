//! The network settings on the kernel command line (`oc.net`, `oc.ip`, `oc.gw`, `oc.dns`,
//! `oc.iface`), parsed and validated up front so a typo is reported by name at boot.

use super::dhcp::message::prefix_to_mask;
use std::net::Ipv4Addr;

/// resolv.conf readers (glibc, musl) use at most three nameservers.
const MAX_DNS: usize = 3;

/// What PID 1 should do with the NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub mode: NetMode,
    /// `oc.iface`: the NIC to configure instead of the first one found.
    pub interface: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMode {
    Dhcp,
    Static(StaticConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticConfig {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

impl NetConfig {
    /// Reads the `oc.*` network parameters; other parameters, and everything after `--` (which
    /// the kernel hands to init as arguments), are not ours. A repeated key: the last one wins,
    /// as for kernel parameters.
    pub fn from_cmdline(cmdline: &str) -> Result<NetConfig, String> {
        let (mut net, mut ip, mut gw, mut dns, mut iface) = (None, None, None, None, None);
        for word in cmdline.split_ascii_whitespace().take_while(|w| *w != "--") {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let slot = match key {
                "oc.net" => &mut net,
                "oc.ip" => &mut ip,
                "oc.gw" => &mut gw,
                "oc.dns" => &mut dns,
                "oc.iface" => &mut iface,
                _ => continue,
            };
            *slot = Some(value);
        }

        let interface = iface.map(parse_iface).transpose()?;
        let mode = match net.unwrap_or("dhcp") {
            "dhcp" => {
                for (key, value) in [("oc.ip", ip), ("oc.gw", gw), ("oc.dns", dns)] {
                    if let Some(value) = value {
                        return Err(format!("{key}={value}: only used with oc.net=static (oc.net is dhcp)"));
                    }
                }
                NetMode::Dhcp
            }
            "static" => {
                let ip = ip.ok_or("oc.net=static needs oc.ip=<address>/<prefix>, e.g. oc.ip=10.0.2.15/24")?;
                let (address, prefix_len) = parse_ip(ip)?;
                let gateway = gw.map(|g| parse_gateway(g, address)).transpose()?;
                let dns = dns.map(parse_dns).transpose()?.unwrap_or_default();
                NetMode::Static(StaticConfig { address, prefix_len, gateway, dns })
            }
            other => return Err(format!("oc.net={other}: expected dhcp or static")),
        };
        Ok(NetConfig { mode, interface })
    }
}

fn parse_ip(value: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("oc.ip={value}: not an IPv4 address/prefix (e.g. 10.0.2.15/24)");
    let (addr, prefix) = value.split_once('/').ok_or_else(bad)?;
    let address: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    // Digits only: u8::from_str would also take "+24".
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let prefix_len: u8 = prefix.parse().map_err(|_| bad())?;
    if !(1..=32).contains(&prefix_len) {
        return Err(format!("oc.ip={value}: prefix length must be 1 to 32"));
    }
    if !is_host_address(address) {
        return Err(format!("oc.ip={value}: {address} cannot be a host address"));
    }
    if prefix_len <= 30 {
        let host_bits = !u32::from(prefix_to_mask(prefix_len));
        let host = u32::from(address) & host_bits;
        if host == 0 || host == host_bits {
            return Err(format!("oc.ip={value}: {address} is the network or broadcast address of that subnet"));
        }
    }
    Ok((address, prefix_len))
}

fn parse_gateway(value: &str, address: Ipv4Addr) -> Result<Ipv4Addr, String> {
    let gateway: Ipv4Addr = value.parse().map_err(|_| format!("oc.gw={value}: not an IPv4 address"))?;
    if !is_host_address(gateway) {
        return Err(format!("oc.gw={value}: not a usable gateway address"));
    }
    if gateway == address {
        return Err(format!("oc.gw={value}: the gateway cannot be our own address"));
    }
    // A gateway outside the subnet is allowed: it is reached through an on-link host route.
    Ok(gateway)
}

fn parse_dns(value: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut servers = Vec::new();
    for item in value.split(',') {
        let server: Ipv4Addr = item.parse().map_err(|_| format!("oc.dns={value}: {item:?} is not an IPv4 address"))?;
        if server.is_unspecified() || server.is_broadcast() || server.is_multicast() {
            return Err(format!("oc.dns={value}: {server} is not a usable DNS server"));
        }
        servers.push(server);
    }
    if servers.len() > MAX_DNS {
        return Err(format!("oc.dns={value}: at most {MAX_DNS} servers (resolv.conf uses no more)"));
    }
    Ok(servers)
}

fn parse_iface(value: &str) -> Result<String, String> {
    // The kernel's rules (dev_valid_name): 1..15 bytes, no '/', ':' or whitespace, not . or ..
    let valid = !value.is_empty()
        && value.len() < libc::IFNAMSIZ
        && value != "."
        && value != ".."
        && value.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!("oc.iface={value}: not an interface name"))
    }
}

fn is_host_address(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() || a.octets()[0] == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn dhcp_is_the_default() {
        let cfg = NetConfig::from_cmdline("console=ttyS0 quiet panic=-1").unwrap();
        assert_eq!(cfg, NetConfig { mode: NetMode::Dhcp, interface: None });
        assert_eq!(NetConfig::from_cmdline("").unwrap().mode, NetMode::Dhcp);
        assert_eq!(NetConfig::from_cmdline("oc.net=dhcp oc.iface=ens3").unwrap().interface.as_deref(), Some("ens3"));
    }

    #[test]
    fn full_static_config() {
        let cfg = NetConfig::from_cmdline(
            "ro oc.net=static oc.ip=10.0.2.15/24 oc.gw=10.0.2.2 oc.dns=10.0.2.3,10.0.2.4 oc.iface=eth1",
        )
        .unwrap();
        assert_eq!(
            cfg,
            NetConfig {
                mode: NetMode::Static(StaticConfig {
                    address: ip("10.0.2.15"),
                    prefix_len: 24,
                    gateway: Some(ip("10.0.2.2")),
                    dns: vec![ip("10.0.2.3"), ip("10.0.2.4")],
                }),
                interface: Some("eth1".into()),
            }
        );
    }

    #[test]
    fn static_without_gateway_or_dns_and_last_value_wins() {
        let cfg =
            NetConfig::from_cmdline("oc.net=dhcp oc.net=static oc.ip=192.168.1.9/16 oc.ip=192.168.7.9/32").unwrap();
        assert_eq!(
            cfg.mode,
            NetMode::Static(StaticConfig { address: ip("192.168.7.9"), prefix_len: 32, gateway: None, dns: vec![] })
        );
    }

    #[test]
    fn arguments_after_double_dash_are_not_ours() {
        assert_eq!(NetConfig::from_cmdline("quiet -- oc.net=bogus").unwrap().mode, NetMode::Dhcp);
    }

    #[test]
    fn bad_values_name_the_parameter() {
        let cases = [
            ("oc.net=static oc.ip=10.0.2/24", "oc.ip=10.0.2/24: not an IPv4 address/prefix"),
            ("oc.net=static oc.ip=10.0.2.15", "oc.ip=10.0.2.15: not an IPv4 address/prefix"),
            ("oc.net=static oc.ip=10.0.2.15/", "oc.ip=10.0.2.15/: not an IPv4 address/prefix"),
            ("oc.net=static oc.ip=10.0.2.15/+24", "oc.ip=10.0.2.15/+24: not an IPv4 address/prefix"),
            ("oc.net=static oc.ip=10.0.2.15/33", "oc.ip=10.0.2.15/33: prefix length must be 1 to 32"),
            ("oc.net=static oc.ip=10.0.2.15/0", "oc.ip=10.0.2.15/0: prefix length"),
            ("oc.net=static oc.ip=10.0.2.0/24", "network or broadcast"),
            ("oc.net=static oc.ip=10.0.2.255/24", "network or broadcast"),
            ("oc.net=static oc.ip=127.0.0.2/8", "cannot be a host address"),
            ("oc.net=static oc.ip=224.0.0.1/24", "cannot be a host address"),
            ("oc.net=static", "oc.net=static needs oc.ip"),
            ("oc.net=static oc.ip=10.0.2.15/24 oc.gw=10.0.2", "oc.gw=10.0.2: not an IPv4 address"),
            ("oc.net=static oc.ip=10.0.2.15/24 oc.gw=10.0.2.15", "oc.gw=10.0.2.15: the gateway cannot be our own"),
            ("oc.net=static oc.ip=10.0.2.15/24 oc.gw=255.255.255.255", "oc.gw=255.255.255.255: not a usable gateway"),
            ("oc.net=static oc.ip=10.0.2.15/24 oc.dns=10.0.2.3,", "oc.dns=10.0.2.3,: \"\" is not an IPv4 address"),
            ("oc.net=static oc.ip=10.0.2.15/24 oc.dns=", "oc.dns=: \"\" is not an IPv4 address"),
            (
                "oc.net=static oc.ip=10.0.2.15/24 oc.dns=1.1.1.1,2.2.2.2,3.3.3.3,4.4.4.4",
                "oc.dns=1.1.1.1,2.2.2.2,3.3.3.3,4.4.4.4: at most 3",
            ),
            ("oc.net=static oc.ip=10.0.2.15/24 oc.dns=0.0.0.0", "not a usable DNS server"),
            ("oc.net=dchp", "oc.net=dchp: expected dhcp or static"),
            ("oc.net=", "oc.net=: expected dhcp or static"),
            ("oc.ip=10.0.2.15/24", "oc.ip=10.0.2.15/24: only used with oc.net=static"),
            ("oc.net=dhcp oc.dns=10.0.2.3", "oc.dns=10.0.2.3: only used with oc.net=static"),
            ("oc.iface=", "oc.iface=: not an interface name"),
            ("oc.iface=averyveryverylongname", "not an interface name"),
            ("oc.iface=../eth0", "not an interface name"),
            ("oc.iface=eth0:1", "not an interface name"),
        ];
        for (cmdline, expected) in cases {
            match NetConfig::from_cmdline(cmdline) {
                Ok(cfg) => panic!("{cmdline:?} was accepted as {cfg:?}"),
                Err(e) => assert!(e.contains(expected), "{cmdline:?}: error {e:?} lacks {expected:?}"),
            }
        }
    }

    #[test]
    fn point_to_point_prefixes_allow_any_host() {
        for value in ["10.0.0.0/31", "10.0.0.1/31", "10.0.0.0/32"] {
            let cmdline = format!("oc.net=static oc.ip={value}");
            assert!(NetConfig::from_cmdline(&cmdline).is_ok(), "{value} rejected");
        }
    }
}

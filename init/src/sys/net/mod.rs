//! Network bring-up for the appliance PID 1: loopback, picking the NIC, DHCPv4 or a static
//! address, the default route, /etc/resolv.conf, and renewing the DHCP lease in the background.
//!
//! Kernel command line (parsed by [`NetConfig::from_cmdline`]):
//!
//! | parameter | meaning |
//! | --- | --- |
//! | `oc.net=dhcp` | (default) obtain address, netmask, router, DNS and lease from a DHCP server |
//! | `oc.net=static` | use the values below instead |
//! | `oc.ip=10.0.2.15/24` | static address and prefix length (required with `oc.net=static`) |
//! | `oc.gw=10.0.2.2` | static default gateway (optional; may lie outside the subnet) |
//! | `oc.dns=10.0.2.3[,10.0.2.4[,...]]` | static DNS servers, at most 3 (optional) |
//! | `oc.iface=<name>` | the NIC to configure, instead of the first Ethernet NIC by name |
//!
//! Invalid values are errors that name the parameter, e.g.
//! `oc.ip=10.0.2/24: not an IPv4 address/prefix`. Everything after `--` is not looked at.

mod cmdline;
pub mod dhcp;
mod ifconfig;
mod nic;
mod renewal;
mod resolv;

pub use cmdline::{NetConfig, NetMode, StaticConfig};
pub use resolv::RESOLV_CONF;

use dhcp::transport;
use dhcp::{Backoff, Client, Lease};
use ifconfig::IfControl;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the boot-time DHCP exchange may take before the network is reported down.
pub const DHCP_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`configure`] did to the interface.
#[derive(Debug, Clone)]
pub struct NetStatus {
    pub interface: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// "dhcp" or "static".
    pub source: &'static str,
    pub lease_secs: Option<u32>,
    /// What the renewal thread needs; None for a static configuration.
    dhcp: Option<DhcpState>,
}

#[derive(Debug, Clone)]
struct DhcpState {
    mac: [u8; 6],
    lease: Lease,
    resolv_conf: PathBuf,
}

/// Brings `lo` up with 127.0.0.1/8 (the address the kernel gives it, set again to be sure).
pub fn bring_up_loopback() -> Result<(), String> {
    let ctl = IfControl::new().map_err(|e| e.to_string())?;
    ctl.set_up("lo").map_err(|e| e.to_string())?;
    ctl.set_address("lo", Ipv4Addr::LOCALHOST, 8).map_err(|e| e.to_string())
}

/// The first non-loopback Ethernet interface backed by a device (sorted by name; lo, sit*,
/// tun*, dummy*, bond*, bridges and veth have no device), waiting up to `wait` for one to appear.
pub fn first_nic(wait: Duration) -> Option<String> {
    nic::first_nic_in(Path::new(nic::SYS_CLASS_NET), wait)
}

/// The NIC to configure: the one `oc.iface` names (once it exists, waiting up to `wait`), or
/// else [`first_nic`].
pub fn choose_nic(cfg: &NetConfig, wait: Duration) -> Option<String> {
    match &cfg.interface {
        Some(name) => nic::wait_for_in(Path::new(nic::SYS_CLASS_NET), name, wait).then(|| name.clone()),
        None => first_nic(wait),
    }
}

/// Configures `iface` as `cfg` says: brings it up, obtains or takes the address, sets address,
/// netmask and default route, and writes /etc/resolv.conf when DNS servers are known.
pub fn configure(cfg: &NetConfig, iface: &str) -> Result<NetStatus, String> {
    configure_with_resolv(cfg, iface, Path::new(RESOLV_CONF))
}

/// [`configure`] writing the resolver configuration to `resolv_conf`; the DHCP renewal thread
/// keeps writing there.
pub(crate) fn configure_with_resolv(cfg: &NetConfig, iface: &str, resolv_conf: &Path) -> Result<NetStatus, String> {
    if let Some(wanted) = cfg.interface.as_deref().filter(|wanted| *wanted != iface) {
        return Err(format!("oc.iface={wanted} names another interface than {iface}"));
    }
    let ctl = IfControl::new().map_err(|e| e.to_string())?;
    ctl.set_up(iface).map_err(|e| e.to_string())?;
    match &cfg.mode {
        NetMode::Static(s) => {
            apply_addressing(&ctl, iface, s.address, s.prefix_len, s.gateway, None)?;
            if !s.dns.is_empty() {
                resolv::write(resolv_conf, &s.dns, &format!("static (oc.dns) for {iface}"))?;
            }
            Ok(NetStatus {
                interface: iface.to_string(),
                address: s.address,
                prefix_len: s.prefix_len,
                gateway: s.gateway,
                dns: s.dns.clone(),
                source: "static",
                lease_secs: None,
                dhcp: None,
            })
        }
        NetMode::Dhcp => {
            let mac = ctl.mac(iface).map_err(|e| e.to_string())?;
            let lease = obtain_lease(iface, mac, Instant::now() + DHCP_TIMEOUT)?;
            apply_addressing(&ctl, iface, lease.address, lease.prefix_len, lease.gateway, None)?;
            if !lease.dns.is_empty() {
                resolv::write(resolv_conf, &lease.dns, &dhcp_origin(iface, &lease))?;
            }
            Ok(NetStatus {
                interface: iface.to_string(),
                address: lease.address,
                prefix_len: lease.prefix_len,
                gateway: lease.gateway,
                dns: lease.dns.clone(),
                source: "dhcp",
                lease_secs: Some(lease.lease_secs),
                dhcp: Some(DhcpState { mac, lease, resolv_conf: resolv_conf.to_path_buf() }),
            })
        }
    }
}

/// Starts a thread that renews the DHCP lease at T1 (half the lease unless the server says
/// otherwise), rebinds with any server at T2, and starts over if the lease runs out, applying
/// any change of address, gateway or DNS. Progress and problems go to `log` in plain words.
/// Does nothing for a static configuration.
pub fn spawn_dhcp_renewal(status: &NetStatus, log: fn(&str)) {
    let Some(state) = status.dhcp.clone() else {
        return;
    };
    let iface = status.interface.clone();
    let address = status.address;
    let spawned = std::thread::Builder::new()
        .name("dhcp-renewal".into())
        .spawn(move || renewal::run(&iface, state.mac, state.lease, &state.resolv_conf, log));
    if let Err(e) = spawned {
        log(&format!("cannot start the DHCP renewal thread ({e}); the lease on {address} will not be renewed"));
    }
}

/// One DHCP exchange from scratch on an interface without an address.
fn obtain_lease(iface: &str, mac: [u8; 6], deadline: Instant) -> Result<Lease, String> {
    let mut transport = transport::open_unconfigured(iface).map_err(|e| format!("DHCP on {iface}: {e}"))?;
    Client::new(&mut *transport, mac, Backoff::BOOT).obtain(deadline).map_err(|e| format!("DHCP on {iface}: {e}"))
}

fn dhcp_origin(iface: &str, lease: &Lease) -> String {
    format!("DHCP server {} for {iface}", lease.server)
}

/// Sets address and netmask, then the default route (after an on-link host route to a gateway
/// outside the subnet). `previous_gateway`'s default route is removed if the gateway changed.
fn apply_addressing(
    ctl: &IfControl,
    iface: &str,
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Option<Ipv4Addr>,
    previous_gateway: Option<Ipv4Addr>,
) -> Result<(), String> {
    ctl.set_address(iface, address, prefix_len).map_err(|e| e.to_string())?;
    if let Some(old) = previous_gateway.filter(|old| Some(*old) != gateway) {
        ctl.delete_route(iface, Ipv4Addr::UNSPECIFIED, 0, Some(old)).map_err(|e| e.to_string())?;
        ctl.delete_route(iface, old, 32, None).map_err(|e| e.to_string())?;
    }
    if let Some(gw) = gateway {
        if !same_subnet(gw, address, prefix_len) {
            ctl.add_route(iface, gw, 32, None).map_err(|e| e.to_string())?;
        }
        ctl.add_route(iface, Ipv4Addr::UNSPECIFIED, 0, Some(gw)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> bool {
    let mask = u32::from(dhcp::message::prefix_to_mask(prefix_len));
    u32::from(a) & mask == u32::from(b) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_membership() {
        let a = Ipv4Addr::new(10, 0, 2, 15);
        assert!(same_subnet(a, Ipv4Addr::new(10, 0, 2, 2), 24));
        assert!(!same_subnet(a, Ipv4Addr::new(10, 0, 3, 2), 24));
        assert!(!same_subnet(a, Ipv4Addr::new(10, 0, 2, 2), 32));
    }

    #[test]
    fn interface_mismatch_with_oc_iface_is_reported() {
        let cfg = NetConfig::from_cmdline("oc.iface=eth1").unwrap();
        let err = configure(&cfg, "eth0").unwrap_err();
        assert!(err.contains("oc.iface=eth1"), "{err}");
    }
}

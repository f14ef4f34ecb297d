//! The background life of a DHCP lease: renew at T1 with the server that granted it, rebind
//! with any server at T2, and when the lease runs out drop the address and start over.

use super::dhcp::transport::{Transport, UdpTransport};
use super::dhcp::{Backoff, Client, DhcpError, Lease};
use super::ifconfig::IfControl;
use super::{apply_addressing, dhcp_origin, obtain_lease, resolv, DHCP_TIMEOUT};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Pause between attempts to get a new lease after losing one: doubling up to a minute.
const RETRY_FIRST: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// The shortest time between the start of a lease and its first renewal attempt.
const MIN_CYCLE: Duration = Duration::from_secs(1);
/// Pause after a socket error while renewing or rebinding.
const IO_PAUSE: Duration = Duration::from_secs(5);

pub fn run(iface: &str, mac: [u8; 6], mut lease: Lease, resolv_conf: &Path, log: fn(&str)) {
    loop {
        if lease.is_infinite() {
            log(&format!("the lease on {} never expires; no renewal needed", lease.address));
            return;
        }
        // A lease of a second or two must not turn into a busy loop of exchanges.
        sleep_until(lease.renew_at().max(lease.obtained + MIN_CYCLE));
        log(&format!("renewing the lease on {} with server {}", lease.address, lease.server));
        let outcome = match extend(iface, mac, &lease, Some(lease.server), lease.rebind_at(), log) {
            Err(DhcpError::NoAnswer(e)) => {
                log(&format!("renewal got no answer ({e}); asking any DHCP server (rebinding)"));
                extend(iface, mac, &lease, None, lease.expires_at(), log)
            }
            settled => settled,
        };
        lease = match outcome {
            Ok(new) => {
                adopt(iface, &lease, &new, resolv_conf, log);
                new
            }
            Err(e) => {
                match e {
                    DhcpError::Refused { .. } => log(&format!("{e}: {} may no longer be used", lease.address)),
                    _ => log(&format!("the lease on {} expired ({e})", lease.address)),
                }
                drop_address(iface, &lease, log);
                start_over(iface, mac, resolv_conf, log)
            }
        };
    }
}

/// One RENEWING (`to` = the server) or REBINDING (`to` = None) phase until `deadline`, over a
/// UDP socket since the interface has an address now. Socket errors (a link going down) are
/// retried while the phase lasts: only the end of the lease may take the address away.
fn extend(
    iface: &str,
    mac: [u8; 6],
    lease: &Lease,
    to: Option<Ipv4Addr>,
    deadline: Instant,
    log: fn(&str),
) -> Result<Lease, DhcpError> {
    let phase = if to.is_some() { "renew" } else { "rebind" };
    loop {
        if Instant::now() >= deadline {
            return Err(DhcpError::NoAnswer(format!("no time left to {phase}")));
        }
        let attempt = UdpTransport::open(iface).map_err(|e| DhcpError::Io(e.to_string())).and_then(|mut socket| {
            Client::new(&mut socket as &mut dyn Transport, mac, Backoff::RENEW).extend(lease, to, deadline)
        });
        match attempt {
            Err(DhcpError::Io(e)) => {
                log(&format!("cannot {phase} right now ({e}); trying again in {} s", IO_PAUSE.as_secs()));
                sleep_until((Instant::now() + IO_PAUSE).min(deadline));
            }
            settled => return settled,
        }
    }
}

/// Applies what changed between two leases and says what it did.
fn adopt(iface: &str, old: &Lease, new: &Lease, resolv_conf: &Path, log: fn(&str)) {
    if (new.address, new.prefix_len, new.gateway) != (old.address, old.prefix_len, old.gateway) {
        log(&format!(
            "the server changed the addressing from {}/{} to {}/{} (gateway {})",
            old.address,
            old.prefix_len,
            new.address,
            new.prefix_len,
            new.gateway.map_or_else(|| "none".into(), |g| g.to_string())
        ));
        let applied = IfControl::new()
            .map_err(|e| e.to_string())
            .and_then(|ctl| apply_addressing(&ctl, iface, new.address, new.prefix_len, new.gateway, old.gateway));
        if let Err(e) = applied {
            log(&format!("could not apply the new addressing: {e}"));
        }
    }
    if new.dns != old.dns && !new.dns.is_empty() {
        match resolv::write(resolv_conf, &new.dns, &dhcp_origin(iface, new)) {
            Ok(()) => log(&format!("DNS servers are now {:?}", new.dns)),
            Err(e) => log(&format!("could not update the DNS servers: {e}")),
        }
    }
    log(&format!("lease on {} renewed for {} s by server {}", new.address, new.lease_secs, new.server));
}

fn drop_address(iface: &str, lease: &Lease, log: fn(&str)) {
    let cleared = IfControl::new().and_then(|ctl| ctl.clear_address(iface));
    match cleared {
        Ok(()) => log(&format!("removed {} from {iface}; looking for a DHCP server", lease.address)),
        Err(e) => log(&format!("could not remove {} from {iface}: {e}", lease.address)),
    }
}

/// Obtains a fresh lease, however long it takes, and configures it.
fn start_over(iface: &str, mac: [u8; 6], resolv_conf: &Path, log: fn(&str)) -> Lease {
    let mut pause = RETRY_FIRST;
    loop {
        match obtain_lease(iface, mac, Instant::now() + DHCP_TIMEOUT) {
            Ok(lease) => {
                let applied = IfControl::new().map_err(|e| e.to_string()).and_then(|ctl| {
                    apply_addressing(&ctl, iface, lease.address, lease.prefix_len, lease.gateway, None)
                });
                match applied {
                    Ok(()) => {
                        log(&format!(
                            "new lease: {}/{} for {} s from server {}",
                            lease.address, lease.prefix_len, lease.lease_secs, lease.server
                        ));
                        if !lease.dns.is_empty() {
                            if let Err(e) = resolv::write(resolv_conf, &lease.dns, &dhcp_origin(iface, &lease)) {
                                log(&format!("could not update the DNS servers: {e}"));
                            }
                        }
                        return lease;
                    }
                    Err(e) => log(&format!("got {} but could not configure it: {e}", lease.address)),
                }
            }
            Err(e) => log(&format!("{e}; trying again in {} s", pause.as_secs())),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(RETRY_MAX);
    }
}

fn sleep_until(when: Instant) {
    let left = when.saturating_duration_since(Instant::now());
    if !left.is_zero() {
        std::thread::sleep(left);
    }
}

//! A DHCPv4 client (RFC 2131): obtaining a lease (DISCOVER -> OFFER -> REQUEST -> ACK),
//! renewing it with the server that granted it, and rebinding with any server.

pub mod frame;
pub mod message;
pub mod transport;

use message::{MessageType, Reply, Request};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use transport::Transport;

/// A lease of 0xffffffff seconds never expires (RFC 2131 3.3).
pub const INFINITE_LEASE: u32 = u32::MAX;

/// Retransmission schedule: the first wait, doubled after every unanswered attempt up to the cap.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// At boot we want an address within seconds, so retries start at 1 s (RFC 2131 4.1
    /// suggests 4 s for busy networks; a 10 s budget would allow only two tries).
    pub const BOOT: Backoff = Backoff { first: Duration::from_secs(1), max: Duration::from_secs(4) };
    /// Renewing has until T2, usually minutes or hours, so retries may be spaced out more.
    pub const RENEW: Backoff = Backoff { first: Duration::from_secs(2), max: Duration::from_secs(60) };
}

/// What a server granted, with the times to renew and rebind.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub lease_secs: u32,
    /// T1 and T2, from options 58/59 or the RFC defaults (1/2 and 7/8 of the lease).
    pub renew_secs: u32,
    pub rebind_secs: u32,
    /// When the request that produced this lease was sent (RFC 2131 4.4.1: times count from there).
    pub obtained: Instant,
}

impl Lease {
    fn from_ack(ack: &Reply, fallback_server: Option<Ipv4Addr>, sent_at: Instant) -> Result<Lease, String> {
        if !is_usable_unicast(ack.yiaddr) {
            return Err(format!("ACK assigns unusable address {}", ack.yiaddr));
        }
        let lease_secs = ack.lease_secs()?.ok_or("ACK without a lease time")?;
        if lease_secs == 0 {
            return Err("ACK with a lease of 0 seconds".into());
        }
        let server = ack.server_id()?.or(fallback_server).ok_or("ACK without a server identifier")?;
        // Without option 1 the client infers the mask from the address class (RFC 1122 3.3.1.1).
        let prefix_len = ack.prefix_len()?.unwrap_or_else(|| classful_prefix(ack.yiaddr));
        let gateway = ack.router()?.filter(|g| is_usable_unicast(*g));
        let dns = ack.dns()?.into_iter().filter(|d| !d.is_unspecified() && !d.is_broadcast()).collect();
        // RFC 2131 4.4.5 defaults: T1 = 0.5 and T2 = 0.875 of the lease.
        let mut renew_secs = lease_secs / 2;
        let mut rebind_secs = (u64::from(lease_secs) * 7 / 8) as u32;
        if let (Some(t1), Some(t2)) = (ack.renewal_secs()?, ack.rebinding_secs()?) {
            if t1 <= t2 && t2 <= lease_secs {
                (renew_secs, rebind_secs) = (t1, t2);
            }
        } else if let Some(t1) = ack.renewal_secs()? {
            if t1 <= rebind_secs {
                renew_secs = t1;
            }
        } else if let Some(t2) = ack.rebinding_secs()? {
            if renew_secs <= t2 && t2 <= lease_secs {
                rebind_secs = t2;
            }
        }
        Ok(Lease {
            address: ack.yiaddr,
            prefix_len,
            gateway,
            dns,
            server,
            lease_secs,
            renew_secs,
            rebind_secs,
            obtained: sent_at,
        })
    }

    pub fn is_infinite(&self) -> bool {
        self.lease_secs == INFINITE_LEASE
    }

    pub fn renew_at(&self) -> Instant {
        self.obtained + Duration::from_secs(u64::from(self.renew_secs))
    }

    pub fn rebind_at(&self) -> Instant {
        self.obtained + Duration::from_secs(u64::from(self.rebind_secs))
    }

    pub fn expires_at(&self) -> Instant {
        self.obtained + Duration::from_secs(u64::from(self.lease_secs))
    }
}

fn is_usable_unicast(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
}

fn classful_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum DhcpError {
    /// A server refused (DHCPNAK): the address must not be used.
    Refused { server: Ipv4Addr, reason: Option<String> },
    /// No acceptable answer before the deadline; the text says what was seen instead.
    NoAnswer(String),
    /// The socket failed.
    Io(String),
}

impl std::fmt::Display for DhcpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DhcpError::Refused { server, reason: Some(r) } => write!(f, "server {server} refused (DHCPNAK: {r})"),
            DhcpError::Refused { server, reason: None } => write!(f, "server {server} refused (DHCPNAK)"),
            DhcpError::NoAnswer(what) => f.write_str(what),
            DhcpError::Io(e) => f.write_str(e),
        }
    }
}

/// What the exchange does with one reply that matched our xid and MAC.
enum Verdict<T> {
    Take(T),
    Refused(Option<String>),
    Ignore(String),
}

/// One client identity (MAC) speaking over one transport.
pub struct Client<'t> {
    transport: &'t mut dyn Transport,
    mac: [u8; 6],
    backoff: Backoff,
}

struct Offer {
    address: Ipv4Addr,
    server: Ipv4Addr,
}

impl<'t> Client<'t> {
    pub fn new(transport: &'t mut dyn Transport, mac: [u8; 6], backoff: Backoff) -> Client<'t> {
        Client { transport, mac, backoff }
    }

    /// INIT -> SELECTING -> REQUESTING -> BOUND. A NAK or a silent server after the offer
    /// restarts discovery while time remains.
    pub fn obtain(&mut self, deadline: Instant) -> Result<Lease, DhcpError> {
        let started = Instant::now();
        let mac = self.mac;
        loop {
            let xid = random_u32();
            let discover = |secs| Request {
                kind: MessageType::Discover,
                xid,
                secs,
                mac,
                ciaddr: Ipv4Addr::UNSPECIFIED,
                requested_ip: None,
                server_id: None,
                broadcast: true,
            };
            let offer = self.exchange(&discover, None, xid, started, deadline, "DHCPOFFER", |reply| {
                if reply.kind != MessageType::Offer {
                    return Verdict::Ignore(format!("{:?} while waiting for an offer", reply.kind));
                }
                if !is_usable_unicast(reply.yiaddr) {
                    return Verdict::Ignore(format!("offer of unusable address {}", reply.yiaddr));
                }
                match reply.server_id() {
                    Ok(Some(server)) => Verdict::Take(Offer { address: reply.yiaddr, server }),
                    Ok(None) => Verdict::Ignore("offer without a server identifier".into()),
                    Err(e) => Verdict::Ignore(e),
                }
            })?;

            let request = |secs| Request {
                kind: MessageType::Request,
                xid,
                secs,
                mac,
                ciaddr: Ipv4Addr::UNSPECIFIED,
                requested_ip: Some(offer.address),
                server_id: Some(offer.server),
                broadcast: true,
            };
            let sent_at = Instant::now();
            let result = self.exchange(&request, None, xid, started, deadline, "DHCPACK", |reply| {
                // Only the chosen server's answer counts; others learn from our REQUEST that we declined.
                if reply.server_id().ok().flatten().is_some_and(|s| s != offer.server) {
                    return Verdict::Ignore("answer from a server we did not choose".into());
                }
                if reply.kind == MessageType::Ack && reply.yiaddr != offer.address {
                    return Verdict::Ignore(format!("ACK for {} after requesting {}", reply.yiaddr, offer.address));
                }
                ack_verdict(reply, Some(offer.server), sent_at)
            });
            match result {
                Ok(lease) => return Ok(lease),
                Err(DhcpError::Io(e)) => return Err(DhcpError::Io(e)),
                Err(e) if Instant::now() >= deadline => return Err(e),
                // NAK or silence after the offer: start over with a fresh transaction.
                Err(_) => {}
            }
        }
    }

    /// RENEWING (unicast to the leasing server, `to` = Some) or REBINDING (broadcast, any
    /// server, `to` = None) until `deadline`.
    pub fn extend(&mut self, lease: &Lease, to: Option<Ipv4Addr>, deadline: Instant) -> Result<Lease, DhcpError> {
        let xid = random_u32();
        let started = Instant::now();
        let mac = self.mac;
        let request = |secs| Request {
            kind: MessageType::Request,
            xid,
            secs,
            mac,
            ciaddr: lease.address,
            requested_ip: None,
            server_id: None,
            broadcast: false,
        };
        self.exchange(&request, to, xid, started, deadline, "DHCPACK", |reply| {
            ack_verdict(reply, Some(lease.server), started)
        })
    }

    /// Sends the request and retransmits with backoff until `accept` takes a reply, a server
    /// refuses, or `deadline` passes. Replies for other transactions or clients are ignored.
    #[allow(clippy::too_many_arguments)]
    fn exchange<T>(
        &mut self,
        build: &dyn Fn(u16) -> Request,
        to: Option<Ipv4Addr>,
        xid: u32,
        started: Instant,
        deadline: Instant,
        waiting_for: &str,
        mut accept: impl FnMut(&Reply) -> Verdict<T>,
    ) -> Result<T, DhcpError> {
        let mut wait = self.backoff.first;
        let (mut sent, mut ignored, mut last_ignored) = (0u32, 0u32, String::new());
        while Instant::now() < deadline {
            let secs = started.elapsed().as_secs().min(u64::from(u16::MAX)) as u16;
            self.transport.send(&build(secs).encode(), to).map_err(DhcpError::Io)?;
            sent += 1;
            let attempt_ends = (Instant::now() + wait).min(deadline);
            while let Some(bytes) = self.transport.recv(attempt_ends).map_err(DhcpError::Io)? {
                let why = match Reply::parse(&bytes) {
                    Err(e) => format!("malformed reply: {e}"),
                    Ok(reply) if reply.xid != xid => "reply to another transaction (xid)".into(),
                    Ok(reply) if reply.chaddr != self.mac => "reply for another client (MAC)".into(),
                    Ok(reply) => match accept(&reply) {
                        Verdict::Take(value) => return Ok(value),
                        Verdict::Refused(reason) => {
                            let server = reply.server_id().ok().flatten().unwrap_or(Ipv4Addr::UNSPECIFIED);
                            return Err(DhcpError::Refused { server, reason });
                        }
                        Verdict::Ignore(why) => why,
                    },
                };
                ignored += 1;
                last_ignored = why;
            }
            wait = (wait * 2).min(self.backoff.max);
        }
        let mut text = format!(
            "no {waiting_for} after {sent} attempts over {} ({})",
            describe(started.elapsed()),
            self.transport.kind()
        );
        if ignored > 0 {
            text.push_str(&format!("; ignored {ignored} unrelated packets, last: {last_ignored}"));
        }
        Err(DhcpError::NoAnswer(text))
    }
}

fn ack_verdict(reply: &Reply, server: Option<Ipv4Addr>, sent_at: Instant) -> Verdict<Lease> {
    match reply.kind {
        MessageType::Ack => match Lease::from_ack(reply, server, sent_at) {
            Ok(lease) => Verdict::Take(lease),
            Err(e) => Verdict::Ignore(format!("unusable ACK: {e}")),
        },
        MessageType::Nak => Verdict::Refused(reply.server_message()),
        other => Verdict::Ignore(format!("{other:?} while waiting for an ACK")),
    }
}

fn describe(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// A transaction id. It need not be secret, only unlikely to collide with other clients', so
/// the kernel's non-blocking random source is enough even before its pool is initialised.
fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: the buffer is live and writable for its 4 bytes; GRND_INSECURE never blocks.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_INSECURE) };
    if n == 4 {
        return u32::from_ne_bytes(bytes);
    }
    // Kernels before 5.6 lack GRND_INSECURE: mix the clock and pid instead.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

#[cfg(test)]
mod tests;

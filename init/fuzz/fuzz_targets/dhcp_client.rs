//! The DHCP client's state machine (`Client::obtain`, and `Client::extend` for renewing) fed a
//! sequence of hostile replies through a scripted transport: it must never panic, and any lease
//! it accepts must be coherent (usable address, prefix <= 32, T1 <= T2 <= lease time).
//! Input: byte 0 holds flags (bit 0: renew an existing lease instead of obtaining one); then
//! replies, each as a u16 big-endian length, one byte of flags (bit 0: patch in the client's
//! transaction id, bit 1: patch in the client's MAC) and the payload. When the replies run out
//! the transport fails, which ends the exchange.
#![no_main]

use init::sys::net::dhcp::transport::Transport;
use init::sys::net::dhcp::{Backoff, Client, Lease};
use libfuzzer_sys::fuzz_target;
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

struct Scripted {
    replies: VecDeque<(u8, Vec<u8>)>,
    xid: [u8; 4],
}

impl Transport for Scripted {
    fn send(&mut self, message: &[u8], _to: Option<Ipv4Addr>) -> Result<(), String> {
        self.xid.copy_from_slice(&message[4..8]);
        Ok(())
    }

    fn recv(&mut self, _deadline: Instant) -> Result<Option<Vec<u8>>, String> {
        let (flags, mut bytes) = self.replies.pop_front().ok_or("end of the script")?;
        if flags & 1 != 0 && bytes.len() >= 8 {
            bytes[4..8].copy_from_slice(&self.xid);
        }
        if flags & 2 != 0 && bytes.len() >= 34 {
            bytes[28..34].copy_from_slice(&MAC);
        }
        Ok(Some(bytes))
    }

    fn kind(&self) -> &'static str {
        "scripted"
    }
}

fn check(lease: &Lease) {
    assert!(!lease.address.is_unspecified() && !lease.address.is_broadcast());
    assert!(lease.prefix_len <= 32);
    assert!(lease.lease_secs > 0);
    assert!(lease.renew_secs <= lease.rebind_secs, "{lease:?}");
    assert!(lease.rebind_secs <= lease.lease_secs, "{lease:?}");
    let _ = (lease.renew_at(), lease.rebind_at(), lease.expires_at(), lease.is_infinite());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let mut replies = VecDeque::new();
    while rest.len() >= 3 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let flags = rest[2];
        rest = &rest[3..];
        let len = len.min(rest.len());
        replies.push_back((flags, rest[..len].to_vec()));
        rest = &rest[len..];
    }
    let mut transport = Scripted { replies, xid: [0; 4] };
    let backoff = Backoff { first: Duration::from_millis(1), max: Duration::from_millis(2) };
    let mut client = Client::new(&mut transport, MAC, backoff);
    let deadline = Instant::now() + Duration::from_secs(600);
    let result = if mode & 1 == 0 {
        client.obtain(deadline)
    } else {
        let current = Lease {
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            server: Ipv4Addr::new(10, 0, 2, 2),
            lease_secs: 3600,
            renew_secs: 1800,
            rebind_secs: 3150,
            obtained: Instant::now(),
        };
        client.extend(&current, Some(current.server), deadline)
    };
    if let Ok(lease) = result {
        check(&lease);
    }
});

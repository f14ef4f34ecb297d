//! Exchange tests against a scripted in-memory DHCP server (a test double of the transport).

use super::message::{opt, MessageType};
use super::*;
use std::collections::{BTreeMap, VecDeque};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const OFFERED: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const FAST: Backoff = Backoff { first: Duration::from_millis(40), max: Duration::from_millis(80) };

/// A client message as the fake server sees it.
#[derive(Debug, Clone)]
struct Sent {
    kind: u8,
    xid: u32,
    flags: u16,
    ciaddr: Ipv4Addr,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    to: Option<Ipv4Addr>,
}

fn decode(bytes: &[u8], to: Option<Ipv4Addr>) -> Sent {
    assert_eq!(bytes[0], 1, "client messages are BOOTREQUESTs");
    assert_eq!(&bytes[28..34], &MAC);
    let mut options: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    let mut i = 240;
    while bytes[i] != opt::END {
        if bytes[i] == opt::PAD {
            i += 1;
            continue;
        }
        let len = bytes[i + 1] as usize;
        options.insert(bytes[i], bytes[i + 2..i + 2 + len].to_vec());
        i += 2 + len;
    }
    let addr = |code: u8| options.get(&code).map(|v| Ipv4Addr::new(v[0], v[1], v[2], v[3]));
    Sent {
        kind: options[&opt::MESSAGE_TYPE][0],
        xid: u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        flags: u16::from_be_bytes([bytes[10], bytes[11]]),
        ciaddr: Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]),
        requested_ip: addr(opt::REQUESTED_IP),
        server_id: addr(opt::SERVER_ID),
        to,
    }
}

/// A server reply, built by hand.
fn reply(kind: MessageType, xid: u32, mac: [u8; 6], yiaddr: Ipv4Addr, options: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut p = vec![0u8; 240];
    p[0] = 2;
    p[1] = 1;
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[16..20].copy_from_slice(&yiaddr.octets());
    p[28..34].copy_from_slice(&mac);
    p[236..240].copy_from_slice(&[99, 130, 83, 99]);
    p.extend_from_slice(&[opt::MESSAGE_TYPE, 1, kind as u8]);
    for (code, value) in options {
        p.push(*code);
        p.push(value.len() as u8);
        p.extend_from_slice(value);
    }
    p.push(opt::END);
    p
}

fn standard_options(server: Ipv4Addr, lease: u32) -> Vec<(u8, Vec<u8>)> {
    vec![
        (opt::SERVER_ID, server.octets().to_vec()),
        (opt::SUBNET_MASK, vec![255, 255, 255, 0]),
        (opt::ROUTER, SERVER.octets().to_vec()),
        (opt::DNS, vec![10, 0, 2, 3]),
        (opt::LEASE_TIME, lease.to_be_bytes().to_vec()),
    ]
}

type Script = Box<dyn FnMut(&Sent) -> Vec<Vec<u8>>>;

/// Answers each sent message with whatever `script` returns; silence until the deadline otherwise.
struct FakeServer {
    script: Script,
    pending: VecDeque<Vec<u8>>,
    sent: Vec<Sent>,
}

impl FakeServer {
    fn new(script: impl FnMut(&Sent) -> Vec<Vec<u8>> + 'static) -> FakeServer {
        FakeServer { script: Box::new(script), pending: VecDeque::new(), sent: Vec::new() }
    }
}

impl Transport for FakeServer {
    fn send(&mut self, message: &[u8], to: Option<Ipv4Addr>) -> Result<(), String> {
        let sent = decode(message, to);
        let replies = (self.script)(&sent);
        self.pending.extend(replies);
        self.sent.push(sent);
        Ok(())
    }

    fn recv(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, String> {
        if let Some(next) = self.pending.pop_front() {
            return Ok(Some(next));
        }
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        Ok(None)
    }

    fn kind(&self) -> &'static str {
        "fake"
    }
}

/// A well-behaved server: offers OFFERED, acknowledges requests for it.
fn good_server(sent: &Sent) -> Vec<Vec<u8>> {
    match sent.kind {
        1 => vec![reply(MessageType::Offer, sent.xid, MAC, OFFERED, &standard_options(SERVER, 3600))],
        3 => vec![reply(MessageType::Ack, sent.xid, MAC, OFFERED, &standard_options(SERVER, 3600))],
        _ => vec![],
    }
}

#[test]
fn full_exchange_yields_the_lease_and_sends_what_the_rfc_asks() {
    let mut server = FakeServer::new(good_server);
    let lease = Client::new(&mut server, MAC, FAST).obtain(Instant::now() + Duration::from_secs(2)).unwrap();
    assert_eq!(lease.address, OFFERED);
    assert_eq!(lease.prefix_len, 24);
    assert_eq!(lease.gateway, Some(SERVER));
    assert_eq!(lease.dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
    assert_eq!(lease.server, SERVER);
    assert_eq!((lease.lease_secs, lease.renew_secs, lease.rebind_secs), (3600, 1800, 3150));

    let kinds: Vec<u8> = server.sent.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, vec![1, 3]);
    let (discover, request) = (&server.sent[0], &server.sent[1]);
    assert_eq!(discover.xid, request.xid, "one transaction");
    assert!(discover.flags & 0x8000 != 0 && request.flags & 0x8000 != 0, "BROADCAST flag");
    assert_eq!(discover.to, None);
    assert_eq!(request.requested_ip, Some(OFFERED));
    assert_eq!(request.server_id, Some(SERVER));
    assert_eq!(request.ciaddr, Ipv4Addr::UNSPECIFIED);
}

#[test]
fn unrelated_packets_are_ignored() {
    let mut server = FakeServer::new(|sent: &Sent| {
        let mut other_mac = MAC;
        other_mac[5] ^= 1;
        let mut replies = vec![
            b"garbage".to_vec(),
            reply(
                MessageType::Offer,
                sent.xid.wrapping_add(1),
                MAC,
                Ipv4Addr::new(10, 0, 2, 99),
                &standard_options(SERVER, 60),
            ),
            reply(MessageType::Offer, sent.xid, other_mac, Ipv4Addr::new(10, 0, 2, 98), &standard_options(SERVER, 60)),
            reply(MessageType::Ack, sent.xid, MAC, Ipv4Addr::new(10, 0, 2, 97), &standard_options(SERVER, 60)),
        ];
        replies.extend(good_server(sent));
        replies
    });
    let lease = Client::new(&mut server, MAC, FAST).obtain(Instant::now() + Duration::from_secs(2)).unwrap();
    assert_eq!(lease.address, OFFERED);
    assert_eq!(server.sent.len(), 2, "no retransmission needed");
}

#[test]
fn silent_server_means_retransmission_then_a_clear_timeout() {
    let mut server = FakeServer::new(|_: &Sent| vec![]);
    let started = Instant::now();
    let err = Client::new(&mut server, MAC, FAST).obtain(started + Duration::from_millis(500)).unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(500) && elapsed < Duration::from_millis(1500), "{elapsed:?}");
    match &err {
        DhcpError::NoAnswer(text) => assert!(text.contains("no DHCPOFFER"), "{text}"),
        other => panic!("unexpected {other:?}"),
    }
    // 40 ms, then 80 ms waits: about 6 DISCOVERs in 500 ms, all of one transaction.
    assert!((4..=9).contains(&server.sent.len()), "{} sends", server.sent.len());
    assert!(server.sent.iter().all(|s| s.kind == 1 && s.xid == server.sent[0].xid));
}

#[test]
fn only_wrong_xids_time_out_and_say_so() {
    let mut server = FakeServer::new(|sent: &Sent| {
        vec![reply(MessageType::Offer, sent.xid ^ 0xffff, MAC, OFFERED, &standard_options(SERVER, 60))]
    });
    let err = Client::new(&mut server, MAC, FAST).obtain(Instant::now() + Duration::from_millis(300)).unwrap_err();
    assert!(err.to_string().contains("another transaction"), "{err}");
}

#[test]
fn nak_restarts_discovery_with_a_new_transaction() {
    let mut naks_left = 1;
    let mut server = FakeServer::new(move |sent: &Sent| {
        if sent.kind == 3 && naks_left > 0 {
            naks_left -= 1;
            let mut options = vec![(opt::SERVER_ID, SERVER.octets().to_vec())];
            options.push((opt::MESSAGE, b"address taken".to_vec()));
            return vec![reply(MessageType::Nak, sent.xid, MAC, Ipv4Addr::UNSPECIFIED, &options)];
        }
        good_server(sent)
    });
    let lease = Client::new(&mut server, MAC, FAST).obtain(Instant::now() + Duration::from_secs(2)).unwrap();
    assert_eq!(lease.address, OFFERED);
    let kinds: Vec<u8> = server.sent.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, vec![1, 3, 1, 3]);
    assert_ne!(server.sent[0].xid, server.sent[2].xid);
}

#[test]
fn endless_naks_end_in_a_refusal_at_the_deadline() {
    let mut server = FakeServer::new(|sent: &Sent| match sent.kind {
        3 => vec![reply(
            MessageType::Nak,
            sent.xid,
            MAC,
            Ipv4Addr::UNSPECIFIED,
            &[(opt::SERVER_ID, SERVER.octets().to_vec())],
        )],
        _ => good_server(sent),
    });
    let started = Instant::now();
    let err = Client::new(&mut server, MAC, FAST).obtain(started + Duration::from_millis(200));
    // Either the last round was a NAK or the deadline hit between rounds; never a lease.
    assert!(err.is_err());
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn ack_from_a_server_we_did_not_choose_is_ignored() {
    let other = Ipv4Addr::new(10, 0, 2, 250);
    let mut server = FakeServer::new(move |sent: &Sent| match sent.kind {
        3 => vec![
            reply(MessageType::Ack, sent.xid, MAC, Ipv4Addr::new(10, 0, 2, 77), &standard_options(other, 60)),
            reply(MessageType::Ack, sent.xid, MAC, OFFERED, &standard_options(SERVER, 3600)),
        ],
        _ => good_server(sent),
    });
    let lease = Client::new(&mut server, MAC, FAST).obtain(Instant::now() + Duration::from_secs(2)).unwrap();
    assert_eq!((lease.address, lease.server), (OFFERED, SERVER));
}

fn bound_lease() -> Lease {
    let mut server = FakeServer::new(good_server);
    Client::new(&mut server, MAC, FAST).obtain(Instant::now() + Duration::from_secs(2)).unwrap()
}

#[test]
fn renewal_is_unicast_with_ciaddr_and_without_selection_options() {
    let lease = bound_lease();
    let mut server = FakeServer::new(|sent: &Sent| {
        let mut options = standard_options(SERVER, 7200);
        options.push((opt::DNS, vec![10, 0, 2, 4])); // split option: concatenated with the first DNS
        vec![reply(MessageType::Ack, sent.xid, MAC, OFFERED, &options)]
    });
    let renewed = Client::new(&mut server, MAC, FAST)
        .extend(&lease, Some(SERVER), Instant::now() + Duration::from_secs(2))
        .unwrap();
    assert_eq!(renewed.lease_secs, 7200);
    assert_eq!(renewed.dns, vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(10, 0, 2, 4)]);
    assert!(renewed.obtained >= lease.obtained);
    let sent = &server.sent[0];
    assert_eq!((sent.kind, sent.to, sent.ciaddr, sent.flags), (3, Some(SERVER), OFFERED, 0));
    assert_eq!((sent.requested_ip, sent.server_id), (None, None));
}

#[test]
fn nak_during_renewal_is_a_refusal() {
    let lease = bound_lease();
    let mut server = FakeServer::new(|sent: &Sent| {
        vec![reply(
            MessageType::Nak,
            sent.xid,
            MAC,
            Ipv4Addr::UNSPECIFIED,
            &[(opt::SERVER_ID, SERVER.octets().to_vec())],
        )]
    });
    let err =
        Client::new(&mut server, MAC, FAST).extend(&lease, None, Instant::now() + Duration::from_secs(2)).unwrap_err();
    assert_eq!(err, DhcpError::Refused { server: SERVER, reason: None });
    assert_eq!(server.sent[0].to, None, "rebinding broadcasts");
}

#[test]
fn lease_times_follow_options_58_and_59_when_sane() {
    let ack = |extra: &[(u8, Vec<u8>)]| {
        let mut options = standard_options(SERVER, 1000);
        options.extend_from_slice(extra);
        Reply::parse(&reply(MessageType::Ack, 1, MAC, OFFERED, &options)).unwrap()
    };
    let now = Instant::now();
    let t = |r: &Reply| {
        let l = Lease::from_ack(r, None, now).unwrap();
        (l.renew_secs, l.rebind_secs)
    };
    assert_eq!(t(&ack(&[])), (500, 875));
    assert_eq!(t(&ack(&[(58, 100u32.to_be_bytes().to_vec()), (59, 200u32.to_be_bytes().to_vec())])), (100, 200));
    assert_eq!(
        t(&ack(&[(58, 900u32.to_be_bytes().to_vec()), (59, 200u32.to_be_bytes().to_vec())])),
        (500, 875),
        "T1 > T2 ignored"
    );
    assert_eq!(t(&ack(&[(59, 5000u32.to_be_bytes().to_vec())])), (500, 875), "T2 beyond the lease ignored");

    let no_lease =
        Reply::parse(&reply(MessageType::Ack, 1, MAC, OFFERED, &[(opt::SERVER_ID, SERVER.octets().to_vec())])).unwrap();
    assert!(Lease::from_ack(&no_lease, None, now).unwrap_err().contains("lease time"));
    let zero =
        Reply::parse(&reply(MessageType::Ack, 1, MAC, Ipv4Addr::UNSPECIFIED, &standard_options(SERVER, 60))).unwrap();
    assert!(Lease::from_ack(&zero, None, now).is_err());
    let zero_length = Reply::parse(&reply(MessageType::Ack, 1, MAC, OFFERED, &standard_options(SERVER, 0))).unwrap();
    assert!(Lease::from_ack(&zero_length, None, now).is_err());
    let infinite =
        Reply::parse(&reply(MessageType::Ack, 1, MAC, OFFERED, &standard_options(SERVER, u32::MAX))).unwrap();
    assert!(Lease::from_ack(&infinite, None, now).unwrap().is_infinite());
}

//! DHCPv4 messages (RFC 2131 layout, RFC 2132 options): building the client's requests and
//! parsing servers' replies. Pure byte handling, no I/O, so every rule is unit-tested.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Fixed BOOTP header (236 bytes) plus the 4-byte magic cookie.
const HEADER_LEN: usize = 236;
const OPTIONS_START: usize = HEADER_LEN + 4;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
const SNAME: std::ops::Range<usize> = 44..108;
const FILE: std::ops::Range<usize> = 108..236;
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHERNET: u8 = 1;
/// The "please broadcast your reply" bit of the flags field: we cannot receive unicast before
/// the interface has an address.
const FLAG_BROADCAST: u16 = 0x8000;
/// The largest reply we accept (option 57): a full Ethernet frame's IP payload.
pub const MAX_MESSAGE_SIZE: u16 = 1500;

pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMETER_LIST: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_SIZE: u8 = 57;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    fn from_byte(b: u8) -> Option<MessageType> {
        use MessageType::{Ack, Decline, Discover, Inform, Nak, Offer, Release, Request};
        Some(match b {
            1 => Discover,
            2 => Offer,
            3 => Request,
            4 => Decline,
            5 => Ack,
            6 => Nak,
            7 => Release,
            8 => Inform,
            _ => return None,
        })
    }
}

/// What a client request carries besides its type.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: MessageType,
    pub xid: u32,
    pub secs: u16,
    pub mac: [u8; 6],
    /// Our current address when renewing or rebinding (RFC 2131 4.3.2), else unspecified.
    pub ciaddr: Ipv4Addr,
    /// Option 50: the offered address we accept (SELECTING state only).
    pub requested_ip: Option<Ipv4Addr>,
    /// Option 54: the server whose offer we accept (SELECTING state only).
    pub server_id: Option<Ipv4Addr>,
    pub broadcast: bool,
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; OPTIONS_START];
        out[0] = BOOTREQUEST;
        out[1] = HTYPE_ETHERNET;
        out[2] = 6;
        out[4..8].copy_from_slice(&self.xid.to_be_bytes());
        out[8..10].copy_from_slice(&self.secs.to_be_bytes());
        let flags = if self.broadcast { FLAG_BROADCAST } else { 0 };
        out[10..12].copy_from_slice(&flags.to_be_bytes());
        out[12..16].copy_from_slice(&self.ciaddr.octets());
        out[28..34].copy_from_slice(&self.mac);
        out[HEADER_LEN..OPTIONS_START].copy_from_slice(&MAGIC_COOKIE);

        push_option(&mut out, opt::MESSAGE_TYPE, &[self.kind as u8]);
        // Client identifier: hardware type 1 followed by the MAC (RFC 2132 9.14).
        let mut client_id = vec![HTYPE_ETHERNET];
        client_id.extend_from_slice(&self.mac);
        push_option(&mut out, opt::CLIENT_ID, &client_id);
        if let Some(ip) = self.requested_ip {
            push_option(&mut out, opt::REQUESTED_IP, &ip.octets());
        }
        if let Some(server) = self.server_id {
            push_option(&mut out, opt::SERVER_ID, &server.octets());
        }
        push_option(&mut out, opt::MAX_SIZE, &MAX_MESSAGE_SIZE.to_be_bytes());
        push_option(
            &mut out,
            opt::PARAMETER_LIST,
            &[opt::SUBNET_MASK, opt::ROUTER, opt::DNS, opt::LEASE_TIME, opt::RENEWAL_TIME, opt::REBINDING_TIME],
        );
        out.push(opt::END);
        // Some old BOOTP relays drop messages shorter than a BOOTP packet (300 bytes).
        if out.len() < 300 {
            out.resize(300, opt::PAD);
        }
        out
    }
}

fn push_option(out: &mut Vec<u8>, code: u8, value: &[u8]) {
    // Values longer than 255 bytes are split into several instances (RFC 3396); ours never are.
    for chunk in value.chunks(255) {
        out.push(code);
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
}

/// A server's reply, structurally valid (header, cookie, well-formed options, a message type).
/// Whether it is for us (xid, MAC) is the exchange's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub kind: MessageType,
    pub xid: u32,
    pub yiaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    /// Option values by code; repeated instances are concatenated (RFC 3396).
    pub options: BTreeMap<u8, Vec<u8>>,
}

impl Reply {
    pub fn parse(packet: &[u8]) -> Result<Reply, String> {
        if packet.len() < OPTIONS_START {
            return Err(format!("{} bytes is shorter than a DHCP header", packet.len()));
        }
        if packet[0] != BOOTREPLY {
            return Err(format!("op {} is not a BOOTREPLY", packet[0]));
        }
        if packet[1] != HTYPE_ETHERNET || packet[2] != 6 {
            return Err(format!("hardware type {}/{} is not Ethernet", packet[1], packet[2]));
        }
        if packet[HEADER_LEN..OPTIONS_START] != MAGIC_COOKIE {
            return Err("no DHCP magic cookie".into());
        }
        let mut options = BTreeMap::new();
        parse_options(&packet[OPTIONS_START..], &mut options, "options")?;
        // Option overload (52): the sname and/or file fields carry more options (RFC 2132 9.3).
        let overload = options.get(&opt::OVERLOAD).cloned();
        if let Some(overload) = overload {
            let which = match overload.as_slice() {
                [v @ 1..=3] => *v,
                _ => return Err(format!("bad option overload value {overload:?}")),
            };
            if which & 1 != 0 {
                parse_options(&packet[FILE], &mut options, "file field")?;
            }
            if which & 2 != 0 {
                parse_options(&packet[SNAME], &mut options, "sname field")?;
            }
        }
        let kind = match options.get(&opt::MESSAGE_TYPE).map(Vec::as_slice) {
            Some([b]) => MessageType::from_byte(*b).ok_or_else(|| format!("unknown DHCP message type {b}"))?,
            Some(other) => return Err(format!("message type option has length {}", other.len())),
            None => return Err("no DHCP message type (plain BOOTP)".into()),
        };
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&packet[28..34]);
        Ok(Reply {
            kind,
            xid: u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]),
            yiaddr: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
            chaddr,
            options,
        })
    }

    fn addr_option(&self, code: u8) -> Result<Option<Ipv4Addr>, String> {
        match self.options.get(&code).map(Vec::as_slice) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(Ipv4Addr::new(a, b, c, d))),
            Some(other) => Err(format!("option {code} has length {}, expected 4", other.len())),
        }
    }

    fn addr_list_option(&self, code: u8) -> Result<Vec<Ipv4Addr>, String> {
        match self.options.get(&code) {
            None => Ok(Vec::new()),
            Some(v) if v.is_empty() || v.len() % 4 != 0 => {
                Err(format!("option {code} has length {}, not a list of addresses", v.len()))
            }
            Some(v) => Ok(v.chunks_exact(4).map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3])).collect()),
        }
    }

    fn u32_option(&self, code: u8) -> Result<Option<u32>, String> {
        match self.options.get(&code).map(Vec::as_slice) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(u32::from_be_bytes([a, b, c, d]))),
            Some(other) => Err(format!("option {code} has length {}, expected 4", other.len())),
        }
    }

    pub fn server_id(&self) -> Result<Option<Ipv4Addr>, String> {
        self.addr_option(opt::SERVER_ID)
    }

    /// The subnet mask as a prefix length; a mask with holes is an error.
    pub fn prefix_len(&self) -> Result<Option<u8>, String> {
        match self.addr_option(opt::SUBNET_MASK)? {
            None => Ok(None),
            Some(mask) => mask_to_prefix(mask).map(Some).ok_or_else(|| format!("subnet mask {mask} is not contiguous")),
        }
    }

    /// The first router of option 3 (the others are fallbacks we do not use).
    pub fn router(&self) -> Result<Option<Ipv4Addr>, String> {
        Ok(self.addr_list_option(opt::ROUTER)?.first().copied())
    }

    pub fn dns(&self) -> Result<Vec<Ipv4Addr>, String> {
        self.addr_list_option(opt::DNS)
    }

    pub fn lease_secs(&self) -> Result<Option<u32>, String> {
        self.u32_option(opt::LEASE_TIME)
    }

    pub fn renewal_secs(&self) -> Result<Option<u32>, String> {
        self.u32_option(opt::RENEWAL_TIME)
    }

    pub fn rebinding_secs(&self) -> Result<Option<u32>, String> {
        self.u32_option(opt::REBINDING_TIME)
    }

    /// Option 56, the server's human-readable reason (sent with a NAK), printable ASCII only.
    pub fn server_message(&self) -> Option<String> {
        let text = self.options.get(&opt::MESSAGE)?;
        Some(text.iter().map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '?' }).collect())
    }
}

/// Walks one option area. Pad is skipped, End stops; an option whose length runs past the area
/// is an error (a truncated or forged packet), as is an area without End.
fn parse_options(area: &[u8], into: &mut BTreeMap<u8, Vec<u8>>, what: &str) -> Result<(), String> {
    let mut i = 0;
    while i < area.len() {
        let code = area[i];
        match code {
            opt::PAD => i += 1,
            opt::END => return Ok(()),
            _ => {
                let len = *area.get(i + 1).ok_or_else(|| format!("{what}: option {code} has no length byte"))? as usize;
                let value = area
                    .get(i + 2..i + 2 + len)
                    .ok_or_else(|| format!("{what}: option {code} of length {len} runs past the end"))?;
                into.entry(code).or_default().extend_from_slice(value);
                i += 2 + len;
            }
        }
    }
    Err(format!("{what}: no end option"))
}

pub fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let prefix = bits.leading_ones();
    (bits.checked_shl(prefix).unwrap_or(0) == 0).then_some(prefix as u8)
}

pub fn prefix_to_mask(prefix_len: u8) -> Ipv4Addr {
    let bits = if prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix_len.min(32))) };
    Ipv4Addr::from(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    /// A server reply as bytes, built independently of `Request::encode`.
    fn reply_bytes(kind: u8, xid: u32, options: &[(u8, &[u8])]) -> Vec<u8> {
        let mut p = vec![0u8; OPTIONS_START];
        p[0] = BOOTREPLY;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&xid.to_be_bytes());
        p[16..20].copy_from_slice(&[10, 0, 2, 15]);
        p[28..34].copy_from_slice(&MAC);
        p[236..240].copy_from_slice(&MAGIC_COOKIE);
        p.extend_from_slice(&[53, 1, kind]);
        for (code, value) in options {
            p.push(*code);
            p.push(value.len() as u8);
            p.extend_from_slice(value);
        }
        p.push(255);
        p
    }

    #[test]
    fn request_has_the_rfc_layout_and_options() {
        let req = Request {
            kind: MessageType::Request,
            xid: 0xdeadbeef,
            secs: 3,
            mac: MAC,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            requested_ip: Some(Ipv4Addr::new(10, 0, 2, 15)),
            server_id: Some(Ipv4Addr::new(10, 0, 2, 2)),
            broadcast: true,
        };
        let bytes = req.encode();
        assert!(bytes.len() >= 300);
        assert_eq!(&bytes[0..3], &[1, 1, 6]);
        assert_eq!(&bytes[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&bytes[8..10], &[0, 3]);
        assert_eq!(&bytes[10..12], &[0x80, 0x00], "broadcast flag");
        assert_eq!(&bytes[28..34], &MAC);
        assert_eq!(&bytes[236..240], &MAGIC_COOKIE);
        let mut options = BTreeMap::new();
        parse_options(&bytes[240..], &mut options, "test").unwrap();
        assert_eq!(options[&opt::MESSAGE_TYPE], vec![3]);
        assert_eq!(options[&opt::REQUESTED_IP], vec![10, 0, 2, 15]);
        assert_eq!(options[&opt::SERVER_ID], vec![10, 0, 2, 2]);
        assert_eq!(options[&opt::CLIENT_ID], vec![1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        let wanted = &options[&opt::PARAMETER_LIST];
        for code in [1, 3, 6, 51] {
            assert!(wanted.contains(&code), "parameter list lacks {code}");
        }
    }

    #[test]
    fn discover_without_selection_options_and_renewal_without_broadcast() {
        let discover = Request {
            kind: MessageType::Discover,
            xid: 1,
            secs: 0,
            mac: MAC,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            requested_ip: None,
            server_id: None,
            broadcast: true,
        };
        let mut options = BTreeMap::new();
        parse_options(&discover.encode()[240..], &mut options, "test").unwrap();
        assert_eq!(options[&opt::MESSAGE_TYPE], vec![1]);
        assert!(!options.contains_key(&opt::REQUESTED_IP) && !options.contains_key(&opt::SERVER_ID));

        let renew =
            Request { kind: MessageType::Request, ciaddr: Ipv4Addr::new(10, 0, 2, 15), broadcast: false, ..discover };
        let bytes = renew.encode();
        assert_eq!(&bytes[10..12], &[0, 0]);
        assert_eq!(&bytes[12..16], &[10, 0, 2, 15]);
    }

    #[test]
    fn parses_an_ack_with_all_fields() {
        let bytes = reply_bytes(
            5,
            77,
            &[
                (1, &[255, 255, 255, 0]),
                (3, &[10, 0, 2, 2, 10, 0, 2, 1]),
                (6, &[10, 0, 2, 3, 9, 9, 9, 9]),
                (51, &[0, 0, 0x0e, 0x10]),
                (54, &[10, 0, 2, 2]),
            ],
        );
        let reply = Reply::parse(&bytes).unwrap();
        assert_eq!(reply.kind, MessageType::Ack);
        assert_eq!(reply.xid, 77);
        assert_eq!(reply.yiaddr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(reply.chaddr, MAC);
        assert_eq!(reply.prefix_len().unwrap(), Some(24));
        assert_eq!(reply.router().unwrap(), Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(reply.dns().unwrap(), vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(9, 9, 9, 9)]);
        assert_eq!(reply.lease_secs().unwrap(), Some(3600));
        assert_eq!(reply.server_id().unwrap(), Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(reply.renewal_secs().unwrap(), None);
    }

    #[test]
    fn every_truncation_of_a_reply_is_rejected_without_panic() {
        let bytes = reply_bytes(2, 9, &[(54, &[10, 0, 2, 2]), (51, &[0, 0, 1, 0])]);
        assert!(Reply::parse(&bytes).is_ok());
        for len in 0..bytes.len() {
            assert!(Reply::parse(&bytes[..len]).is_err(), "accepted a reply cut to {len} bytes");
        }
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(Reply::parse(&[]).is_err());
        assert!(Reply::parse(&[0xff; 600]).is_err());
        let mut no_cookie = reply_bytes(2, 1, &[]);
        no_cookie[236] = 0;
        assert!(Reply::parse(&no_cookie).unwrap_err().contains("cookie"));
        let mut request_op = reply_bytes(2, 1, &[]);
        request_op[0] = BOOTREQUEST;
        assert!(Reply::parse(&request_op).is_err());
        let mut bootp = reply_bytes(2, 1, &[]);
        bootp[240] = opt::PAD; // blank out the message type option: plain BOOTP
        bootp[241] = opt::PAD;
        bootp[242] = opt::PAD;
        assert!(Reply::parse(&bootp).unwrap_err().contains("message type"));
        assert!(Reply::parse(&reply_bytes(99, 1, &[])).unwrap_err().contains("unknown"));
        // Deterministic pseudo-random noise after a valid header must never panic.
        let mut seed = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut p = reply_bytes(2, 1, &[]);
            p.truncate(240);
            for _ in 0..(seed % 64) {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                p.push((seed >> 16) as u8);
            }
            let _ = Reply::parse(&p);
        }
    }

    #[test]
    fn option_running_past_the_end_is_rejected() {
        let mut bytes = reply_bytes(5, 1, &[]);
        bytes.pop(); // drop End
        bytes.extend_from_slice(&[6, 200, 10, 0, 2, 3]);
        let err = Reply::parse(&bytes).unwrap_err();
        assert!(err.contains("runs past the end"), "{err}");
    }

    #[test]
    fn malformed_option_values_are_errors_not_guesses() {
        let reply = Reply::parse(&reply_bytes(5, 1, &[(1, &[255, 0, 255, 0]), (3, &[1, 2, 3]), (51, &[1])])).unwrap();
        assert!(reply.prefix_len().unwrap_err().contains("not contiguous"));
        assert!(reply.router().is_err());
        assert!(reply.lease_secs().is_err());
    }

    #[test]
    fn overloaded_file_and_sname_fields_carry_options() {
        let mut bytes = reply_bytes(5, 1, &[(52, &[3])]);
        bytes[FILE.start..FILE.start + 7].copy_from_slice(&[51, 4, 0, 0, 0, 60, 255]);
        bytes[SNAME.start..SNAME.start + 7].copy_from_slice(&[6, 4, 10, 0, 2, 3, 255]);
        let reply = Reply::parse(&bytes).unwrap();
        assert_eq!(reply.lease_secs().unwrap(), Some(60));
        assert_eq!(reply.dns().unwrap(), vec![Ipv4Addr::new(10, 0, 2, 3)]);

        // Overload announced but the file field has no End: rejected.
        let mut broken = reply_bytes(5, 1, &[(52, &[1])]);
        broken[FILE].fill(0x01);
        assert!(Reply::parse(&broken).is_err());
        assert!(Reply::parse(&reply_bytes(5, 1, &[(52, &[7])])).unwrap_err().contains("overload"));
    }

    #[test]
    fn split_options_are_concatenated() {
        let reply = Reply::parse(&reply_bytes(5, 1, &[(6, &[10, 0, 2, 3]), (6, &[10, 0, 2, 4])])).unwrap();
        assert_eq!(reply.dns().unwrap(), vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(10, 0, 2, 4)]);
    }

    #[test]
    fn masks_and_prefixes_convert_both_ways() {
        for prefix in 0..=32u8 {
            assert_eq!(mask_to_prefix(prefix_to_mask(prefix)), Some(prefix));
        }
        assert_eq!(prefix_to_mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 0, 255)), None);
    }

    #[test]
    fn server_message_is_sanitised() {
        let reply = Reply::parse(&reply_bytes(6, 1, &[(56, b"wrong\nnet\x1b")])).unwrap();
        assert_eq!(reply.server_message().as_deref(), Some("wrong?net?"));
    }
}

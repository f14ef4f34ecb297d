//! IPv4 + UDP framing for DHCP over a packet socket, where the kernel's IP stack is bypassed
//! and we build and check the headers ourselves (RFC 791, RFC 768).

use std::net::Ipv4Addr;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
const IPV4_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
const PROTO_UDP: u8 = 17;

/// Wraps a DHCP payload in IPv4/UDP headers from 0.0.0.0:68 to 255.255.255.255:67, the only
/// addressing a client without an address may use (RFC 2131 4.1).
pub fn broadcast_datagram(payload: &[u8]) -> Result<Vec<u8>, String> {
    let udp_len = UDP_HEADER_LEN + payload.len();
    let total_len = IPV4_HEADER_LEN + udp_len;
    let total = u16::try_from(total_len).map_err(|_| format!("DHCP message of {} bytes is too long", payload.len()))?;
    let src = Ipv4Addr::UNSPECIFIED.octets();
    let dst = Ipv4Addr::BROADCAST.octets();

    let mut out = Vec::with_capacity(total_len);
    out.extend_from_slice(&[0x45, 0]); // version 4, 5-word header; no TOS
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // id 0, not fragmented
    out.extend_from_slice(&[64, PROTO_UDP, 0, 0]); // TTL, protocol, checksum placeholder
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    let ip_sum = checksum(&[&out[..IPV4_HEADER_LEN]]);
    out[10..12].copy_from_slice(&ip_sum.to_be_bytes());

    let udp_start = out.len();
    out.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    out.extend_from_slice(&SERVER_PORT.to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let pseudo = pseudo_header(src, dst, udp_len as u16);
    let udp_sum = match checksum(&[&pseudo, &out[udp_start..]]) {
        0 => 0xffff, // 0 means "no checksum" in UDP, so a computed 0 is sent as all ones
        sum => sum,
    };
    out[udp_start + 6..udp_start + 8].copy_from_slice(&udp_sum.to_be_bytes());
    Ok(out)
}

/// The UDP payload of an IPv4 packet sent to `dst_port` from the DHCP server port, or why the
/// packet is not one. The UDP checksum is deliberately not verified: with checksum offload
/// (virtio-net, veth) a packet socket sees frames whose UDP checksum is still partial; the IP
/// header checksum is always complete and is checked.
pub fn udp_payload(packet: &[u8], dst_port: u16) -> Result<&[u8], String> {
    if packet.len() < IPV4_HEADER_LEN {
        return Err(format!("{} bytes is shorter than an IPv4 header", packet.len()));
    }
    if packet[0] >> 4 != 4 {
        return Err(format!("IP version {}", packet[0] >> 4));
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if header_len < IPV4_HEADER_LEN || total_len < header_len || total_len > packet.len() {
        return Err(format!(
            "inconsistent IPv4 lengths (header {header_len}, total {total_len}, got {})",
            packet.len()
        ));
    }
    if checksum(&[&packet[..header_len]]) != 0 {
        return Err("bad IPv4 header checksum".into());
    }
    let fragment = u16::from_be_bytes([packet[6], packet[7]]);
    if fragment & 0x3fff != 0 {
        return Err("IPv4 fragment".into());
    }
    if packet[9] != PROTO_UDP {
        return Err(format!("IP protocol {} is not UDP", packet[9]));
    }
    let udp = &packet[header_len..total_len];
    if udp.len() < UDP_HEADER_LEN {
        return Err("truncated UDP header".into());
    }
    let src_port = u16::from_be_bytes([udp[0], udp[1]]);
    let port = u16::from_be_bytes([udp[2], udp[3]]);
    if port != dst_port || src_port != SERVER_PORT {
        return Err(format!("UDP {src_port}->{port} is not DHCP server->client"));
    }
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < UDP_HEADER_LEN || udp_len > udp.len() {
        return Err(format!("UDP length {udp_len} does not fit the {}-byte datagram", udp.len()));
    }
    Ok(&udp[UDP_HEADER_LEN..udp_len])
}

fn pseudo_header(src: [u8; 4], dst: [u8; 4], udp_len: u16) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src);
    p[4..8].copy_from_slice(&dst);
    p[9] = PROTO_UDP;
    p[10..12].copy_from_slice(&udp_len.to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`, each of even length
/// except possibly the last. Over a header that contains its own correct checksum it yields 0.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut words = part.chunks_exact(2);
        for w in &mut words {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            sum += u32::from(*last) << 8;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server reply datagram, headers built by hand.
    fn reply(payload: &[u8]) -> Vec<u8> {
        let total = (20 + 8 + payload.len()) as u16;
        let mut p = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
            10,
            0,
            2,
            2,
            255,
            255,
            255,
            255,
        ];
        let sum = checksum(&[&p]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        let udp_len = (8 + payload.len()) as u16;
        p.extend_from_slice(&[0, 67, 0, 68, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn broadcast_datagram_has_valid_headers_and_checksums() {
        let payload = b"hello dhcp, odd length";
        let dgram = broadcast_datagram(payload).unwrap();
        assert_eq!(dgram.len(), 20 + 8 + payload.len());
        assert_eq!(checksum(&[&dgram[..20]]), 0, "IP header checksum must verify");
        assert_eq!(&dgram[12..20], &[0, 0, 0, 0, 255, 255, 255, 255]);
        assert_eq!(&dgram[20..24], &[0, 68, 0, 67]);
        let pseudo = pseudo_header([0; 4], [255; 4], (8 + payload.len()) as u16);
        assert_eq!(checksum(&[&pseudo, &dgram[20..]]), 0, "UDP checksum must verify");
        assert_eq!(&dgram[28..], payload);
    }

    #[test]
    fn known_checksum_value() {
        // Header from RFC 1071-style worked examples: 45 00 00 73 00 00 40 00 40 11 .. c0 a8 00 01 c0 a8 00 c7
        let header = [0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0, 1, 0xc0, 0xa8, 0, 0xc7];
        assert_eq!(checksum(&[&header]), 0xb861);
    }

    #[test]
    fn extracts_the_payload_and_ignores_ethernet_padding() {
        let mut p = reply(b"payload");
        p.extend_from_slice(&[0; 10]); // frame padding beyond the IP total length
        assert_eq!(udp_payload(&p, CLIENT_PORT).unwrap(), b"payload");
    }

    #[test]
    fn rejects_what_is_not_a_dhcp_reply() {
        let good = reply(b"x");
        assert!(udp_payload(&good, 1234).is_err(), "wrong port");
        let mut bad_sum = good.clone();
        bad_sum[8] = 1; // TTL changed without fixing the checksum
        assert!(udp_payload(&bad_sum, CLIENT_PORT).unwrap_err().contains("checksum"));
        let mut tcp = good.clone();
        tcp[9] = 6;
        assert!(udp_payload(&tcp, CLIENT_PORT).is_err());
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert!(udp_payload(&v6, CLIENT_PORT).is_err());
        for len in 0..good.len() {
            assert!(udp_payload(&good[..len], CLIENT_PORT).is_err(), "accepted {len}-byte truncation");
        }
        let mut long_udp = good.clone();
        long_udp[24..26].copy_from_slice(&200u16.to_be_bytes());
        assert!(udp_payload(&long_udp, CLIENT_PORT).is_err());
    }
}

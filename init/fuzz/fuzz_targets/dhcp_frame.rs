//! What the DHCP client's packet socket receives: a raw IPv4 packet, from which
//! `frame::udp_payload` extracts the UDP payload sent by a DHCP server (then parsed as a
//! reply). Nothing may panic and the payload must lie inside the packet. Also: any payload the
//! client wraps with `broadcast_datagram` comes back out unchanged once the ports are swapped.
//! Input: byte 0 holds flags (bit 0: recompute the IPv4 header checksum so the fuzzer gets
//! past it), the rest is the packet.
#![no_main]

use init::sys::net::dhcp::frame::{broadcast_datagram, udp_payload, CLIENT_PORT, SERVER_PORT};
use init::sys::net::dhcp::message::Reply;
use libfuzzer_sys::fuzz_target;

/// RFC 1071 one's-complement sum of 16-bit big-endian words, complemented.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, packet)) = data.split_first() else { return };
    let mut packet = packet.to_vec();
    if flags & 1 != 0 && !packet.is_empty() {
        let header_len = usize::from(packet[0] & 0x0f) * 4;
        if header_len >= 20 && header_len <= packet.len() {
            packet[10..12].fill(0);
            let sum = internet_checksum(&packet[..header_len]);
            packet[10..12].copy_from_slice(&sum.to_be_bytes());
        }
    }
    if let Ok(payload) = udp_payload(&packet, CLIENT_PORT) {
        let start = payload.as_ptr() as usize - packet.as_ptr() as usize;
        assert!(start + payload.len() <= packet.len());
        let _ = Reply::parse(payload);
    }

    // The other direction: what the client sends, read back as if a server had sent it.
    let payload = &data[1..];
    if let Ok(mut datagram) = broadcast_datagram(payload) {
        assert_eq!(internet_checksum(&datagram[..20]), 0, "IPv4 header checksum must verify");
        datagram[20..24].copy_from_slice(&[
            SERVER_PORT.to_be_bytes()[0],
            SERVER_PORT.to_be_bytes()[1],
            CLIENT_PORT.to_be_bytes()[0],
            CLIENT_PORT.to_be_bytes()[1],
        ]);
        assert_eq!(udp_payload(&datagram, CLIENT_PORT).expect("own datagram parses"), payload);
    }
});

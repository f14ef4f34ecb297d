//! A DHCP server's reply as the client parses it (`Reply::parse`, RFC 2131/2132 with option
//! overload and split options), then every accessor the client uses on it. Nothing may panic;
//! a subnet mask that parses gives a prefix that converts back to the same mask.
//! Input: the UDP payload.
#![no_main]

use init::sys::net::dhcp::message::{mask_to_prefix, prefix_to_mask, Reply};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;

fuzz_target!(|data: &[u8]| {
    let Ok(reply) = Reply::parse(data) else { return };
    let _ = reply.server_id();
    if let Ok(Some(prefix)) = reply.prefix_len() {
        assert!(prefix <= 32);
        assert_eq!(mask_to_prefix(prefix_to_mask(prefix)), Some(prefix));
    }
    let _ = reply.router();
    if let Ok(dns) = reply.dns() {
        assert!(!dns.is_empty() || !reply.options.contains_key(&6));
    }
    let _ = reply.lease_secs();
    let _ = reply.renewal_secs();
    let _ = reply.rebinding_secs();
    if let Some(message) = reply.server_message() {
        assert!(message.chars().all(|c| (' '..='~').contains(&c)));
    }
    // Every mask either has a prefix that maps back to it or none.
    if let Some(&[a, b, c, d]) = reply.options.get(&1).map(Vec::as_slice) {
        let mask = Ipv4Addr::new(a, b, c, d);
        if let Some(prefix) = mask_to_prefix(mask) {
            assert_eq!(prefix_to_mask(prefix), mask);
        }
    }
});

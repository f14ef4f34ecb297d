//! `qemu-test`: boots the real appliance image in QEMU and drives it end to end through its
//! public surfaces (HTTP API, console, QEMU monitor), sharing one booted appliance across the
//! scenarios that can share it. It must never reach into the guest by any back door the product
//! does not have, and never talk to any network address but loopback.

pub mod api;
pub mod bench;
pub mod check;
pub mod harness;
pub mod scenarios;
pub mod snippets;
pub mod template_fixture;
pub mod upstream;

//! The sealing proxy: the sandboxes' only way out (over vsock), which terminates their TLS with the appliance CA, enforces each sandbox's egress allowlist, refuses private destinations and replaces a sandbox's own sealed tokens by secret values only towards hosts each secret may reach.
//! It must never log, print, return or persist a secret value, never trust an identity the sandbox claims, and never dial an upstream without verifying its certificate.
//!
//! Use: fill a [`SealRegistry`] (the appliance keeps it current), build a
//! [`ProxyConfig`] (CA as PEM, trust, overrides, limits), then
//! `Proxy::new(config, registry)?.serve(source).await` on a tokio runtime, with a
//! [`VsockListener`] as the source (identity = peer CID). Plain `http://` requests are
//! forwarded without substitution: secrets only leave over verified TLS.

pub mod body;
pub mod ca;
pub mod config;
mod destination;
pub mod egress;
pub mod egress_log;
pub mod forward;
pub mod hostmatch;
pub mod http;
pub mod io;
pub mod listener;
pub mod registry;
pub mod relay;
pub mod scrub;
pub mod secret;
pub mod server;
mod session;
mod shared;
pub mod subst;
pub mod tls;
pub mod vsock;
pub mod websocket;

pub use ca::{CaPem, CertificateAuthority};
pub use config::{Limits, ProxyConfig, Timeouts};
pub use egress::Cidr;
pub use listener::{ConnectionSource, TcpSource, UnixSource};
pub use registry::{SandboxBindings, SandboxId, SealRegistry, SealedSecret};
pub use secret::SecretValue;
pub use server::{Proxy, ProxyError};
pub use tls::UpstreamTrust;
pub use vsock::{VsockListener, VsockStream};

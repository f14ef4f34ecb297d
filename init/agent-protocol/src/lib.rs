//! The agent protocol between the appliance and the agent inside each sandbox: message types,
//! their binary encoding, framing, the transports it runs over, and the blocking client the
//! appliance uses. PROTOCOL.md beside this crate specifies the wire format.
//!
//! Both ends read bytes the other side chose: the agent trusts nothing from the host beyond the
//! framing, and the appliance must treat every reply as hostile (a sandbox is root in its VM and
//! may replace the agent). Decoding therefore never panics and never allocates beyond a frame.

pub mod client;
pub mod codec;
pub mod frame;
pub mod message;
pub mod transport;

/// The vsock port the agent listens on inside every sandbox.
pub const AGENT_PORT: u32 = 1024;
/// The host vsock port the sandbox's egress forwarder connects to (the sealing proxy).
pub const EGRESS_PORT: u32 = 1080;
/// Where programs in the sandbox reach the egress forwarder (`HTTPS_PROXY=http://127.0.0.1:3128`).
pub const EGRESS_LISTEN: &str = "127.0.0.1:3128";

pub use client::{AgentClient, AgentError, AttachEvent, ClientTimeouts, RunOutput};
pub use message::{
    Command, DirEntry, EnvVars, ErrorCode, ExitStatus, FileStat, OutputStream, Power, PtySpec, RunExit, RunSpec,
    SessionInfo, SessionSpec, WindowSize, WriteSpec, MAX_WINDOW_SIDE,
};

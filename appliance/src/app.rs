//! Everything a request handler can reach, shared by all server threads.

use serde_json::Value;

use crate::auth::Auth;
use crate::capacity::Capacity;
use crate::http::long_work::LongWork;
use crate::lifecycle::Lifecycle;
use crate::master_key::{live::LiveKeyring, KeyStore};
use crate::metrics::Metrics;
use crate::store::Store;

pub struct App {
    pub store: Store,
    pub keyring: std::sync::Arc<LiveKeyring>,
    /// Where the master key is kept (None: the operator's `--master-key-file`, rotated offline).
    pub master_keys: Option<KeyStore>,
    pub auth: Auth,
    pub lifecycle: Lifecycle,
    /// What sandboxes may commit (guest memory, vCPUs, disk) and what they hold.
    pub capacity: Capacity,
    pub metrics: Metrics,
    /// Threads serving requests that may take long, and their cap.
    pub long_work: LongWork,
    /// Commands started with `exec/run-async` and their results.
    pub async_execs: std::sync::Arc<crate::api::exec_async::AsyncExecs>,
    /// When exec sessions started and who is attached to them.
    pub exec_sessions: std::sync::Arc<crate::session_book::SessionBook>,
    /// `vmm selfcheck`'s JSON, reported by healthz.
    pub kvm: Value,
    /// One log line per request (off for benchmarks).
    pub log_requests: bool,
    /// Imports and saves of templates (`/api/templates`).
    pub templates: crate::templates::Templates,
    /// Staging of A/B upgrades (`/api/system/upgrade`).
    pub upgrades: crate::upgrade::Upgrades,
    /// This process is the appliance's system service under oc-init (PID 1), which reboots or
    /// powers off the machine when asked (`/api/system/reboot`, `/api/system/poweroff`).
    pub power_control: bool,
    /// `https` or `http`: how clients reach the API (the front's TLS, or plain where the operator
    /// turned it on); the origin of signed file URLs is this and the request's `Host`.
    pub api_scheme: &'static str,
}

//! The typed records kept in the store. Timestamps are unix seconds; the API layer
//! formats them as RFC 3339.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectRecord {
    pub id: String,
    pub name: String,
    pub template: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    pub timeout_sec: u64,
    pub egress_allowlist: Vec<String>,
    /// Whether its sandboxes hibernate when their idle timeout passes (true, as OpenComputer's
    /// idle timeout does) or stop (false). Absent in records written before hibernation: true.
    #[serde(default = "default_true")]
    pub auto_hibernate: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxStatus {
    /// Recorded before its VMM starts, so a restart in the middle of a create finds it.
    Starting,
    Running,
    /// Its guest's state and memory are in a snapshot on the data disk; no VMM runs and it
    /// holds no guest memory until it is woken.
    Hibernated,
    Stopped,
    Error,
}

impl SandboxStatus {
    /// Stopped or failed: its VMM is gone for good and its record only waits to be forgotten.
    pub fn has_ended(self) -> bool {
        matches!(self, Self::Stopped | Self::Error)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Hibernated => "hibernated",
            Self::Stopped => "stopped",
            Self::Error => "error",
        }
    }
}

/// `end_at` of a sandbox that is never stopped automatically (timeout 0).
pub const NO_DEADLINE: i64 = i64::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxRecord {
    pub id: String,
    pub template: String,
    pub status: SandboxStatus,
    pub started_at: i64,
    /// When the sandbox is stopped unless renewed (`NO_DEADLINE`: never); for an ended one, when
    /// it ended.
    pub end_at: i64,
    /// The idle timeout: API activity on the sandbox moves `end_at` to now + this; 0: no
    /// automatic stop. Absent in records written before timeouts were idle timeouts, whose
    /// `end_at` stays fixed.
    #[serde(default, rename = "idleTimeoutSec", skip_serializing_if = "Option::is_none")]
    pub idle_timeout_sec: Option<u64>,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    /// Root disk size; 0 in records written before sizes were recorded.
    #[serde(rename = "diskMB", default)]
    pub disk_mb: u32,
    pub metadata: BTreeMap<String, String>,
    /// Name of the project it was created from, if any (kept after the project is deleted).
    pub project: Option<String>,
    /// Id of that project: what a project key's scope is checked against (a name can be
    /// given to another project later). Absent in records written before keys had scopes.
    #[serde(default, rename = "projectID", skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// vsock CID the runtime assigned; the sandbox's identity towards the proxy. Kept while it
    /// is hibernated: it wakes with the same one.
    pub cid: u32,
    /// What its idle timeout does: hibernate (true) or stop it (false); from its project's
    /// `autoHibernate` at create. Absent in records written before hibernation: true.
    #[serde(default = "default_true", rename = "hibernateOnIdle")]
    pub hibernate_on_idle: bool,
}

/// What a checkpoint keeps: the whole machine (`full`: a restore or fork resumes its processes)
/// or only the root disk (`disk_only`: a restore or fork boots from it), as OpenComputer's
/// `kind` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    Full,
    DiskOnly,
}

impl CheckpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::DiskOnly => "disk_only",
        }
    }
}

/// A checkpoint of a sandbox: its files are under the data disk's `checkpoints/<id>/`, written
/// before this record (a record always has its files). It outlives its sandbox, so a fork can be
/// made after the sandbox is gone; it carries what a fork needs of the sandbox (the machine it
/// resumes must be the same, and the project its tokens are minted for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRecord {
    pub id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    pub name: String,
    pub kind: CheckpointKind,
    /// Bytes on the data disk when it was written (state, memory and the root disk's copy; the
    /// copy shares unchanged blocks with the sandbox's disk).
    pub size_bytes: u64,
    pub created_at: i64,
    /// Orders checkpoints taken within one second (oldest first, for the retention policy).
    pub created_at_ns: u128,
    pub template: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskMB")]
    pub disk_mb: u32,
    pub project: Option<String>,
    #[serde(rename = "projectID")]
    pub project_id: Option<String>,
    pub hibernate_on_idle: bool,
    pub metadata: BTreeMap<String, String>,
}

/// Where a template made on the appliance came from (the templates shipped in the image have no
/// record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TemplateSource {
    OciArchive,
    DockerArchive,
    RootfsTarball,
    Sandbox,
}

impl TemplateSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OciArchive => "oci-archive",
            Self::DockerArchive => "docker-archive",
            Self::RootfsTarball => "rootfs-tarball",
            Self::Sandbox => "sandbox",
        }
    }
}

/// What commands in a template's sandboxes get unless they say otherwise: from an image's
/// config (`Env`, `WorkingDir`, `User`); `Entrypoint` and `Cmd` are recorded, not run (a sandbox
/// runs our PID 1 and agent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateDefaults {
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// A template made on the appliance (imported or saved from a sandbox); its disk is the data
/// disk's `templates/<name>.ext4`, installed before this record is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRecord {
    pub name: String,
    pub tag: String,
    pub source: TemplateSource,
    /// `sha256:<hex>` of the uploaded archive, or `sandbox:<id>` for a saved sandbox.
    pub source_digest: String,
    pub created_at: i64,
    pub defaults: TemplateDefaults,
}

/// A stored API key: only its BLAKE2b-256 hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyRecord {
    pub hash_hex: String,
    pub created_at: i64,
}

/// A project key: what it may reach. Stored under the BLAKE2b-256 hash of the key itself
/// (hex), so a request's key is found with one lookup and the key is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectKeyRecord {
    pub id: String,
    pub name: String,
    /// Ids of the projects whose sandboxes and secrets it may use.
    pub project_ids: Vec<String>,
    pub created_at: i64,
}

/// One state-changing request in the audit trail. Never a body: no secret value or key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    pub seq: u64,
    pub time: i64,
    /// `admin` for the operator key, `signed-url` for a request authorised by a signed file URL
    /// (`url_signing`), else the project key's id.
    pub key_id: String,
    pub method: String,
    /// The route pattern, e.g. `/api/projects/{id}/secrets/{name}`.
    pub route: String,
    /// The path the request named (ids and secret names; never the query string).
    pub target: String,
    pub status: u16,
}

/// The appliance CA: certificate in the clear, private key sealed like a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaRecord {
    pub cert_pem: String,
    pub sealed_key_hex: String,
    pub created_at: i64,
}

/// The hosts one secret may reach (`allowedHosts`), kept next to its sealed value under the
/// same key. Not secret. A secret without a record uses its project's egress allowlist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretHostsRecord {
    pub allowed_hosts: Vec<String>,
}

/// Key of a secret in the `secrets` and `secret_hosts` databases: `<project id>/<NAME>`, so a project's
/// secrets are one prefix range.
pub fn secret_key(project_id: &str, name: &str) -> String {
    format!("{project_id}/{name}")
}

/// Associated data binding a sealed secret to its place in the store.
pub fn secret_associated_data(project_id: &str, name: &str) -> Vec<u8> {
    format!("opencomputer/secret/v1:{project_id}:{name}").into_bytes()
}

/// Associated data binding a running sandbox's sealed tokens to its id.
pub fn sandbox_seal_associated_data(sandbox_id: &str) -> Vec<u8> {
    format!("opencomputer/sandbox-seal/v1:{sandbox_id}").into_bytes()
}

pub fn ca_associated_data(name: &str) -> Vec<u8> {
    format!("opencomputer/ca-key/v1:{name}").into_bytes()
}

/// Associated data binding a sealed URL-signing key to its name in `url_keys`.
pub fn url_key_associated_data(name: &str) -> Vec<u8> {
    format!("opencomputer/url-signing-key/v1:{name}").into_bytes()
}

//! Request handlers of the wire contract, one module per resource.

pub mod checkpoints;
pub mod dispatch;
pub mod exec;
pub mod exec_async;
pub mod exec_wait;
pub mod files;
pub mod keys;
pub mod projects;
pub mod pty;
pub mod sandbox_info;
pub mod sandboxes;
pub mod scope;
pub mod secret_stores;
pub mod secrets;
pub mod signed_urls;
pub mod system;
pub mod templates;
pub mod unsupported;
pub mod validate;

//! Request handlers of the wire contract, one module per resource.

pub mod dispatch;
pub mod exec;
pub mod exec_async;
pub mod files;
pub mod keys;
pub mod projects;
pub mod pty;
pub mod sandboxes;
pub mod scope;
pub mod secrets;
pub mod system;
pub mod validate;

//! HTTP plumbing on top of tiny_http: request parsing, replies, routing, the server loop.

pub mod download;
pub mod front;
pub mod long_work;
pub mod reply;
pub mod request;
pub mod route;
pub mod server;
pub mod upload;

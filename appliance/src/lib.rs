//! The OpenComputer appliance control plane: the OpenComputer-compatible HTTP API,
//! the LMDB store, secret encryption, sealed-token minting and the sandbox lifecycle.
//! It must never store, log, print or return a secret's plaintext, and never answer
//! a sandbox request with success it did not get from the sandbox runtime.

pub mod api;
pub mod api_tls;
pub mod app;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod ca_store;
pub mod capacity;
pub mod checkpoints;
pub mod cli;
pub mod client;
pub mod clock;
pub mod connsock;
pub mod console_log;
pub mod crypto;
pub mod degraded;
pub mod error;
pub mod hibernation;
pub mod http;
pub mod keyfiles;
pub mod lifecycle;
pub mod master_key;
pub mod metrics;
pub mod runtime;
pub mod sandbox_envs;
pub mod sandbox_ops;
pub mod sandbox_side;
pub mod seal;
pub mod seal_sync;
pub mod sealing;
pub mod selfcheck;
pub mod serve;
pub mod session_book;
pub mod signals;
pub mod store;
pub mod templates;
pub mod upgrade;
pub mod url_signing;
pub mod vmm_runtime;
pub mod websocket;

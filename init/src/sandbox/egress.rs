//! The sandbox's only way out: a local TCP listener (what HTTP(S)_PROXY points at) whose
//! connections are forwarded byte for byte to the host over vsock, where the sealing proxy
//! knows the sandbox by its CID. Nothing is parsed or changed here.

use agent_protocol::transport::Connection;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connections forwarded at once; more are refused (closed) until some finish.
const MAX_CONNECTIONS: usize = 1024;

/// Accepts forever, forwarding each connection to a fresh upstream from `connect`.
pub fn serve<S, F>(listener: TcpListener, connect: F) -> !
where
    S: Connection,
    F: Fn() -> io::Result<S> + Send + Sync + 'static,
{
    let connect = Arc::new(connect);
    let active = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(RateLimitedLog::default());
    loop {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) => {
                log.line(&format!("egress accept failed: {e}"));
                // EMFILE and friends: give descriptors a moment to be released.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            log.line(&format!("egress: {MAX_CONNECTIONS} connections already open; refusing one"));
            continue;
        }
        let (connect, count, log) = (Arc::clone(&connect), Arc::clone(&active), Arc::clone(&log));
        let spawned = std::thread::Builder::new().name("egress".into()).spawn(move || {
            match connect() {
                Ok(upstream) => {
                    if let Err(e) = forward(client, upstream) {
                        log.line(&format!("egress connection failed: {e}"));
                    }
                }
                Err(e) => log.line(&format!("egress: cannot reach the host proxy: {e}")),
            }
            count.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Copies both directions until both are finished, passing on each half-close.
pub fn forward<S: Connection>(client: TcpStream, upstream: S) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut client_in = client.try_clone()?;
    let mut upstream_out = Connection::try_clone(&upstream)?;
    let outbound = std::thread::Builder::new().name("egress-out".into()).spawn(move || {
        let copied = io::copy(&mut client_in, &mut upstream_out);
        let _ = Connection::shutdown(&upstream_out, Shutdown::Write);
        copied
    })?;
    let mut upstream_in = upstream;
    let mut client_out = client;
    let inbound = io::copy(&mut upstream_in, &mut client_out);
    let _ = client_out.shutdown(Shutdown::Write);
    if inbound.is_err() {
        // The upstream is gone: unblock the other direction too.
        let _ = client_out.shutdown(Shutdown::Both);
    }
    let outbound = outbound.join().unwrap_or_else(|_| Err(io::Error::other("egress copy thread panicked")));
    inbound.and(outbound).map(|_| ())
}

/// Console lines at most once a second, so a program retrying in a loop cannot flood it.
#[derive(Default)]
struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
}

impl RateLimitedLog {
    fn line(&self, message: &str) {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            crate::sys::console::line("agent", message);
        }
    }
}

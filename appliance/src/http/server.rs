//! The server loop: worker threads take requests from tiny_http and pass each to
//! the request handler given at start, which answers it. Shutdown stops taking
//! requests and lets the ones in flight finish. Clients reach tiny_http through the front
//! (front.rs), which caps and times out their connections; tiny_http itself listens on
//! loopback only.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tiny_http::{Request, Server};

use super::front::{ConnectionLimits, Front};

/// Enough workers that a full group commit (one per concurrent client) can form
/// while others serve reads.
pub const WORKERS: usize = 32;

/// Answers one request. It is given the request and the port the server listens on
/// (a WebSocket upgrade needs it to find the request's connection).
pub type Handler = dyn Fn(Request, u16) + Send + Sync;

pub struct HttpServer {
    front: Front,
    server: Arc<Server>,
    workers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
}

impl HttpServer {
    /// Listens on `listen` (over TLS when `tls` is given), relaying to tiny_http on the loopback
    /// address `inner`, and serves every request with `handler` on WORKERS threads.
    pub fn start(
        listen: &str,
        inner: &str,
        handler: Arc<Handler>,
        limits: ConnectionLimits,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, String> {
        let loopback = inner.parse::<SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
        if !loopback {
            return Err(format!("the server's own listener {inner} must be a loopback address (127.0.0.1:PORT)"));
        }
        let listener = TcpListener::bind(inner).map_err(|e| format!("cannot listen on {inner}: {e}"))?;
        raise_backlog(&listener).map_err(|e| format!("cannot configure {inner}: {e}"))?;
        let server = Server::from_listener(listener, None).map_err(|e| format!("cannot listen on {inner}: {e}"))?;
        let addr =
            server.server_addr().to_ip().ok_or_else(|| format!("listening address of {inner} is not an IP socket"))?;
        let server = Arc::new(server);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::with_capacity(WORKERS);
        for i in 0..WORKERS {
            let (server, handler, stopping) = (Arc::clone(&server), Arc::clone(&handler), Arc::clone(&stopping));
            let handle = std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || worker(&server, &*handler, &stopping, addr.port()))
                .map_err(|e| format!("cannot start HTTP worker: {e}"))?;
            workers.push(handle);
        }
        let stop_kicking = Arc::clone(&stopping);
        let kicker = std::thread::Builder::new()
            .name("http-kick".into())
            .spawn(move || kick_connection_pool(addr, &stop_kicking))
            .map_err(|e| format!("cannot start the connection-pool kicker: {e}"))?;
        workers.push(kicker);
        let front = Front::start(listen, addr, limits, tls)?;
        Ok(Self { front, server, workers, stopping })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.front.addr()
    }

    /// Stops accepting work and waits up to `grace` for in-flight requests.
    pub fn shutdown(self, grace: Duration) {
        self.front.stop_accepting();
        self.stopping.store(true, Ordering::SeqCst);
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        let deadline = Instant::now() + grace;
        for worker in self.workers {
            while !worker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if worker.is_finished() {
                let _ = worker.join();
            }
        }
        self.front.shutdown();
    }
}

/// How often `kick_connection_pool` connects.
const KICK_INTERVAL: Duration = Duration::from_millis(100);

/// tiny_http serves each connection on a thread of its pool for the connection's whole life.
/// When connections arrive in a burst, its pool can queue one behind a busy thread while
/// believing an idle thread will take it (its count of idle threads lags behind wake-ups); the
/// queued connection then waits until some other connection closes, which for a long command
/// or a kept-alive client can be minutes. Measured: `bench api`'s 256-command burst left 2 to
/// 42 connections unserved for the commands' whole 4 s. Every connection the pool takes on
/// makes one of its threads look at that queue, so a loopback connection that closes at once,
/// made every KICK_INTERVAL, bounds such a wait to about KICK_INTERVAL per queued connection.
fn kick_connection_pool(addr: SocketAddr, stopping: &AtomicBool) {
    let target = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
        SocketAddr::V6(a) if a.ip().is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port())),
        other => other,
    };
    while !stopping.load(Ordering::SeqCst) {
        std::thread::sleep(KICK_INTERVAL);
        // Closed unused: tiny_http reads end-of-stream and ends that connection at once.
        let _ = TcpStream::connect_timeout(&target, KICK_INTERVAL);
    }
}

fn worker(server: &Server, handler: &Handler, stopping: &AtomicBool, port: u16) {
    while !stopping.load(Ordering::SeqCst) {
        match server.recv_timeout(Duration::from_millis(500)) {
            Ok(Some(request)) => handler(request, port),
            Ok(None) => {}
            Err(e) => {
                eprintln!("appliance: HTTP accept error: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Pending connections the kernel queues before tiny_http accepts them. std binds with 128, so a
/// burst of a few hundred clients (agents starting together) would wait out SYN retries.
const LISTEN_BACKLOG: libc::c_int = 1024;

/// Raises the listener's backlog to LISTEN_BACKLOG.
///
/// (Client timeouts are the front's job: a listener's SO_RCVTIMEO would reach accepted sockets,
/// but it also makes accept() itself fail after that long without a new connection, and
/// tiny_http's accept loop stops for good on the first accept error.)
pub(super) fn raise_backlog(listener: &TcpListener) -> std::io::Result<()> {
    // Calling listen again on a listening socket only changes its backlog.
    // SAFETY: the fd is the listener's open, bound socket for the duration of the call.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

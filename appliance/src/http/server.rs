//! The server loop: worker threads take requests from tiny_http and pass each to
//! the request handler given at start, which answers it. Shutdown stops taking
//! requests and lets the ones in flight finish.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tiny_http::{Request, Server};

/// Enough workers that a full group commit (one per concurrent client) can form
/// while others serve reads.
pub const WORKERS: usize = 32;

/// Answers one request. It is given the request and the port the server listens on
/// (a WebSocket upgrade needs it to find the request's connection).
pub type Handler = dyn Fn(Request, u16) + Send + Sync;

pub struct HttpServer {
    server: Arc<Server>,
    workers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl HttpServer {
    /// Listens on `listen` and serves every request with `handler` on WORKERS threads.
    pub fn start(listen: &str, handler: Arc<Handler>) -> Result<Self, String> {
        let server = Server::http(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr =
            server.server_addr().to_ip().ok_or_else(|| format!("listening address of {listen} is not an IP socket"))?;
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
        Ok(Self { server, workers, stopping, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting work and waits up to `grace` for in-flight requests.
    pub fn shutdown(self, grace: Duration) {
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

//! The server loop: worker threads take requests from tiny_http, authenticate,
//! dispatch, answer, count and log. Shutdown stops taking requests and lets the
//! ones in flight finish.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tiny_http::{Method, Request, Server};

use crate::api::{dispatch, exec};
use crate::app::App;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{header, split_url};
use crate::http::route::{match_route, Route, UNMATCHED};

/// Enough workers that a full group commit (one per concurrent client) can form
/// while others serve reads.
pub const WORKERS: usize = 32;

pub struct HttpServer {
    server: Arc<Server>,
    workers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl HttpServer {
    pub fn start(app: Arc<App>, listen: &str) -> Result<Self, String> {
        let server = Server::http(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr =
            server.server_addr().to_ip().ok_or_else(|| format!("listening address of {listen} is not an IP socket"))?;
        let server = Arc::new(server);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::with_capacity(WORKERS);
        for i in 0..WORKERS {
            let (server, app, stopping) = (Arc::clone(&server), Arc::clone(&app), Arc::clone(&stopping));
            let handle = std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || worker(&server, &app, &stopping, addr.port()))
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

fn worker(server: &Server, app: &App, stopping: &AtomicBool, port: u16) {
    while !stopping.load(Ordering::SeqCst) {
        match server.recv_timeout(Duration::from_millis(500)) {
            Ok(Some(request)) => handle(app, request, port),
            Ok(None) => {}
            Err(e) => {
                eprintln!("appliance: HTTP accept error: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle(app: &App, mut request: Request, port: u16) {
    let started = Instant::now();
    let method = request.method().clone();
    let url = request.url().to_string();
    let (path, query) = split_url(&url);
    let route = match_route(path);
    let label = match &route {
        Ok(Some(r)) => r.label(),
        _ => UNMATCHED,
    };
    // Counted and logged before the answer is written, so a client that reads
    // /metrics right after sees its previous request.
    let account = |status: u16| {
        let elapsed = started.elapsed();
        app.metrics.record_request(label, status, elapsed);
        if app.log_requests || status >= 500 {
            // Route pattern, not the raw URL: queries may hold sandbox file paths.
            println!("appliance: {method} {label} {status} {:.1}ms", elapsed.as_secs_f64() * 1000.0);
        }
    };
    let respond = |request: Request, reply: Reply| {
        account(reply.status);
        // A client that hung up cannot be answered; nothing else to do.
        let _ = request.respond(reply.into_response());
    };

    if let Ok(Some(Route::Healthz)) = &route {
        return respond(request, dispatch::healthz(app));
    }
    if let Err(e) = app.auth.check(header(&request, "X-API-Key")) {
        return respond(request, Reply::error(&e));
    }
    match route {
        Ok(Some(Route::ExecSession(id, sid))) if method == Method::Get && exec::is_websocket_upgrade(&request) => {
            let status = exec::attach_websocket(app, &id, &sid, request, port);
            account(status);
        }
        Ok(Some(route)) => {
            let reply = dispatch::dispatch(app, &route, &mut request, query).unwrap_or_else(|e| Reply::error(&e));
            respond(request, reply)
        }
        Ok(None) => respond(request, Reply::error(&AppError::not_found(format!("no route for {path}")))),
        Err(e) => respond(request, Reply::error(&e)),
    }
}

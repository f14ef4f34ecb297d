//! `appliance bench api`: concurrent clients creating projects and setting secrets
//! against the real server and store, over plain HTTP and then over HTTPS (the appliance's own
//! certificate), and the same request stream against a trivial tiny_http server answering a
//! constant, side by side in one run; then the real server's `/api/healthz` while hundreds of
//! long commands are in flight, beside the same probe idle.

mod sleeping_runtime;

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::api_tls::TlsChoice;
use crate::cli::BenchOptions;
use crate::client::HttpClient;
use crate::lifecycle::Backend;
use crate::serve::{self, Running, SandboxSide, ServeConfig};

/// Long requests held open during the busy phase (the issue's figure).
const BUSY_IN_FLIGHT: usize = 256;
/// How long each of them runs; the probes run well inside it.
const BUSY_COMMAND_MS: u64 = 4000;
const PROBES: usize = 400;

pub struct BusyResult {
    pub idle: LoadResult,
    pub busy: LoadResult,
    pub min_in_flight: usize,
}

/// Sequential `GET /api/healthz` probes on one keep-alive connection.
fn probe_healthz(addr: SocketAddr, probes: usize) -> Result<LoadResult, String> {
    let mut client = HttpClient::connect(addr, None).map_err(|e| format!("probe connection: {e}"))?;
    let mut latencies = Vec::with_capacity(probes);
    let mut errors = 0;
    let started = Instant::now();
    for _ in 0..probes {
        let t = Instant::now();
        match client.request("GET", "/api/healthz", b"") {
            Ok(r) if r.status == 200 => latencies.push(t.elapsed()),
            _ => errors += 1,
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(LoadResult { latencies, elapsed: started.elapsed(), errors })
}

/// Probes healthz idle, then with `in_flight` commands running on one sandbox, each on its own
/// connection; every command must still answer 200.
fn run_busy(running: &Running, api_key: &str, in_flight: usize) -> Result<BusyResult, String> {
    let addr = running.addr();
    let idle = probe_healthz(addr, PROBES)?;
    let mut client = HttpClient::connect(addr, Some(api_key.to_string())).map_err(|e| e.to_string())?;
    let created = client
        .request("POST", "/api/sandboxes", br#"{"cpuCount":1,"memoryMB":256,"timeout":600}"#)
        .map_err(|e| format!("busy phase: create: {e}"))?;
    if created.status != 201 {
        return Err(format!(
            "busy phase: create answered {}: {}",
            created.status,
            String::from_utf8_lossy(&created.body)
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&created.body).map_err(|e| e.to_string())?;
    let id = v["sandboxID"].as_str().ok_or("busy phase: create answered no sandboxID")?.to_string();
    let path = format!("/api/sandboxes/{id}/commands");
    let body = format!(r#"{{"cmd":"sleep {BUSY_COMMAND_MS}","timeout":60}}"#);
    let barrier = Arc::new(Barrier::new(in_flight + 1));
    let commands: Vec<_> = (0..in_flight)
        .map(|_| {
            let (barrier, key, path, body) = (Arc::clone(&barrier), api_key.to_string(), path.clone(), body.clone());
            std::thread::spawn(move || {
                let client = HttpClient::connect(addr, Some(key));
                barrier.wait();
                client.and_then(|mut c| c.request("POST", &path, body.as_bytes())).map(|r| r.status)
            })
        })
        .collect();
    barrier.wait();
    let long_work = &running.app().long_work;
    let deadline = Instant::now() + Duration::from_millis(BUSY_COMMAND_MS / 2);
    while long_work.in_flight() < in_flight && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = long_work.in_flight();
    let busy = probe_healthz(addr, PROBES)?;
    let min_in_flight = before.min(long_work.in_flight());
    let mut failed = 0;
    for c in commands {
        if !matches!(c.join(), Ok(Ok(200))) {
            failed += 1;
        }
    }
    if failed > 0 || busy.errors > 0 || idle.errors > 0 {
        return Err(format!(
            "busy phase: {failed} of {in_flight} commands failed, {} + {} probes failed",
            idle.errors, busy.errors
        ));
    }
    // tiny_http's connection pool can leave a connection of a burst queued until another
    // connection ends (a race in its idle-thread count), so a few may start late.
    if min_in_flight < in_flight * 9 / 10 {
        return Err(format!("busy phase: only {min_in_flight} of {in_flight} commands were in flight while probing"));
    }
    Ok(BusyResult { idle, busy, min_in_flight })
}

pub struct LoadResult {
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
    pub errors: usize,
}

impl LoadResult {
    pub fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return 0.0;
        }
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index].as_secs_f64() * 1000.0
    }
}

/// Each client alternates `POST /api/projects` and `PUT .../secrets/API_KEY` on
/// its own keep-alive connection (TLS when `tls` is given); `requests` requests per client.
pub fn run_load(
    addr: SocketAddr,
    api_key: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    clients: usize,
    requests: usize,
    tag: &str,
) -> LoadResult {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut handles = Vec::new();
    for c in 0..clients {
        let barrier = Arc::clone(&barrier);
        let key = api_key.to_string();
        let tag = tag.to_string();
        let tls = tls.clone();
        handles.push(std::thread::spawn(move || {
            let mut latencies = Vec::with_capacity(requests);
            let mut errors = 0;
            let connected = match tls {
                Some(tls) => HttpClient::connect_tls(addr, Some(key), tls, "localhost"),
                None => HttpClient::connect(addr, Some(key)),
            };
            let Ok(mut client) = connected else {
                barrier.wait();
                return (latencies, requests);
            };
            barrier.wait();
            let mut project_id = String::new();
            for i in 0..requests {
                let started = Instant::now();
                let result = if i % 2 == 0 {
                    let body =
                        format!(r#"{{"name":"bench-{tag}-{c}-{i}","cpuCount":1,"memoryMB":512,"timeoutSec":300}}"#);
                    client.request("POST", "/api/projects", body.as_bytes())
                } else {
                    let path = format!("/api/projects/{project_id}/secrets/API_KEY");
                    client.request("PUT", &path, br#"{"value":"bench-secret-value-0123456789"}"#)
                };
                latencies.push(started.elapsed());
                match result {
                    Ok(r) if r.status == 201 => {
                        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
                        // The baseline answers a constant id; it is only echoed back.
                        project_id = v["id"].as_str().unwrap_or("00000000-0000-4000-8000-000000000000").to_string();
                    }
                    Ok(r) if r.status == 204 || r.status == 200 => {}
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    barrier.wait();
    let started = Instant::now();
    let mut all = Vec::with_capacity(clients * requests);
    let mut errors = 0;
    for h in handles {
        match h.join() {
            Ok((lat, err)) => {
                all.extend(lat);
                errors += err;
            }
            Err(_) => errors += requests,
        }
    }
    LoadResult { latencies: all, elapsed: started.elapsed(), errors }
}

/// A tiny_http server that answers every request with the same small JSON, using as
/// many worker threads as the real server.
type Baseline = (SocketAddr, Arc<tiny_http::Server>, Vec<std::thread::JoinHandle<()>>);

/// The same load against the baseline server.
fn run_baseline(api_key: &str, options: &BenchOptions) -> Result<LoadResult, String> {
    let (addr, server, workers) = start_baseline()?;
    let baseline = run_load(addr, api_key, None, options.clients, options.requests, "base");
    for _ in &workers {
        server.unblock();
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(baseline)
}

fn start_baseline() -> Result<Baseline, String> {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?);
    let addr = server.server_addr().to_ip().ok_or("baseline has no IP address")?;
    let mut workers = Vec::new();
    for _ in 0..crate::http::server::WORKERS {
        let server = Arc::clone(&server);
        workers.push(std::thread::spawn(move || {
            while let Ok(request) = server.recv() {
                let response = tiny_http::Response::from_data(&br#"{"id":"00000000-0000-4000-8000-000000000000"}"#[..])
                    .with_status_code(201);
                let _ = request.respond(response);
            }
        }));
    }
    Ok((addr, server, workers))
}

pub fn run(options: &BenchOptions) -> Result<String, String> {
    let data_dir = match &options.data_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("appliance-bench-{}", std::process::id())),
    };
    let remove_after = options.data_dir.is_none();
    if remove_after {
        let _ = fs::remove_dir_all(&data_dir);
    }
    fs::create_dir_all(&data_dir).map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let mut key_bytes = [0u8; 24];
    crate::crypto::random_bytes(&mut key_bytes).map_err(|e| e.to_string())?;
    let api_key = crate::crypto::hex(&key_bytes);
    let key_file = data_dir.join("bench-admin-key");
    fs::write(&key_file, &api_key).map_err(|e| e.to_string())?;
    let config = |tls: TlsChoice| ServeConfig {
        listen: "127.0.0.1:0".into(),
        loopback_listen: "127.0.0.1:0".into(),
        data_dir: data_dir.clone(),
        vmm_bin: PathBuf::from("/nonexistent/vmm"),
        admin_key_file: Some(key_file.clone()),
        master_key_file: None,
        master_key_store: crate::master_key::Choice::DataDir,
        log_requests: false,
        stopped_retention: Duration::from_secs(3600),
        power_control: false,
        require_data_mount: false,
        capacity: crate::capacity::CapacityConfig::default(),
        connections: crate::http::front::ConnectionLimits::default(),
        tls,
        tls_trust_out: None,
        upgrade_key_files: Vec::new(),
    };
    let backend = || Backend {
        runtime: Arc::new(sleeping_runtime::SleepingRuntime::default()),
        publisher: Arc::new(sleeping_runtime::NoSeals),
        egress: Arc::default(),
    };
    let running = serve::start(&config(TlsChoice::Plain), SandboxSide::Wired(backend()))?;
    println!(
        "api-bench: store at {} ({} clients x {} requests per server)",
        data_dir.display(),
        options.clients,
        options.requests
    );
    let real = run_load(running.addr(), &api_key, None, options.clients, options.requests, "real");
    let busy = run_busy(&running, &api_key, BUSY_IN_FLIGHT);
    running.shutdown(Duration::from_secs(5));
    let busy = busy?;

    // The same store again, now over HTTPS with the certificate the appliance issues itself.
    let trust_file = data_dir.join("bench-api-ca.pem");
    let mut tls_config = config(TlsChoice::Generated);
    tls_config.tls_trust_out = Some(trust_file.clone());
    let running = serve::start(&tls_config, SandboxSide::Wired(backend()))?;
    let trust = fs::read_to_string(&trust_file).map_err(|e| format!("cannot read {}: {e}", trust_file.display()));
    let tls = trust.and_then(|pem| HttpClient::tls_trusting(&pem).map_err(|e| e.to_string()));
    let https = tls.map(|tls| run_load(running.addr(), &api_key, Some(tls), options.clients, options.requests, "tls"));
    running.shutdown(Duration::from_secs(5));
    let https = https?;

    let baseline = run_baseline(&api_key, options)?;
    if remove_after {
        let _ = fs::remove_dir_all(&data_dir);
    }
    if real.errors > 0 || https.errors > 0 || baseline.errors > 0 {
        return Err(format!(
            "benchmark requests failed: real {} errors, HTTPS {} errors, baseline {} errors",
            real.errors, https.errors, baseline.errors
        ));
    }
    println!(
        "api-bench: baseline p50_ms={:.3} p99_ms={:.3}",
        baseline.percentile_ms(0.5),
        baseline.percentile_ms(0.99)
    );
    println!(
        "api-bench: busy phase: {} commands in flight (at least {} while probing), idle_healthz_p99_ms={:.3}, {} probes",
        BUSY_IN_FLIGHT,
        busy.min_in_flight,
        busy.idle.percentile_ms(0.99),
        busy.busy.latencies.len()
    );
    println!(
        "api-bench: over HTTPS: p50_ms={:.3} p99_ms={:.3} rps={:.0}",
        https.percentile_ms(0.5),
        https.percentile_ms(0.99),
        https.rps()
    );
    Ok(format!(
        "api-bench p50_ms={:.3} p99_ms={:.3} rps={:.0} baseline_rps={:.0} ratio={:.3} busy_healthz_p99_ms={:.3} \
         https_p50_ms={:.3} https_rps={:.0} tls_ratio={:.3}",
        real.percentile_ms(0.5),
        real.percentile_ms(0.99),
        real.rps(),
        baseline.rps(),
        real.rps() / baseline.rps(),
        busy.busy.percentile_ms(0.99),
        https.percentile_ms(0.5),
        https.rps(),
        https.rps() / real.rps()
    ))
}

//! `appliance bench api`: concurrent clients creating projects and setting secrets
//! against the real server and store, and the same request stream against a trivial
//! tiny_http server answering a constant, side by side in one run.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::cli::BenchOptions;
use crate::client::HttpClient;
use crate::serve::{self, SandboxSide, ServeConfig};

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
/// its own keep-alive connection; `requests` requests per client.
pub fn run_load(addr: SocketAddr, api_key: &str, clients: usize, requests: usize, tag: &str) -> LoadResult {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut handles = Vec::new();
    for c in 0..clients {
        let barrier = Arc::clone(&barrier);
        let key = api_key.to_string();
        let tag = tag.to_string();
        handles.push(std::thread::spawn(move || {
            let mut latencies = Vec::with_capacity(requests);
            let mut errors = 0;
            let Ok(mut client) = HttpClient::connect(addr, Some(key)) else {
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
    let config = ServeConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.clone(),
        vmm_bin: PathBuf::from("/nonexistent/vmm"),
        admin_key_file: Some(key_file),
        master_key_file: None,
        log_requests: false,
        stopped_retention: Duration::from_secs(3600),
        power_control: false,
        require_data_mount: false,
    };
    let running = serve::start(&config, SandboxSide::Unavailable("benchmark runs without sandboxes".into()))?;
    println!(
        "api-bench: store at {} ({} clients x {} requests per server)",
        data_dir.display(),
        options.clients,
        options.requests
    );
    let real = run_load(running.addr(), &api_key, options.clients, options.requests, "real");
    running.shutdown(Duration::from_secs(5));

    let (baseline_addr, baseline_server, workers) = start_baseline()?;
    let baseline = run_load(baseline_addr, &api_key, options.clients, options.requests, "base");
    for _ in &workers {
        baseline_server.unblock();
    }
    for w in workers {
        let _ = w.join();
    }
    if remove_after {
        let _ = fs::remove_dir_all(&data_dir);
    }
    if real.errors > 0 || baseline.errors > 0 {
        return Err(format!(
            "benchmark requests failed: real {} errors, baseline {} errors",
            real.errors, baseline.errors
        ));
    }
    println!(
        "api-bench: baseline p50_ms={:.3} p99_ms={:.3}",
        baseline.percentile_ms(0.5),
        baseline.percentile_ms(0.99)
    );
    Ok(format!(
        "api-bench p50_ms={:.3} p99_ms={:.3} rps={:.0} baseline_rps={:.0} ratio={:.3}",
        real.percentile_ms(0.5),
        real.percentile_ms(0.99),
        real.rps(),
        baseline.rps(),
        real.rps() / baseline.rps()
    ))
}

//! Tests against the real `appliance` binary: durability under kill -9, secrecy of
//! the files, logs and responses, and the SIGTERM / rotate-key contract.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{files_under, temp_dir, write_key_file, Client, ADMIN_KEY};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_appliance");

/// A server child process that is killed if the test fails before stopping it.
struct ServerProcess(Option<Child>);

impl ServerProcess {
    fn take(mut self) -> Child {
        self.0.take().expect("child present")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `appliance serve` on a free port with a temporary data directory and key.
fn spawn_server(data_dir: &Path, log: &Path) -> (ServerProcess, SocketAddr) {
    let key = write_key_file(data_dir);
    spawn_serve(&[OsStr::new("--data-dir"), data_dir.as_os_str(), OsStr::new("--admin-key-file"), key.as_os_str()], log)
}

/// Starts `appliance serve --listen 127.0.0.1:0 --vmm-bin /nonexistent/vmm --plain-http` plus
/// `args` (HTTPS has its own tests, in api_tls.rs); stdout and stderr go to `log`. Returns once
/// it says where it listens.
// The child is returned to the caller inside a guard that waits for it.
#[allow(clippy::zombie_processes)]
fn spawn_serve(args: &[&OsStr], log: &Path) -> (ServerProcess, SocketAddr) {
    // Logs are appended across restarts: only lines after this offset belong to this start.
    let offset = fs::metadata(log).map_or(0, |m| m.len() as usize);
    let out = File::options().create(true).append(true).open(log).expect("log");
    let err = out.try_clone().expect("log");
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--vmm-bin", "/nonexistent/vmm", "--plain-http"])
        .args(args)
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn appliance");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = fs::read_to_string(log).unwrap_or_default();
        let text = all.get(offset..).unwrap_or("");
        if let Some(line) = text.lines().find(|l| l.contains("listening on http://")) {
            let addr = line.rsplit("http://").next().expect("addr").parse().expect("socket addr");
            return (ServerProcess(Some(child)), addr);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("appliance did not start; log:\n{all}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm_and_wait(server: ServerProcess) -> i32 {
    let mut child = server.take();
    // SAFETY: sending a signal to our own child process by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "appliance did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_9_during_1000_concurrent_writes_loses_no_acknowledged_write() {
    let dir = temp_dir("durability");
    let log = dir.join("appliance.log");
    let (server, addr) = spawn_server(&dir, &log);

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for t in 0..20 {
        let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
        clients.push(std::thread::spawn(move || {
            let Ok(mut client) = appliance::client::HttpClient::connect(addr, Some(ADMIN_KEY.to_string())) else {
                return;
            };
            for i in 0..50 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let name = format!("d-{t}-{i}");
                let body = format!(r#"{{"name":"{name}"}}"#);
                match client.request("POST", "/api/projects", body.as_bytes()) {
                    Ok(r) if r.status == 201 => acked.lock().expect("lock").push(name),
                    Ok(r) => panic!("unexpected status {} before the kill", r.status),
                    Err(_) => return, // the server was killed mid-request
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().expect("lock").len() < 400 {
        assert!(Instant::now() < deadline, "writes too slow");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut child = server.take();
    child.kill().expect("kill -9");
    let _ = child.wait();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 400 && acked.len() < 1000, "the kill landed mid-run ({} acked)", acked.len());

    let (child, addr) = spawn_server(&dir, &log);
    let mut c = Client::new(addr, Some(ADMIN_KEY));
    let (status, list) = c.call("GET", "/api/projects", "");
    assert_eq!(status, 200);
    let stored: Vec<String> =
        list.as_array().expect("array").iter().map(|p| p["name"].as_str().expect("name").to_string()).collect();
    let missing: Vec<&String> = acked.iter().filter(|n| !stored.contains(n)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    // Every stored project is complete (name index and record agree).
    for name in stored.iter().take(50) {
        let (status, _) = c.call("POST", "/api/projects", &json!({ "name": name }).to_string());
        assert_eq!(status, 409, "name index lost for {name}");
    }
    let (status, _) = c.call("POST", "/api/projects", r#"{"name":"after-crash"}"#);
    assert_eq!(status, 201, "store is writable after the crash");
    assert_eq!(sigterm_and_wait(child), 0);
    println!("durability: {} acknowledged before kill -9, {} present after restart", acked.len(), stored.len());
    let _ = fs::remove_dir_all(&dir);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn secret_values_never_reach_disk_logs_or_responses() {
    let dir = temp_dir("secrecy");
    let log = dir.join("appliance.log");
    let mut random = [0u8; 8];
    appliance::crypto::random_bytes(&mut random).expect("random");
    let tag = appliance::crypto::hex(&random);
    let secrets: Vec<String> = (0..3).map(|i| format!("SECRETVALUE{i}x{tag}")).collect();

    let (child, addr) = spawn_server(&dir, &log);
    let mut c = Client::new(addr, Some(ADMIN_KEY));
    let (_, p) = c.call("POST", "/api/projects", r#"{"name":"secrecy-project","egressAllowlist":["api.example.com"]}"#);
    let id = p["id"].as_str().expect("id").to_string();
    for (i, s) in secrets.iter().enumerate() {
        let (status, _) =
            c.call("PUT", &format!("/api/projects/{id}/secrets/KEY_{i}"), &json!({ "value": s }).to_string());
        assert_eq!(status, 204);
    }
    // Bodies that fail to parse must not be echoed back either.
    c.raw("PUT", &format!("/api/projects/{id}/secrets/BROKEN"), format!(r#"{{"value":"{}"#, secrets[0]).as_bytes());
    c.raw(
        "PUT",
        &format!("/api/projects/{id}/secrets/BROKEN"),
        format!(r#"{{"value":["{}"]}}"#, secrets[1]).as_bytes(),
    );
    c.raw(
        "PUT",
        &format!("/api/projects/{id}/secrets/BROKEN"),
        format!(r#"{{"value":"{}","value":"x"}}"#, secrets[2]).as_bytes(),
    );
    c.call("GET", &format!("/api/projects/{id}/secrets"), "");
    c.call("GET", &format!("/api/projects/{id}"), "");
    c.call("GET", "/api/projects", "");
    c.call("POST", "/api/sandboxes", r#"{"project":"secrecy-project"}"#);
    c.call("DELETE", &format!("/api/projects/{id}/secrets/KEY_2"), "");
    c.raw("GET", "/metrics", b"");
    let mut transcript = c.transcript.clone();
    drop(c);
    assert_eq!(sigterm_and_wait(child), 0, "SIGTERM exits 0");

    let rotate = Command::new(BIN).args(["rotate-key", "--data-dir"]).arg(&dir).output().expect("rotate-key");
    assert!(rotate.status.success(), "{}", String::from_utf8_lossy(&rotate.stderr));
    let rotate_out = String::from_utf8_lossy(&rotate.stdout).to_string();
    assert!(rotate_out.contains("re-encrypted 2 secret(s)"), "{rotate_out}");
    transcript.extend_from_slice(&rotate.stdout);
    transcript.extend_from_slice(&rotate.stderr);

    let (child, addr) = spawn_server(&dir, &log);
    let mut c = Client::new(addr, Some(ADMIN_KEY));
    let (status, names) = c.call("GET", &format!("/api/projects/{id}/secrets"), "");
    assert_eq!((status, common::secret_names(&names)), (200, vec!["KEY_0".to_string(), "KEY_1".to_string()]));
    transcript.extend_from_slice(&c.transcript);
    drop(c);
    assert_eq!(sigterm_and_wait(child), 0);

    let mut searched = vec![(log.clone(), fs::read(&log).expect("log"))];
    for f in files_under(&dir) {
        searched.push((f.clone(), fs::read(&f).expect("read")));
    }
    searched.push((PathBuf::from("<responses and CLI output>"), transcript));
    // The search itself works: the project name is stored and returned in the clear.
    assert!(searched.iter().any(|(p, b)| p.ends_with("data.mdb") && contains(b, b"secrecy-project")));
    for (path, bytes) in &searched {
        for s in &secrets {
            assert!(!contains(bytes, s.as_bytes()), "secret value found in {}", path.display());
        }
        // The API key never appears in plaintext either.
        assert!(!contains(bytes, ADMIN_KEY.as_bytes()) || path.ends_with("admin-key"), "API key in {}", path.display());
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn without_its_data_disk_the_appliance_stores_nothing_and_every_route_says_why() {
    let dir = temp_dir("nodatadisk");
    let log = dir.join("appliance.log");
    let data = dir.join("data");
    fs::create_dir_all(&data).expect("data dir");
    let key = write_key_file(&dir);
    let args = [
        OsStr::new("--require-data-mount"),
        OsStr::new("--admin-key-file"),
        key.as_os_str(),
        OsStr::new("--data-dir"),
        data.as_os_str(),
    ];
    let (child, addr) = spawn_serve(&args, &log);
    let mut admin = Client::new(addr, Some(ADMIN_KEY));
    let (status, v) = admin.call("GET", "/api/healthz", "");
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().expect("msg").contains("data disk is not available"), "{v}");
    let (status, v) = admin.call("POST", "/api/projects", r#"{"name": "lost"}"#);
    assert_eq!(status, 503, "{v}");
    assert!(
        fs::read_dir(&data).expect("data dir").next().is_none(),
        "nothing may be written to the unmounted data directory"
    );
    assert_eq!(sigterm_and_wait(child), 0);
    assert!(fs::read_to_string(&log).expect("log").contains("DATA DISK MISSING"));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn binary_reports_bad_usage_and_missing_admin_key_plainly() {
    let out = Command::new(BIN).arg("frobnicate").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command"));

    let dir = temp_dir("nokey");
    let log = dir.join("appliance.log");
    let (child, addr) = spawn_serve(
        &[OsStr::new("--admin-key-file"), OsStr::new("/nonexistent/key"), OsStr::new("--data-dir"), dir.as_os_str()],
        &log,
    );
    let text = fs::read_to_string(&log).expect("log");
    assert!(text.contains("no admin API key configured"), "{text}");
    let mut anon = Client::new(addr, Some("whatever-key-0123456789"));
    let (status, v) = anon.call("GET", "/api/projects", "");
    assert_eq!(status, 401);
    assert!(v["error"].as_str().expect("msg").contains("no admin API key"));
    let (status, _) = anon.call("GET", "/api/healthz", "");
    assert_eq!(status, 200);
    assert_eq!(sigterm_and_wait(child), 0);
    let lines = BufReader::new(File::open(&log).expect("log")).lines().count();
    assert!(lines >= 5);
    let _ = fs::remove_dir_all(&dir);
}

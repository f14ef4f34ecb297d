//! Admission control over real HTTP with the runtime double: creates that do not fit the
//! machine's memory, vCPUs or disk are refused, and everything that ends a sandbox gives its
//! memory back exactly once.

mod common;

use std::time::{Duration, Instant};

use appliance::capacity::CapacityConfig;
use common::{Client, Harness, ADMIN_KEY};
use serde_json::{json, Value};

/// 2560 MiB of which 512 stay with the appliance: 2048 MiB for sandboxes, 2 vCPUs.
fn small() -> CapacityConfig {
    CapacityConfig { memory_total_mb: Some(2560), memory_reserve_mb: Some(512), vcpus: Some(2), disk_reserve_mb: 0 }
}

fn create(c: &mut Client, body: &Value) -> (u16, Value) {
    c.call("POST", "/api/sandboxes", &body.to_string())
}

fn capacity(c: &mut Client) -> Value {
    let (status, system) = c.call("GET", "/api/system", "");
    assert_eq!(status, 200, "{system}");
    system["capacity"].clone()
}

fn committed_mb(c: &mut Client) -> u64 {
    capacity(c)["memoryMB"]["committed"].as_u64().expect("committed")
}

fn booted(h: &Harness) -> usize {
    h.runtime.sandboxes.lock().expect("lock").len()
}

fn alive(h: &Harness) -> usize {
    h.runtime.sandboxes.lock().expect("lock").values().filter(|s| s.alive).count()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn memory_full_is_503_and_delete_gives_it_back() {
    let h = Harness::start_with_capacity("cap-full", small());
    let mut c = h.client();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, s) = create(&mut c, &json!({"memoryMB": 512}));
        assert_eq!(status, 201, "{s}");
        ids.push(s["sandboxID"].as_str().expect("id").to_string());
    }
    let before = booted(&h);

    let (status, err) = create(&mut c, &json!({"memoryMB": 1024}));
    assert_eq!(status, 503, "{err}");
    assert_eq!(
        err,
        json!({"error": "not enough memory for a 1024 MiB sandbox: 512 MiB free of 2048 MiB for sandboxes"})
    );
    assert_eq!(booted(&h), before, "nothing was booted for the refused create");
    assert_eq!(committed_mb(&mut c), 1536, "nothing stays reserved for it");

    // The earlier sandboxes are untouched.
    let (status, list) = c.call("GET", "/api/sandboxes", "");
    assert_eq!(status, 200);
    let running: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter(|s| s["status"] == "running")
        .map(|s| s["sandboxID"].as_str().expect("id"))
        .collect();
    assert_eq!(running.len(), 3, "{list}");
    assert!(ids.iter().all(|id| running.contains(&id.as_str())));

    // What is left still fits exactly.
    let (status, last) = create(&mut c, &json!({"memoryMB": 512}));
    assert_eq!(status, 201, "{last}");
    let (status, err) = create(&mut c, &json!({"memoryMB": 64}));
    assert_eq!(status, 503);
    assert_eq!(err["error"], "not enough memory for a 64 MiB sandbox: 0 MiB free of 2048 MiB for sandboxes");

    // DELETE releases; a second DELETE (404) releases nothing more.
    let (status, _) = c.call("DELETE", &format!("/api/sandboxes/{}", ids[0]), "");
    assert_eq!(status, 204);
    assert_eq!(committed_mb(&mut c), 1536);
    let (status, _) = c.call("DELETE", &format!("/api/sandboxes/{}", ids[0]), "");
    assert_eq!(status, 404);
    assert_eq!(committed_mb(&mut c), 1536);
    let (status, s) = create(&mut c, &json!({"memoryMB": 512}));
    assert_eq!(status, 201, "{s}");
    assert_eq!(committed_mb(&mut c), 2048);
}

#[test]
fn concurrent_creates_never_overcommit() {
    let h = Harness::start_with_capacity("cap-race", small());
    // Boots overlap, so every create is admitted while others are still booting.
    *h.runtime.boot_delay.lock().expect("lock") = Duration::from_millis(200);
    let addr = h.addr;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::new(addr, Some(ADMIN_KEY));
                create(&mut c, &json!({"memoryMB": 512, "cpuCount": 2})).0
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().expect("thread")).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 4, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 4, "{statuses:?}");
    assert_eq!(booted(&h), 4, "refused creates booted nothing");
    let mut c = h.client();
    let cap = capacity(&mut c);
    assert_eq!(cap["memoryMB"]["committed"], 2048);
    assert_eq!(cap["memoryMB"]["free"], 0);
    // vCPUs may be overcommitted; they are reported, not refused.
    assert_eq!(cap["vcpus"], json!({"total": 2, "committed": 8}));
}

#[test]
fn failed_creates_release_their_reservation() {
    let h = Harness::start_with_capacity("cap-fail", small());
    let mut c = h.client();
    *h.runtime.fail_boot_template.lock().expect("lock") = Some("missing".into());
    let (status, err) = create(&mut c, &json!({"templateID": "missing", "memoryMB": 2048}));
    assert!(status >= 400 && status != 503, "{status} {err}");
    assert_eq!(committed_mb(&mut c), 0, "a failed boot holds nothing");

    // A failure after the boot (the agent never takes its environment) is undone too.
    *h.runtime.fail_set_env.lock().expect("lock") = true;
    let (status, err) = create(&mut c, &json!({"memoryMB": 2048}));
    assert_eq!(status, 500, "{err}");
    assert_eq!(committed_mb(&mut c), 0);
    assert_eq!(alive(&h), 0);
    *h.runtime.fail_set_env.lock().expect("lock") = false;

    let (status, s) = create(&mut c, &json!({"memoryMB": 2048}));
    assert_eq!(status, 201, "the whole capacity is free again: {s}");
}

#[test]
fn timeouts_and_crashes_release() {
    let h = Harness::start_with_capacity("cap-reap", small());
    let mut c = h.client();
    let (status, short) = create(&mut c, &json!({"memoryMB": 1024, "timeout": 1}));
    assert_eq!(status, 201, "{short}");
    let (status, crashing) = create(&mut c, &json!({"memoryMB": 1024}));
    assert_eq!(status, 201, "{crashing}");
    assert_eq!(committed_mb(&mut c), 2048);

    h.runtime.kill_vmm(crashing["sandboxID"].as_str().expect("id"));
    // Memory is released just before the record says the sandbox ended: wait for both.
    wait_for("the timeout and the crash to be reaped", || {
        committed_mb(&mut c) == 0
            && [&short, &crashing].iter().all(|s| {
                let (_, now) = c.call("GET", &format!("/api/sandboxes/{}", s["sandboxID"].as_str().expect("id")), "");
                now["status"] != "running"
            })
    });
    let (status, s) = create(&mut c, &json!({"memoryMB": 2048}));
    assert_eq!(status, 201, "{s}");
}

#[test]
fn one_sandbox_larger_than_the_machine_is_400() {
    let h = Harness::start_with_capacity("cap-limits", small());
    let mut c = h.client();
    let (status, err) = create(&mut c, &json!({"cpuCount": 3}));
    assert_eq!(status, 400);
    assert_eq!(err["error"], "cpuCount must be at most 2 on this appliance (it has 2 vCPUs), got 3");
    let (status, err) = create(&mut c, &json!({"memoryMB": 4096}));
    assert_eq!(status, 400);
    assert_eq!(err["error"], "memoryMB must be at most 2048 on this appliance (its memory for sandboxes), got 4096");
    // A project's defaults are held to the same limits when a sandbox is made from them.
    let (status, p) = c.call("POST", "/api/projects", r#"{"name":"big","cpuCount":4}"#);
    assert_eq!(status, 201, "{p}");
    let (status, err) = create(&mut c, &json!({"project": "big"}));
    assert_eq!(status, 400, "{err}");
    assert_eq!(booted(&h), 0);
    assert_eq!(committed_mb(&mut c), 0);
    let (status, s) = create(&mut c, &json!({"cpuCount": 2, "memoryMB": 2048}));
    assert_eq!(status, 201, "the limits themselves fit: {s}");
}

#[test]
fn data_disk_below_its_reserve_refuses_creates_only() {
    let h = Harness::start_with_capacity("cap-disk", CapacityConfig { disk_reserve_mb: u64::MAX, ..small() });
    let mut c = h.client();
    let (status, err) = create(&mut c, &json!({}));
    assert_eq!(status, 503, "{err}");
    let message = err["error"].as_str().expect("error");
    assert!(message.starts_with("not enough space on the data disk for a new sandbox: "), "{message}");
    assert!(message.ends_with(&format!("{} MiB are kept in reserve", u64::MAX)), "{message}");
    assert_eq!(booted(&h), 0);
    assert_eq!(committed_mb(&mut c), 0);
    // The store keeps working.
    let (status, p) = c.call("POST", "/api/projects", r#"{"name":"still-works"}"#);
    assert_eq!(status, 201, "{p}");
}

#[test]
fn system_and_metrics_report_capacity() {
    let h = Harness::start_with_capacity("cap-report", small());
    let mut c = h.client();
    let (status, s) = create(&mut c, &json!({"memoryMB": 768, "cpuCount": 2}));
    assert_eq!(status, 201, "{s}");

    let (status, system) = c.call("GET", "/api/system", "");
    assert_eq!(status, 200);
    for field in ["slot", "version", "hostname", "state", "staged", "entries"] {
        assert!(system.get(field).is_some(), "{field} is still reported: {system}");
    }
    let cap = &system["capacity"];
    assert_eq!(
        cap["memoryMB"],
        json!({"total": 2560, "reserved": 512, "forSandboxes": 2048, "committed": 768, "free": 1280})
    );
    assert_eq!(cap["vcpus"], json!({"total": 2, "committed": 2}));
    assert_eq!(cap["disk"]["reserveMB"], 0);
    assert!(cap["disk"]["freeMB"].as_u64().is_some(), "{cap}");

    let metrics = c.raw("GET", "/metrics", b"");
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    let mib: u64 = 1 << 20;
    for line in [
        format!("appliance_sandbox_memory_capacity_bytes {}", 2048 * mib),
        format!("appliance_sandbox_memory_committed_bytes {}", 768 * mib),
        format!("appliance_sandbox_memory_free_bytes {}", 1280 * mib),
        "appliance_vcpus 2".to_string(),
        "appliance_sandbox_vcpus_committed 2".to_string(),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    assert!(text.contains("# TYPE appliance_sandbox_memory_free_bytes gauge"));
}

#[test]
fn sandboxes_running_across_a_restart_stay_committed() {
    let mut h = Harness::start_with_capacity("cap-restart", small());
    let mut c = h.client();
    let (status, s) = create(&mut c, &json!({"memoryMB": 1536}));
    assert_eq!(status, 201, "{s}");
    h.restart();
    let mut c = h.client();
    assert_eq!(committed_mb(&mut c), 1536, "the VMM still runs, so its memory is still held");
    let (status, err) = create(&mut c, &json!({"memoryMB": 1024}));
    assert_eq!(status, 503, "{err}");
    let (status, _) = c.call("DELETE", &format!("/api/sandboxes/{}", s["sandboxID"].as_str().expect("id")), "");
    assert_eq!(status, 204);
    assert_eq!(committed_mb(&mut c), 0);
}

#[test]
fn disk_sizes_are_bounded_by_the_template_the_limit_and_the_free_space() {
    // All but 12 GiB of the free space is kept in reserve: a 4 GiB disk fits, a 13 GiB one not.
    let probe = common::temp_dir("cap-disksize-probe");
    let free = appliance::capacity::free_disk_mb(&probe).expect("free space");
    assert!(free > 12288, "this test needs 12 GiB free, {free} MiB are");
    let reserve = free - 12288;
    let h = Harness::start_with_capacity("cap-disksize", CapacityConfig { disk_reserve_mb: reserve, ..small() });
    let mut c = h.client();

    let (status, s) = create(&mut c, &json!({}));
    assert_eq!((status, s["diskMB"].as_u64()), (201, Some(u64::from(common::TEMPLATE_DISK_MB))), "{s}");
    let (status, s) = create(&mut c, &json!({"diskMB": 4096, "memoryMB": 512}));
    assert_eq!((status, s["diskMB"].as_u64()), (201, Some(4096)), "{s}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    let (status, got) = c.call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!((status, got["diskMB"].as_u64()), (200, Some(4096)), "the size is recorded: {got}");

    let (status, err) = create(&mut c, &json!({"diskMB": 1024, "memoryMB": 512}));
    assert_eq!(status, 400, "{err}");
    assert!(err["error"].as_str().expect("error").contains("smaller than the template's disk"), "{err}");
    let (status, err) = create(&mut c, &json!({"diskMB": 300_000, "memoryMB": 512}));
    assert_eq!((status, err["error"].as_str()), (400, Some("diskMB must be at most 262144, got 300000")));
    let too_big = 12288 + 1024;
    let (status, err) = create(&mut c, &json!({"diskMB": too_big, "memoryMB": 512}));
    assert_eq!(status, 503, "{err}");
    let message = err["error"].as_str().expect("error");
    assert!(
        message.starts_with(&format!("not enough space on the data disk for a {too_big} MiB root disk")),
        "{message}"
    );
    // Refusals boot nothing and hold no memory.
    assert_eq!(booted(&h), 2);
    assert_eq!(committed_mb(&mut c), 512 + 512);
}

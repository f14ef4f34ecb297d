//! The reconcile after a restart, over real HTTP and a real store with the runtime double whose
//! "VMMs" and hibernation snapshots outlive the server: running records with a VMM are adopted
//! and their sealed tokens registered with the (new, empty) proxy registry again; records without
//! a VMM end; a create cut short by the restart ends as `error` with its VMM stopped; VMMs
//! without a record stop. Hibernated records keep their snapshot (or end `stopped` without one),
//! a running record whose VMM left a complete snapshot is hibernated, a wake cut short ends as
//! `error`, and a snapshot without a record is removed.

mod common;

use std::collections::BTreeMap;

use appliance::store::records::{SandboxRecord, SandboxStatus};
use appliance::store::Store;
use common::{FakeSandbox, Harness};

const VALUE: &str = "sk-reconcile-value-6b1f0e";

fn new_project(h: &Harness, name: &str, secrets: &[&str]) -> String {
    let mut c = h.client();
    let (status, project) = c.call("POST", "/api/projects", &format!(r#"{{"name":"{name}"}}"#));
    assert_eq!(status, 201, "{project}");
    let pid = project["id"].as_str().expect("id").to_string();
    for secret in secrets {
        let (status, body) = c.call(
            "PUT",
            &format!("/api/projects/{pid}/secrets/{secret}"),
            &format!(r#"{{"value":"{VALUE}-{secret}"}}"#),
        );
        assert_eq!(status, 204, "{body}");
    }
    pid
}

fn new_sandbox(h: &Harness, project: &str) -> String {
    let (status, sandbox) = h.client().call("POST", "/api/sandboxes", &format!(r#"{{"project":"{project}"}}"#));
    assert_eq!(status, 201, "{sandbox}");
    sandbox["sandboxID"].as_str().expect("id").to_string()
}

fn token_of(h: &Harness, id: &str, name: &str) -> String {
    let env = h.runtime.env_of(id);
    let token = env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).expect("token in env");
    assert!(token.starts_with("osb_sealed_"), "{token}");
    token
}

/// Token -> value the proxy registry now holds for `id`.
fn published(h: &Harness, id: &str) -> Option<BTreeMap<String, String>> {
    let published = h.publisher.published.lock().expect("lock");
    published.get(id).map(|seal| {
        seal.bindings.iter().map(|b| (b.token.clone(), String::from_utf8_lossy(&b.value).into_owned())).collect()
    })
}

/// Stops the server, forgets the proxy registry (a new process starts with an empty one), and
/// starts it again on the same data directory with the same surviving VMMs.
fn restart_with_empty_registry(h: &mut Harness) {
    h.stop();
    h.publisher.published.lock().expect("lock").clear();
    h.restart();
}

#[test]
fn a_running_sandbox_is_adopted_with_its_sealed_tokens_registered_again() {
    let mut h = Harness::start("reconcile-adopt");
    new_project(&h, "agents", &["API_KEY"]);
    let id = new_sandbox(&h, "agents");
    let token = token_of(&h, &id, "API_KEY");
    let before = published(&h, &id).expect("published at create");
    assert_eq!(before.get(&token).map(String::as_str), Some(format!("{VALUE}-API_KEY").as_str()));

    // The stored tokens are sealed: neither the token nor the value is in the store's file.
    h.stop();
    let data = std::fs::read(h.data_dir.join("store").join("data.mdb")).expect("store file");
    for needle in [token.as_bytes(), VALUE.as_bytes()] {
        assert!(!data.windows(needle.len()).any(|w| w == needle), "plaintext in the store");
    }
    h.publisher.published.lock().expect("lock").clear();
    h.restart();

    let after = published(&h, &id).expect("registered again after the restart");
    assert_eq!(after, before, "the same token stands for the same value");
    let (status, sandbox) = h.client().call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!((status, sandbox["status"].as_str()), (200, Some("running")), "{sandbox}");
    let (status, out) = h.client().call("POST", &format!("/api/sandboxes/{id}/commands"), r#"{"cmd":"echo $API_KEY"}"#);
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"].as_str(), Some(format!("{token}\n").as_str()));
    // Deleting it after the restart withdraws it as usual.
    let (status, _) = h.client().call("DELETE", &format!("/api/sandboxes/{id}"), "");
    assert_eq!(status, 204);
    assert!(published(&h, &id).is_none());
}

#[test]
fn a_deleted_secret_stays_dropped_across_a_restart() {
    let mut h = Harness::start("reconcile-dropped");
    let pid = new_project(&h, "agents", &["KEEP", "GONE"]);
    let id = new_sandbox(&h, "agents");
    let (keep, gone) = (token_of(&h, &id, "KEEP"), token_of(&h, &id, "GONE"));
    let (status, _) = h.client().call("DELETE", &format!("/api/projects/{pid}/secrets/GONE"), "");
    assert_eq!(status, 204);
    restart_with_empty_registry(&mut h);
    // Re-created after the restart: the old token must not come back to life.
    let (status, _) = h.client().call("PUT", &format!("/api/projects/{pid}/secrets/GONE"), r#"{"value":"new-value"}"#);
    assert_eq!(status, 204);
    let bound = published(&h, &id).expect("registered");
    assert!(bound.contains_key(&keep), "{bound:?}");
    assert!(!bound.contains_key(&gone), "a deleted secret's token came back: {bound:?}");
}

#[test]
fn a_running_record_whose_vmm_died_ends_stopped() {
    let mut h = Harness::start("reconcile-dead");
    new_project(&h, "agents", &["API_KEY"]);
    let id = new_sandbox(&h, "agents");
    h.stop();
    h.runtime.kill_vmm(&id);
    h.publisher.published.lock().expect("lock").clear();
    h.restart();
    let (_, sandbox) = h.client().call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!(sandbox["status"], "stopped", "{sandbox}");
    assert!(published(&h, &id).is_none());
    let (_, system) = h.client().call("GET", "/api/system", "");
    assert_eq!(system["capacity"]["memoryMB"]["committed"], 0, "{system}");
}

#[test]
fn a_vmm_without_a_record_is_stopped() {
    let mut h = Harness::start("reconcile-orphan");
    h.stop();
    let orphan = "3f1c9a52-0000-4000-8000-00000000abcd".to_string();
    h.runtime
        .sandboxes
        .lock()
        .expect("lock")
        .insert(orphan.clone(), FakeSandbox { cid: 77, alive: true, ..Default::default() });
    h.restart();
    assert!(h.runtime.stops.lock().expect("lock").contains(&orphan), "the orphan VMM was not stopped");
    assert!(!h.runtime.sandboxes.lock().expect("lock")[&orphan].alive);
}

#[test]
fn a_create_cut_short_by_a_restart_ends_as_error_with_its_vmm_stopped() {
    let mut h = Harness::start("reconcile-starting");
    h.stop();
    let id = "5d2e7b10-0000-4000-8000-00000000beef".to_string();
    // What a create leaves when the appliance dies between its record and its answer.
    let store = Store::open(&h.data_dir).expect("store");
    let record = SandboxRecord {
        id: id.clone(),
        template: "base".into(),
        status: SandboxStatus::Starting,
        started_at: 1,
        end_at: i64::MAX,
        idle_timeout_sec: None,
        cpu_count: 1,
        memory_mb: 512,
        disk_mb: 2048,
        metadata: BTreeMap::new(),
        project: None,
        project_id: None,
        cid: 0,
        hibernate_on_idle: true,
    };
    store.write(move |wtxn, dbs| Ok(dbs.sandboxes.put(wtxn, &record.id, &record)?)).expect("write");
    store.close();
    h.runtime
        .sandboxes
        .lock()
        .expect("lock")
        .insert(id.clone(), FakeSandbox { cid: 78, alive: true, ..Default::default() });
    h.restart();
    let (_, sandbox) = h.client().call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!(sandbox["status"], "error", "{sandbox}");
    assert!(h.runtime.stops.lock().expect("lock").contains(&id), "the half-created VMM was not stopped");
    let (_, system) = h.client().call("GET", "/api/system", "");
    assert_eq!(system["capacity"]["memoryMB"]["committed"], 0, "{system}");
}

fn hibernate(h: &Harness, id: &str) {
    let (status, body) = h.client().call("POST", &format!("/api/sandboxes/{id}/hibernate"), "");
    assert_eq!((status, body["status"].as_str()), (200, Some("hibernated")), "{body}");
}

fn status_of(h: &Harness, id: &str) -> String {
    let (_, sandbox) = h.client().call("GET", &format!("/api/sandboxes/{id}"), "");
    sandbox["status"].as_str().expect("status").to_string()
}

fn committed_mb(h: &Harness) -> u64 {
    let (_, system) = h.client().call("GET", "/api/system", "");
    system["capacity"]["memoryMB"]["committed"].as_u64().expect("committed")
}

#[test]
fn a_hibernated_sandbox_stays_hibernated_and_its_tokens_work_once_woken() {
    let mut h = Harness::start("reconcile-hibernated");
    new_project(&h, "agents", &["API_KEY"]);
    let id = new_sandbox(&h, "agents");
    let token = token_of(&h, &id, "API_KEY");
    let before = published(&h, &id).expect("published at create");
    hibernate(&h, &id);
    restart_with_empty_registry(&mut h);

    assert_eq!(status_of(&h, &id), "hibernated");
    assert_eq!(committed_mb(&h), 0, "no memory is committed for it");
    assert_eq!(published(&h, &id), Some(before), "its tokens are registered again under its CID");
    // A command wakes it, with the token it had.
    let (status, out) = h.client().call("POST", &format!("/api/sandboxes/{id}/commands"), r#"{"cmd":"echo $API_KEY"}"#);
    assert_eq!((status, out["stdout"].as_str()), (200, Some(format!("{token}\n").as_str())), "{out}");
    assert_eq!(status_of(&h, &id), "running");
    assert_eq!(committed_mb(&h), 512);
}

#[test]
fn a_hibernated_record_whose_snapshot_is_gone_ends_stopped() {
    let mut h = Harness::start("reconcile-lost-snapshot");
    new_project(&h, "agents", &["API_KEY"]);
    let id = new_sandbox(&h, "agents");
    hibernate(&h, &id);
    h.stop();
    h.runtime.sandboxes.lock().expect("lock").get_mut(&id).expect("sandbox").hibernated = false;
    h.publisher.published.lock().expect("lock").clear();
    h.restart();
    assert_eq!(status_of(&h, &id), "stopped");
    assert!(published(&h, &id).is_none());
    let (status, err) = h.client().call("POST", &format!("/api/sandboxes/{id}/wake"), "");
    assert_eq!(status, 409, "{err}");
}

#[test]
fn a_running_record_whose_vmm_left_a_complete_snapshot_is_hibernated() {
    let mut h = Harness::start("reconcile-unrecorded-snapshot");
    new_project(&h, "agents", &["API_KEY"]);
    let id = new_sandbox(&h, "agents");
    let token = token_of(&h, &id, "API_KEY");
    // The appliance stopped after the snapshot was kept and before the record said so.
    h.stop();
    {
        let mut sandboxes = h.runtime.sandboxes.lock().expect("lock");
        let sandbox = sandboxes.get_mut(&id).expect("sandbox");
        sandbox.alive = false;
        sandbox.hibernated = true;
    }
    h.publisher.published.lock().expect("lock").clear();
    h.restart();
    assert_eq!(status_of(&h, &id), "hibernated");
    assert_eq!(committed_mb(&h), 0);
    let (status, woken) = h.client().call("POST", &format!("/api/sandboxes/{id}/wake"), "");
    assert_eq!((status, woken["status"].as_str()), (200, Some("running")), "{woken}");
    let (_, out) = h.client().call("POST", &format!("/api/sandboxes/{id}/commands"), r#"{"cmd":"echo $API_KEY"}"#);
    assert_eq!(out["stdout"].as_str(), Some(format!("{token}\n").as_str()));
}

#[test]
fn a_wake_cut_short_by_a_restart_ends_as_error_with_its_vmm_stopped() {
    let mut h = Harness::start("reconcile-half-woken");
    let id = new_sandbox_without_project(&h);
    hibernate(&h, &id);
    // The appliance stopped after the VMM resumed the snapshot and before the record said so.
    h.stop();
    {
        let mut sandboxes = h.runtime.sandboxes.lock().expect("lock");
        let sandbox = sandboxes.get_mut(&id).expect("sandbox");
        sandbox.alive = true;
        sandbox.hibernated = false;
    }
    h.restart();
    assert_eq!(status_of(&h, &id), "error");
    assert!(h.runtime.stops.lock().expect("lock").contains(&id), "the half-woken VMM was stopped");
    assert!(!h.runtime.sandboxes.lock().expect("lock")[&id].alive);
    assert_eq!(committed_mb(&h), 0);
}

#[test]
fn a_snapshot_without_a_hibernated_record_is_removed() {
    let mut h = Harness::start("reconcile-orphan-snapshot");
    h.stop();
    let orphan = "3f1c9a52-0000-4000-8000-00000000cafe".to_string();
    h.runtime
        .sandboxes
        .lock()
        .expect("lock")
        .insert(orphan.clone(), FakeSandbox { cid: 79, hibernated: true, ..Default::default() });
    h.restart();
    assert!(h.runtime.stops.lock().expect("lock").contains(&orphan), "the orphan snapshot was not removed");
    assert!(!h.runtime.sandboxes.lock().expect("lock")[&orphan].hibernated);
}

fn new_sandbox_without_project(h: &Harness) -> String {
    let (status, sandbox) = h.client().call("POST", "/api/sandboxes", r#"{"timeout":600}"#);
    assert_eq!(status, 201, "{sandbox}");
    sandbox["sandboxID"].as_str().expect("id").to_string()
}

//! Admin key handling and master key rotation through the library entry points.

mod common;

use std::sync::Arc;
use std::time::Duration;

use appliance::keyfiles::{create_master_key, master_key_path, next_master_key_path, read_master_key};
use appliance::master_key::Choice;
use appliance::serve::{self, SandboxSide};
use common::{config, temp_dir, write_key_file, Client, FakePublisher, FakeRuntime, Harness, ADMIN_KEY};

#[test]
fn stored_admin_key_hash_survives_a_missing_key_file() {
    let dir = temp_dir("adminkey");
    let key = write_key_file(&dir);
    let running = serve::start(&config(&dir, Some(key.clone())), SandboxSide::Unavailable("t".into())).expect("start");
    running.shutdown(Duration::from_secs(5));
    std::fs::remove_file(&key).expect("rm key");
    let running = serve::start(&config(&dir, Some(key)), SandboxSide::Unavailable("t".into())).expect("restart");
    let mut c = Client::new(running.addr(), Some(ADMIN_KEY));
    let (status, _) = c.call("GET", "/api/projects", "");
    assert_eq!(status, 200, "stored hash still authenticates");
    let mut wrong = Client::new(running.addr(), Some("another-key-another-key"));
    assert_eq!(wrong.call("GET", "/api/projects", "").0, 401);
    running.shutdown(Duration::from_secs(5));

    // A short key is accepted with a warning (refusing would lock the operator out).
    let short = dir.join("short-key");
    std::fs::write(&short, "short-key\n").expect("write");
    let running = serve::start(&config(&dir, Some(short)), SandboxSide::Unavailable("t".into())).expect("start");
    let mut c = Client::new(running.addr(), Some("short-key"));
    assert_eq!(c.call("GET", "/api/projects", "").0, 200);
    let mut old = Client::new(running.addr(), Some(ADMIN_KEY));
    assert_eq!(old.call("GET", "/api/projects", "").0, 401, "a new key file replaces the stored key");
    running.shutdown(Duration::from_secs(5));
    // The store never holds the key itself.
    let data = std::fs::read(dir.join("store").join("data.mdb")).expect("data");
    assert!(!data.windows(ADMIN_KEY.len()).any(|w| w == ADMIN_KEY.as_bytes()));
    let _ = std::fs::remove_dir_all(&dir);
}

fn secret_value_seen_by_proxy(h: &Harness, project: &str) -> Vec<u8> {
    let mut c = h.client();
    let (status, s) = c.call("POST", "/api/sandboxes", &format!(r#"{{"project":"{project}"}}"#));
    assert_eq!(status, 201, "{s}");
    let id = s["sandboxID"].as_str().expect("id");
    let published = h.publisher.published.lock().expect("lock");
    published.get(id).expect("published").bindings[0].value.to_vec()
}

#[test]
fn rotate_key_reencrypts_and_secrets_still_open() {
    let mut h = Harness::start("rotate");
    let mut c = h.client();
    let (_, p) = c.call("POST", "/api/projects", r#"{"name":"rot"}"#);
    let id = p["id"].as_str().expect("id").to_string();
    c.call("PUT", &format!("/api/projects/{id}/secrets/TOKEN"), r#"{"value":"value-before-rotation"}"#);
    drop(c);
    h.stop();
    let before = read_master_key(&master_key_path(&h.data_dir)).expect("key").id();
    let report = appliance::master_key::rotate_offline(&h.data_dir, &Choice::DataDir, None, None).expect("rotate");
    assert_eq!(report.secrets, 1);
    let after = read_master_key(&master_key_path(&h.data_dir)).expect("key").id();
    assert_ne!(before, after);
    assert_eq!(report.new_key_id, appliance::crypto::hex(&after));
    assert!(!next_master_key_path(&h.data_dir).exists());
    h.restart();
    assert_eq!(secret_value_seen_by_proxy(&h, "rot"), b"value-before-rotation");
    // Rotating while the server holds the data dir is refused.
    assert!(appliance::master_key::rotate_offline(&h.data_dir, &Choice::DataDir, None, None)
        .unwrap_err()
        .contains("in use"));
}

#[test]
fn an_interrupted_rotation_is_completed_at_the_next_start() {
    let mut h = Harness::start("rotate-resume");
    let mut c = h.client();
    let (_, p) = c.call("POST", "/api/projects", r#"{"name":"res"}"#);
    let id = p["id"].as_str().expect("id").to_string();
    c.call("PUT", &format!("/api/projects/{id}/secrets/TOKEN"), r#"{"value":"value-across-crash"}"#);
    drop(c);
    h.stop();
    // A crash right after the new key was written, before anything was re-sealed.
    let next = create_master_key(&next_master_key_path(&h.data_dir)).expect("next key");
    h.restart();
    assert!(!next_master_key_path(&h.data_dir).exists());
    assert_eq!(read_master_key(&master_key_path(&h.data_dir)).expect("key").id(), next.id());
    assert_eq!(secret_value_seen_by_proxy(&h, "res"), b"value-across-crash");
}

#[test]
fn operator_supplied_master_keys_rotate_between_files() {
    let dir = temp_dir("opkeys");
    let old = dir.join("old.key");
    let new = dir.join("new.key");
    create_master_key(&old).expect("old");
    create_master_key(&new).expect("new");
    let mut cfg = config(&dir, Some(write_key_file(&dir)));
    cfg.master_key_file = Some(old.clone());
    let runtime = Arc::new(FakeRuntime::default());
    let publisher = Arc::new(FakePublisher::default());
    let backend = || appliance::lifecycle::Backend {
        runtime: runtime.clone(),
        publisher: publisher.clone(),
        egress: Arc::default(),
    };
    let running = serve::start(&cfg, SandboxSide::Wired(backend())).expect("start");
    let mut c = Client::new(running.addr(), Some(ADMIN_KEY));
    let (_, p) = c.call("POST", "/api/projects", r#"{"name":"op"}"#);
    c.call("PUT", &format!("/api/projects/{}/secrets/K", p["id"].as_str().expect("id")), r#"{"value":"op-value"}"#);
    drop(c);
    running.shutdown(Duration::from_secs(5));
    assert!(!master_key_path(&dir).exists(), "no key is generated when the operator supplies one");

    let report = appliance::master_key::rotate_offline(&dir, &Choice::DataDir, Some(&old), Some(&new)).expect("rotate");
    assert_eq!(report.secrets, 1);
    cfg.master_key_file = Some(new);
    let running = serve::start(&cfg, SandboxSide::Wired(backend())).expect("start with new key");
    let mut c = Client::new(running.addr(), Some(ADMIN_KEY));
    let (status, s) = c.call("POST", "/api/sandboxes", r#"{"project":"op"}"#);
    assert_eq!(status, 201, "{s}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    assert_eq!(
        publisher.published.lock().expect("lock").get(&id).expect("seal").bindings[0].value.as_slice(),
        b"op-value"
    );
    drop(c);
    running.shutdown(Duration::from_secs(5));
    // The old key no longer opens anything: starting with it fails to decrypt on use.
    cfg.master_key_file = Some(old);
    let running = serve::start(&cfg, SandboxSide::Wired(backend())).expect("start with old key");
    let mut c = Client::new(running.addr(), Some(ADMIN_KEY));
    let (status, v) = c.call("POST", "/api/sandboxes", r#"{"project":"op"}"#);
    assert_eq!(status, 500, "{v}");
    assert!(v["error"].as_str().expect("msg").contains("not loaded"));
    drop(c);
    running.shutdown(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sealed blob of `project`'s secret `name`, read from a stopped appliance's store.
fn stored_secret_blob(data_dir: &std::path::Path, project_id: &str, name: &str) -> Vec<u8> {
    let store = appliance::store::Store::open(data_dir).expect("store");
    let key = appliance::store::records::secret_key(project_id, name);
    let blob = store.read(|rtxn, dbs| Ok(dbs.secrets.get(rtxn, &key)?.map(<[u8]>::to_vec))).expect("read");
    store.close();
    blob.expect("the secret is stored")
}

#[test]
fn rotation_through_the_api_reencrypts_while_serving() {
    let mut h = Harness::start("rotate-api");
    let mut c = h.client();
    let (_, p) = c.call("POST", "/api/projects", r#"{"name":"live"}"#);
    let id = p["id"].as_str().expect("id").to_string();
    c.call("PUT", &format!("/api/projects/{id}/secrets/TOKEN"), r#"{"value":"value-rotated-live"}"#);
    assert_eq!(secret_value_seen_by_proxy(&h, "live"), b"value-rotated-live");
    let before = read_master_key(&master_key_path(&h.data_dir)).expect("key");

    let (status, answer) = c.call("POST", "/api/system/master-key/rotate", "");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["store"], "data-dir");
    assert_eq!(answer["secrets"], 1);
    let after = read_master_key(&master_key_path(&h.data_dir)).expect("key");
    assert_ne!(before.id(), after.id());
    assert_eq!(answer["keyId"], after.id_hex());
    assert!(!next_master_key_path(&h.data_dir).exists());
    // Served on without a restart: existing and new secrets open.
    assert_eq!(secret_value_seen_by_proxy(&h, "live"), b"value-rotated-live");
    c.call("PUT", &format!("/api/projects/{id}/secrets/LATER"), r#"{"value":"written-after-rotation"}"#);
    // The audit trail names the route and its result.
    let (_, audit) = c.call("GET", "/api/audit", "");
    let entries = audit["entries"].as_array().expect("entries");
    assert!(entries.iter().any(|e| e["route"] == "/api/system/master-key/rotate" && e["status"] == 200), "{audit}");
    drop(c);
    h.stop();

    // On disk, both secrets are under the new key only: the old key opens neither.
    let old_ring = appliance::crypto::Keyring::new(before);
    let new_ring = appliance::crypto::Keyring::new(read_master_key(&master_key_path(&h.data_dir)).expect("key"));
    for name in ["TOKEN", "LATER"] {
        let blob = stored_secret_blob(&h.data_dir, &id, name);
        let aad = appliance::store::records::secret_associated_data(&id, name);
        assert!(old_ring.open(&blob, &aad).is_err(), "{name} still opens with the old key");
        assert!(new_ring.open(&blob, &aad).is_ok(), "{name} does not open with the new key");
    }
    h.restart();
    let mut c = h.client();
    let (status, s) = c.call("POST", "/api/sandboxes", r#"{"project":"live"}"#);
    assert_eq!(status, 201, "{s}");
    let published = h.publisher.published.lock().expect("lock");
    let seal = published.get(s["sandboxID"].as_str().expect("id")).expect("published");
    let mut values: Vec<(String, Vec<u8>)> =
        seal.bindings.iter().map(|b| (b.secret_name.clone(), b.value.to_vec())).collect();
    values.sort();
    assert_eq!(
        values,
        vec![("LATER".into(), b"written-after-rotation".to_vec()), ("TOKEN".into(), b"value-rotated-live".to_vec())]
    );
}

#[test]
fn an_operator_managed_key_is_not_rotated_through_the_api() {
    let dir = temp_dir("rotate-api-opkey");
    let key = dir.join("op.key");
    create_master_key(&key).expect("key");
    let mut cfg = config(&dir, Some(write_key_file(&dir)));
    cfg.master_key_file = Some(key);
    let running = serve::start(&cfg, SandboxSide::Unavailable("t".into())).expect("start");
    let mut c = Client::new(running.addr(), Some(ADMIN_KEY));
    let (status, answer) = c.call("POST", "/api/system/master-key/rotate", "");
    assert_eq!(status, 409, "{answer}");
    assert!(answer["error"].as_str().expect("error").contains("rotate-key"), "{answer}");
    drop(c);
    running.shutdown(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_store_with_sealed_values_and_no_key_refuses_to_start() {
    let mut h = Harness::start("rotate-lost-key");
    let mut c = h.client();
    let (_, p) = c.call("POST", "/api/projects", r#"{"name":"lost"}"#);
    let id = p["id"].as_str().expect("id").to_string();
    c.call("PUT", &format!("/api/projects/{id}/secrets/TOKEN"), r#"{"value":"value-without-key"}"#);
    drop(c);
    h.stop();
    std::fs::remove_file(master_key_path(&h.data_dir)).expect("rm key");
    let cfg = config(&h.data_dir, Some(write_key_file(&h.data_dir)));
    let err = serve::start(&cfg, SandboxSide::Unavailable("t".into())).err().expect("refused");
    assert!(err.contains("no master key was found"), "{err}");
    assert!(!master_key_path(&h.data_dir).exists(), "no new key replaces the lost one");
}

//! The master key sealed to a real (software) TPM through the server's own start-up: what the
//! data directory then holds, a key moved off the data directory, rotation through the API, and
//! a data directory that meets a TPM other than its own.

mod common;

use appliance::crypto::Keyring;
use appliance::keyfiles::{master_key_path, read_master_key};
use appliance::master_key::Choice;
use appliance::serve::{self, SandboxSide};
use common::swtpm::{self, Swtpm};
use common::{config, temp_dir, write_key_file, Harness};

const VALUE: &str = "value-behind-the-tpm-5e1c";

/// Creates project `name` with secret TOKEN = `value`; returns the project id.
fn project_with_secret(h: &Harness, name: &str, value: &str) -> String {
    let mut c = h.client();
    let (status, p) = c.call("POST", "/api/projects", &format!(r#"{{"name":"{name}"}}"#));
    assert_eq!(status, 201, "{p}");
    let id = p["id"].as_str().expect("id").to_string();
    let (status, s) = c.call("PUT", &format!("/api/projects/{id}/secrets/TOKEN"), &format!(r#"{{"value":"{value}"}}"#));
    assert_eq!(status, 204, "{s}");
    id
}

/// The value the proxy is given for `project`'s first secret when a sandbox is created.
fn value_seen_by_proxy(h: &Harness, project: &str) -> Vec<u8> {
    let mut c = h.client();
    let (status, s) = c.call("POST", "/api/sandboxes", &format!(r#"{{"project":"{project}"}}"#));
    assert_eq!(status, 201, "{s}");
    let published = h.publisher.published.lock().expect("lock");
    published.get(s["sandboxID"].as_str().expect("id")).expect("published").bindings[0].value.to_vec()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_key_sealed_to_the_tpm_serves_survives_restarts_and_rotates() {
    if !swtpm::available() {
        return;
    }
    let state = temp_dir("tpm-serve-state");
    let tpm = Swtpm::start(&state);
    let mut h = Harness::start_with_key_store("tpm-serve", Choice::Tpm(tpm.socket.clone()));
    project_with_secret(&h, "sealed", VALUE);
    assert_eq!(value_seen_by_proxy(&h, "sealed"), VALUE.as_bytes());
    // The data directory holds the sealed blob only: no plaintext key file.
    assert!(!master_key_path(&h.data_dir).exists());
    let blob = std::fs::read(h.data_dir.join("master.key.tpm")).expect("sealed key");
    h.restart();
    assert_eq!(value_seen_by_proxy(&h, "sealed"), VALUE.as_bytes());

    let mut c = h.client();
    let (status, answer) = c.call("POST", "/api/system/master-key/rotate", "");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["store"], "tpm");
    assert_eq!(answer["secrets"], 1);
    drop(c);
    let rotated = std::fs::read(h.data_dir.join("master.key.tpm")).expect("sealed key");
    assert_ne!(rotated, blob, "the rotation sealed a new key");
    assert!(!h.data_dir.join("master.key.tpm.next").exists());
    h.restart();
    assert_eq!(value_seen_by_proxy(&h, "sealed"), VALUE.as_bytes());
    h.stop();
    // Nothing on the data directory holds the value or a usable key.
    for file in common::files_under(&h.data_dir) {
        let bytes = std::fs::read(&file).expect("read");
        assert!(!contains(&bytes, VALUE.as_bytes()), "{} holds the plaintext", file.display());
    }
}

#[test]
fn a_key_in_the_data_directory_moves_into_the_tpm_and_the_old_copy_opens_nothing() {
    if !swtpm::available() {
        return;
    }
    let mut h = Harness::start("tpm-migrate");
    let id = project_with_secret(&h, "moved", VALUE);
    h.stop();
    // What a backup taken before the move holds: the old key in the clear.
    let old_key = read_master_key(&master_key_path(&h.data_dir)).expect("old key");

    let state = temp_dir("tpm-migrate-state");
    let tpm = Swtpm::start(&state);
    h.master_key_store = Choice::Tpm(tpm.socket.clone());
    h.restart();
    assert!(!master_key_path(&h.data_dir).exists(), "the plaintext key file is removed");
    assert!(h.data_dir.join("master.key.tpm").exists());
    assert_eq!(value_seen_by_proxy(&h, "moved"), VALUE.as_bytes());
    h.stop();
    // The move re-encrypted under a fresh key: the old key (from a backup) opens nothing.
    let store = appliance::store::Store::open(&h.data_dir).expect("store");
    let key = appliance::store::records::secret_key(&id, "TOKEN");
    let blob = store.read(|rtxn, dbs| Ok(dbs.secrets.get(rtxn, &key)?.map(<[u8]>::to_vec))).expect("read");
    store.close();
    let aad = appliance::store::records::secret_associated_data(&id, "TOKEN");
    assert!(Keyring::new(old_key).open(&blob.expect("stored"), &aad).is_err());
}

#[test]
fn a_data_directory_meeting_another_tpm_refuses_to_start_and_keeps_its_sealed_key() {
    if !swtpm::available() {
        return;
    }
    let state = temp_dir("tpm-own-state");
    let own = Swtpm::start(&state);
    let mut h = Harness::start_with_key_store("tpm-other", Choice::Tpm(own.socket.clone()));
    project_with_secret(&h, "mine", VALUE);
    h.stop();
    let sealed = std::fs::read(h.data_dir.join("master.key.tpm")).expect("sealed key");

    let other_state = temp_dir("tpm-other-state");
    let other = Swtpm::start(&other_state);
    let mut cfg = config(&h.data_dir, Some(write_key_file(&h.data_dir)));
    cfg.master_key_store = Choice::Tpm(other.socket.clone());
    let err = serve::start(&cfg, SandboxSide::Unavailable("t".into())).err().expect("refused");
    assert!(err.contains("cannot unseal the master key"), "{err}");
    assert_eq!(std::fs::read(h.data_dir.join("master.key.tpm")).expect("still there"), sealed);
    // With its own TPM it starts again.
    h.restart();
    assert_eq!(value_seen_by_proxy(&h, "mine"), VALUE.as_bytes());
}

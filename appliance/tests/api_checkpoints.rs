//! Checkpoints and forks over real HTTP with the runtime double: the routes and their answers (as
//! OpenComputer's), restoring in place, forks with their own CID and tokens, limits and the
//! retention policy, bad input, key scopes, and what a restart finds on the data disk.

mod common;

use std::collections::BTreeMap;

use common::{Client, FakeCheckpoint, Harness};
use serde_json::{json, Value};

fn create(c: &mut Client, body: &Value) -> String {
    let (status, s) = c.call("POST", "/api/sandboxes", &body.to_string());
    assert_eq!(status, 201, "{s}");
    s["sandboxID"].as_str().expect("id").to_string()
}

fn checkpoint(c: &mut Client, id: &str, body: &Value) -> Value {
    let (status, cp) = c.call("POST", &format!("/api/sandboxes/{id}/checkpoints"), &body.to_string());
    assert_eq!(status, 201, "{cp}");
    cp
}

fn write(c: &mut Client, id: &str, path: &str, bytes: &[u8]) {
    assert_eq!(c.raw("PUT", &format!("/api/sandboxes/{id}/files?path={path}"), bytes).status, 204);
}

fn read(c: &mut Client, id: &str, path: &str) -> (u16, Vec<u8>) {
    let r = c.raw("GET", &format!("/api/sandboxes/{id}/files?path={path}"), b"");
    (r.status, r.body)
}

fn echo(c: &mut Client, id: &str, var: &str) -> String {
    let (status, out) =
        c.call("POST", &format!("/api/sandboxes/{id}/commands"), &json!({ "cmd": format!("echo ${var}") }).to_string());
    assert_eq!(status, 200, "{out}");
    out["stdout"].as_str().expect("stdout").trim().to_string()
}

fn names(list: &Value) -> Vec<String> {
    list.as_array().expect("array").iter().map(|c| c["name"].as_str().expect("name").to_string()).collect()
}

/// A project with a secret, and a sandbox of it with a file.
fn project_sandbox(c: &mut Client) -> (String, String) {
    let (_, p) = c.call("POST", "/api/projects", r#"{"name":"agents"}"#);
    let pid = p["id"].as_str().expect("id").to_string();
    assert_eq!(c.call("PUT", &format!("/api/projects/{pid}/secrets/API_KEY"), r#"{"value":"sk-cp-1"}"#).0, 204);
    let id = create(c, &json!({"project": "agents", "memoryMB": 1024, "timeout": 600}));
    (pid, id)
}

#[test]
fn a_checkpoint_is_taken_listed_restored_in_place_and_deleted_as_opencomputer_answers() {
    let h = Harness::start("cp-cycle");
    let mut c = h.client();
    let (_, id) = project_sandbox(&mut c);
    write(&mut c, &id, "/work/state.txt", b"before");
    let token = echo(&mut c, &id, "API_KEY");
    let cid = h.runtime.sandboxes.lock().expect("lock")[&id].cid;

    let cp = checkpoint(&mut c, &id, &json!({"name": "after-setup"}));
    let cp_id = cp["id"].as_str().expect("id").to_string();
    assert_eq!((cp["sandboxID"].as_str(), cp["name"].as_str()), (Some(id.as_str()), Some("after-setup")), "{cp}");
    assert_eq!((cp["status"].as_str(), cp["kind"].as_str()), (Some("ready"), Some("full")), "{cp}");
    assert!(cp["sizeBytes"].as_u64().is_some_and(|n| n > 0), "{cp}");
    assert!(cp["createdAt"].as_str().is_some_and(|t| t.ends_with('Z')), "{cp}");

    // The sandbox runs on and changes.
    write(&mut c, &id, "/work/state.txt", b"after");
    write(&mut c, &id, "/work/new.txt", b"later");
    let (status, list) = c.call("GET", &format!("/api/sandboxes/{id}/checkpoints"), "");
    assert_eq!((status, names(&list)), (200, vec!["after-setup".to_string()]), "{list}");
    assert_eq!(list[0], cp, "the list shows what the create answered");

    let (status, restored) = c.call("POST", &format!("/api/sandboxes/{id}/checkpoints/{cp_id}/restore"), "");
    assert_eq!((status, restored["status"].as_str()), (200, Some("running")), "{restored}");
    assert_eq!(read(&mut c, &id, "/work/state.txt"), (200, b"before".to_vec()));
    assert_eq!(read(&mut c, &id, "/work/new.txt").0, 404, "what came after the checkpoint is gone");
    // Same sandbox: its CID and token stay, and the proxy still has it.
    assert_eq!(h.runtime.sandboxes.lock().expect("lock")[&id].cid, cid);
    assert_eq!(echo(&mut c, &id, "API_KEY"), token);
    assert!(h.publisher.published.lock().expect("lock").contains_key(&id));
    assert_eq!(h.runtime.sandboxes.lock().expect("lock")[&id].resumed, 1, "the resumed guest got time and entropy");

    // Names are unique per sandbox; a restore can be repeated.
    let (status, e) = c.call("POST", &format!("/api/sandboxes/{id}/checkpoints"), r#"{"name":"after-setup"}"#);
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().is_some_and(|m| m.contains("already has a checkpoint named")), "{e}");
    write(&mut c, &id, "/work/state.txt", b"again");
    assert_eq!(c.call("POST", &format!("/api/sandboxes/{id}/checkpoints/{cp_id}/restore"), "{}").0, 200);
    assert_eq!(read(&mut c, &id, "/work/state.txt"), (200, b"before".to_vec()));

    assert_eq!(c.call("DELETE", &format!("/api/sandboxes/{id}/checkpoints/{cp_id}"), "").0, 204);
    assert!(h.runtime.checkpoints.lock().expect("lock").is_empty(), "its files are gone");
    let (status, e) = c.call("DELETE", &format!("/api/sandboxes/{id}/checkpoints/{cp_id}"), "");
    assert_eq!(status, 404, "{e}");
    let (status, e) = c.call("POST", &format!("/api/sandboxes/{id}/checkpoints/{cp_id}/restore"), "");
    assert_eq!(status, 404, "{e}");
    let (_, list) = c.call("GET", &format!("/api/sandboxes/{id}/checkpoints"), "");
    assert_eq!(list, json!([]));
}

#[test]
fn forks_get_their_own_sandbox_cid_and_tokens() {
    let h = Harness::start("cp-fork");
    let mut c = h.client();
    let (_, id) = project_sandbox(&mut c);
    write(&mut c, &id, "/work/model.bin", b"trained");
    let original_token = echo(&mut c, &id, "API_KEY");
    let cp = checkpoint(&mut c, &id, &json!({"name": "trained"}));
    let cp_id = cp["id"].as_str().expect("id");

    let mut forks = Vec::new();
    for body in [json!({"timeout": 0}), json!({"timeout": 300, "envs": {"ROLE": "b"}})] {
        let (status, s) = c.call("POST", &format!("/api/sandboxes/from-checkpoint/{cp_id}"), &body.to_string());
        assert_eq!((status, s["status"].as_str()), (201, Some("running")), "{s}");
        assert_eq!(s["memoryMB"], 1024, "a fork has the checkpoint's machine: {s}");
        forks.push(s["sandboxID"].as_str().expect("id").to_string());
    }
    assert!(forks[0] != forks[1] && !forks.contains(&id));
    let sandboxes = h.runtime.sandboxes.lock().expect("lock");
    let cids: Vec<u32> = [&id, &forks[0], &forks[1]].iter().map(|s| sandboxes[s.as_str()].cid).collect();
    drop(sandboxes);
    assert!(cids[0] != cids[1] && cids[1] != cids[2] && cids[0] != cids[2], "{cids:?}");

    let mut tokens = vec![original_token.clone()];
    for (fork, cid) in forks.iter().zip(&cids[1..]) {
        assert_eq!(read(&mut c, fork, "/work/model.bin"), (200, b"trained".to_vec()), "the checkpoint's files");
        let token = echo(&mut c, fork, "API_KEY");
        assert!(token.starts_with("osb_sealed_"), "{token}");
        // The proxy substitutes this fork's own token for its own CID, and only that.
        let published = h.publisher.published.lock().expect("lock");
        let seal = &published[fork];
        assert_eq!(seal.cid, *cid);
        assert_eq!(seal.bindings.iter().map(|b| b.token.as_str()).collect::<Vec<_>>(), vec![token.as_str()]);
        assert_eq!(&*seal.bindings[0].value, b"sk-cp-1");
        tokens.push(token);
    }
    assert!(tokens[0] != tokens[1] && tokens[1] != tokens[2] && tokens[0] != tokens[2], "fresh tokens: {tokens:?}");
    assert_eq!(echo(&mut c, &forks[1], "ROLE"), "b");
    // The original is untouched and keeps its token.
    assert_eq!(echo(&mut c, &id, "API_KEY"), original_token);
    let (_, s) = c.call("GET", &format!("/api/sandboxes/{}", forks[0]), "");
    assert!(s["endAt"].is_null(), "timeout 0: no automatic end: {s}");

    // A fork outlives nothing it depends on: the checkpoint and the original can go.
    assert_eq!(c.call("DELETE", &format!("/api/sandboxes/{id}"), "").0, 204);
    let (status, s) = c.call("POST", &format!("/api/sandboxes/from-checkpoint/{cp_id}"), "");
    assert_eq!(status, 201, "a checkpoint outlives its sandbox: {s}");
    let (_, list) = c.call("GET", &format!("/api/sandboxes/{id}/checkpoints"), "");
    assert_eq!(names(&list), vec!["trained".to_string()], "and is listed under it");
    assert_eq!(c.call("DELETE", &format!("/api/sandboxes/{id}/checkpoints/{cp_id}"), "").0, 204);
    assert_eq!(read(&mut c, &forks[0], "/work/model.bin"), (200, b"trained".to_vec()));

    // Bad input loses nothing.
    let missing = "00000000-0000-4000-8000-000000000000";
    let (status, e) = c.call("POST", &format!("/api/sandboxes/from-checkpoint/{missing}"), "{}");
    assert_eq!(status, 404, "{e}");
    let (status, e) = c.call("POST", "/api/sandboxes/from-checkpoint/not-an-id", "{}");
    assert_eq!(status, 400, "{e}");
}

#[test]
fn a_fork_asks_for_no_more_memory_than_its_checkpoint_and_is_admitted_like_a_create() {
    let h = Harness::start("cp-fork-bad");
    let mut c = h.client();
    let (_, id) = project_sandbox(&mut c);
    let cp = checkpoint(&mut c, &id, &json!({"name": "x"}));
    let cp_id = cp["id"].as_str().expect("id");
    let (status, e) =
        c.call("POST", &format!("/api/sandboxes/from-checkpoint/{cp_id}"), r#"{"memoryMB": 4096, "timeout": 60}"#);
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().is_some_and(|m| m.contains("1024 MiB")), "{e}");
    let (status, e) = c.call("POST", &format!("/api/sandboxes/from-checkpoint/{cp_id}"), r#"{"envs": {"1BAD": "x"}}"#);
    assert_eq!(status, 400, "{e}");
    let (status, e) = c.call("POST", &format!("/api/sandboxes/from-checkpoint/{cp_id}"), r#"{"secretStore": "nope"}"#);
    assert_eq!(status, 404, "{e}");
    // Less than the checkpoint's is its memory, as OpenComputer clamps it.
    let (status, s) = c.call("POST", &format!("/api/sandboxes/from-checkpoint/{cp_id}"), r#"{"memoryMB": 512}"#);
    assert_eq!((status, &s["memoryMB"]), (201, &json!(1024)), "{s}");
    let (_, all) = c.call("GET", "/api/sandboxes", "");
    assert_eq!(all.as_array().expect("list").len(), 2, "no refused fork left a sandbox: {all}");
}

#[test]
fn limits_kinds_and_the_retention_policy() {
    let h = Harness::start("cp-limits");
    let mut c = h.client();
    let id = create(&mut c, &json!({}));
    for bad in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "x", "kind": "memory"}),
        json!({"name": "x", "promoteToFull": true}),
        json!({"name": "x", "retentionPolicy": {"mode": "keep_all"}}),
        json!({"name": "x", "retentionPolicy": {"mode": "delete_oldest", "maxCount": 11}}),
    ] {
        let (status, e) = c.call("POST", &format!("/api/sandboxes/{id}/checkpoints"), &bad.to_string());
        assert_eq!(status, 400, "{bad}: {e}");
        assert!(e["error"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    assert!(h.runtime.checkpoints.lock().expect("lock").is_empty(), "refused requests write nothing");

    for i in 0..10 {
        checkpoint(&mut c, &id, &json!({"name": format!("full-{i}")}));
    }
    let (status, e) = c.call("POST", &format!("/api/sandboxes/{id}/checkpoints"), r#"{"name":"full-10"}"#);
    assert_eq!(status, 400, "at most 10 full checkpoints: {e}");
    assert!(e["error"].as_str().is_some_and(|m| m.contains("delete_oldest")), "{e}");
    // Disk-only checkpoints count apart.
    let disk = checkpoint(&mut c, &id, &json!({"name": "disk-0", "kind": "disk_only"}));
    assert_eq!(disk["kind"], "disk_only");
    // The policy deletes the oldest of the same kind first.
    let policy = json!({"name": "full-10", "retentionPolicy": {"mode": "delete_oldest", "maxCount": 10}});
    checkpoint(&mut c, &id, &policy);
    let (_, list) = c.call("GET", &format!("/api/sandboxes/{id}/checkpoints"), "");
    let listed = names(&list);
    assert_eq!(listed.len(), 11, "{listed:?}");
    assert!(!listed.contains(&"full-0".to_string()) && listed.contains(&"full-10".to_string()), "{listed:?}");
    assert!(listed.contains(&"disk-0".to_string()));
    let policy = json!({"name": "full-11", "retentionPolicy": {"mode": "delete_oldest", "maxCount": 3}});
    checkpoint(&mut c, &id, &policy);
    let (_, list) = c.call("GET", &format!("/api/sandboxes/{id}/checkpoints"), "");
    let mut listed = names(&list);
    listed.sort();
    assert_eq!(listed, ["disk-0", "full-10", "full-11", "full-9"], "the oldest full ones went");
    assert_eq!(h.runtime.checkpoints.lock().expect("lock").len(), 4, "deleted ones leave no files");

    // A disk-only restore boots the disk: the guest gets its environment again.
    let disk_id = disk["id"].as_str().expect("id");
    let (status, s) = c.call("POST", &format!("/api/sandboxes/{id}/checkpoints/{disk_id}/restore"), "");
    assert_eq!(status, 200, "{s}");
    assert_eq!(h.runtime.sandboxes.lock().expect("lock")[&id].resumed, 0, "booted, not resumed");
}

#[test]
fn a_failed_checkpoint_keeps_nothing_and_the_sandbox_runs_on() {
    let h = Harness::start("cp-fail");
    let mut c = h.client();
    let id = create(&mut c, &json!({}));
    *h.runtime.fail_checkpoint.lock().expect("lock") = Some("disk full".into());
    let (status, e) = c.call("POST", &format!("/api/sandboxes/{id}/checkpoints"), r#"{"name":"x"}"#);
    assert_eq!(status, 500, "{e}");
    assert!(e["error"].as_str().is_some_and(|m| m.contains("disk full")), "{e}");
    let (_, list) = c.call("GET", &format!("/api/sandboxes/{id}/checkpoints"), "");
    assert_eq!(list, json!([]));
    let (_, s) = c.call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!(s["status"], "running");
}

#[test]
fn a_hibernated_sandbox_is_woken_for_a_checkpoint_and_a_restore() {
    let h = Harness::start("cp-hibernated");
    let mut c = h.client();
    let id = create(&mut c, &json!({"timeout": 600}));
    write(&mut c, &id, "/f", b"1");
    assert_eq!(c.call("POST", &format!("/api/sandboxes/{id}/hibernate"), "").0, 200);
    let cp = checkpoint(&mut c, &id, &json!({"name": "x"}));
    assert_eq!(h.runtime.wakes.lock().expect("lock").len(), 1);
    write(&mut c, &id, "/f", b"2");
    assert_eq!(c.call("POST", &format!("/api/sandboxes/{id}/hibernate"), "").0, 200);
    let cp_id = cp["id"].as_str().expect("id");
    let (status, s) = c.call("POST", &format!("/api/sandboxes/{id}/checkpoints/{cp_id}/restore"), "");
    assert_eq!((status, s["status"].as_str()), (200, Some("running")), "{s}");
    assert_eq!(read(&mut c, &id, "/f"), (200, b"1".to_vec()));
}

#[test]
fn project_keys_reach_only_their_projects_checkpoints() {
    let h = Harness::start("cp-scope");
    let mut op = h.client();
    let (_, id) = project_sandbox(&mut op);
    let (_, other) = op.call("POST", "/api/projects", r#"{"name":"other"}"#);
    let other_id = create(&mut op, &json!({"project": "other"}));
    let cp = checkpoint(&mut op, &other_id, &json!({"name": "theirs"}));
    let cp_id = cp["id"].as_str().expect("id");
    let (status, key) = op.call("POST", "/api/keys", r#"{"name":"agent","projects":["agents"]}"#);
    assert_eq!(status, 201, "{key} {other}");
    let mut agent = Client::new(h.addr, key["key"].as_str());

    let (status, e) = agent.call("POST", &format!("/api/sandboxes/{other_id}/checkpoints"), r#"{"name":"mine"}"#);
    assert_eq!(status, 403, "{e}");
    let (status, e) = agent.call("GET", &format!("/api/sandboxes/{other_id}/checkpoints"), "");
    assert_eq!(status, 403, "{e}");
    let (status, e) = agent.call("POST", &format!("/api/sandboxes/from-checkpoint/{cp_id}"), "{}");
    assert_eq!(status, 404, "another project's checkpoint is not found: {e}");
    // Its own: taken and forked.
    let mine = checkpoint(&mut agent, &id, &json!({"name": "mine"}));
    let (status, s) =
        agent.call("POST", &format!("/api/sandboxes/from-checkpoint/{}", mine["id"].as_str().expect("id")), "{}");
    assert_eq!(status, 201, "{s}");
    // Naming another project for the fork's tokens is refused.
    let (status, e) = agent.call(
        "POST",
        &format!("/api/sandboxes/from-checkpoint/{}", mine["id"].as_str().expect("id")),
        r#"{"secretStore":"other"}"#,
    );
    assert_eq!(status, 403, "{e}");
}

#[test]
fn a_restart_keeps_checkpoints_and_drops_files_without_a_record_and_records_without_files() {
    let mut h = Harness::start("cp-restart");
    let mut c = h.client();
    let id = create(&mut c, &json!({}));
    let kept = checkpoint(&mut c, &id, &json!({"name": "kept"}));
    let lost = checkpoint(&mut c, &id, &json!({"name": "lost"}));
    // A crash between writing files and storing their record; and files lost from the disk.
    let orphan = FakeCheckpoint {
        kind: appliance::runtime::CheckpointKind::Full,
        files: BTreeMap::new(),
        env: Vec::new(),
        sessions: Vec::new(),
        memory: 512,
    };
    h.runtime.checkpoints.lock().expect("lock").insert("orphan".into(), orphan);
    h.runtime.checkpoints.lock().expect("lock").remove(lost["id"].as_str().expect("id"));
    h.restart();
    let mut c = h.client();
    let (_, list) = c.call("GET", &format!("/api/sandboxes/{id}/checkpoints"), "");
    assert_eq!(names(&list), vec!["kept".to_string()], "{list}");
    let on_disk: Vec<String> = h.runtime.checkpoints.lock().expect("lock").keys().cloned().collect();
    assert_eq!(on_disk, vec![kept["id"].as_str().expect("id").to_string()]);
}

//! Per-secret hosts (`allowedHosts`), host-list validation by the proxy's own parser, secrets
//! stored before per-secret hosts existed, and changes reaching running sandboxes before the
//! API call returns (same token, new value, hosts or allowlist), over real HTTP and LMDB.

mod common;

use std::sync::Arc;
use std::time::Duration;

use appliance::crypto::Keyring;
use appliance::store::records::{secret_associated_data, secret_key, ProjectRecord};
use common::{Client, FakePublisher, FakeRuntime, Harness};
use heed::types::{Bytes, SerdeJson, Str};
use heed::{Database, EnvOpenOptions};
use serde_json::{json, Value};

fn new_project(c: &mut Client, name: &str, allowlist: &[&str]) -> String {
    let (status, p) = c.call("POST", "/api/projects", &json!({"name": name, "egressAllowlist": allowlist}).to_string());
    assert_eq!(status, 201, "{p}");
    p["id"].as_str().expect("id").to_string()
}

fn put_secret(c: &mut Client, pid: &str, name: &str, body: &Value) -> (u16, Value) {
    c.call("PUT", &format!("/api/projects/{pid}/secrets/{name}"), &body.to_string())
}

fn new_sandbox(h: &Harness, c: &mut Client, project: &str) -> String {
    let (status, s) = c.call("POST", "/api/sandboxes", &json!({"project": project}).to_string());
    assert_eq!(status, 201, "{s}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    assert!(h.publisher.published.lock().expect("lock").contains_key(&id));
    id
}

fn token_of(h: &Harness, sandbox: &str, name: &str) -> String {
    h.runtime.env_of(sandbox).into_iter().find(|(k, _)| k == name).map(|(_, v)| v).expect("token in env")
}

/// What the proxy currently has for the sandbox: egress allowlist, and per secret name its
/// token, value and hosts.
struct Published {
    egress: Vec<String>,
    bindings: Vec<(String, String, String, Vec<String>)>,
}

fn published(h: &Harness, sandbox: &str) -> Published {
    let map = h.publisher.published.lock().expect("lock");
    let seal = map.get(sandbox).expect("sandbox is registered");
    let mut bindings: Vec<_> = seal
        .bindings
        .iter()
        .map(|b| {
            let value = String::from_utf8(b.value.to_vec()).expect("utf8");
            (b.secret_name.clone(), b.token.clone(), value, b.allowed_hosts.clone())
        })
        .collect();
    bindings.sort();
    Published { egress: seal.egress_allowlist.clone(), bindings }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

#[test]
fn allowed_hosts_are_validated_stored_and_listed() {
    let h = Harness::start("secret-hosts");
    let mut c = h.client();
    let pid = new_project(&mut c, "hosts", &["api.anthropic.com"]);
    let base = format!("/api/projects/{pid}/secrets");
    let hosts = json!(["API.anthropic.com", "*.example.com", "db.internal.example:5432", "api.anthropic.com"]);
    let (status, body) =
        put_secret(&mut c, &pid, "WITH_HOSTS", &json!({"value": "value-one-111", "allowedHosts": hosts}));
    assert_eq!((status, body), (204, Value::Null));
    let (status, _) = put_secret(&mut c, &pid, "NO_HOSTS", &json!({"value": "value-two-222"}));
    assert_eq!(status, 204);
    let (status, _) = put_secret(&mut c, &pid, "EMPTY_HOSTS", &json!({"value": "value-three-333", "allowedHosts": []}));
    assert_eq!(status, 204);
    let expected = json!([
        {"name": "EMPTY_HOSTS", "allowedHosts": []},
        {"name": "NO_HOSTS", "allowedHosts": []},
        {"name": "WITH_HOSTS", "allowedHosts": ["api.anthropic.com", "*.example.com", "db.internal.example:5432"]},
    ]);
    let (status, list) = c.call("GET", &base, "");
    assert_eq!((status, &list), (200, &expected));

    // Refused: wildcards over public suffixes, bad ports, non-hosts, wrong types, too many.
    // Each is a 400 naming the field (and the entry), and nothing changes.
    for bad in ["*.com", "*.co.uk", "*.github.io", "a.example:99999", "a.example:0", "bad host", "*"] {
        let (status, v) =
            put_secret(&mut c, &pid, "WITH_HOSTS", &json!({"value": "value-refused-999", "allowedHosts": [bad]}));
        assert_eq!(status, 400, "{bad}: {v}");
        let msg = v["error"].as_str().expect("error");
        assert!(msg.contains("allowedHosts") && msg.contains(bad), "{bad}: {msg}");
    }
    let (status, v) =
        put_secret(&mut c, &pid, "NEW_NAME", &json!({"value": "value-refused-999", "allowedHosts": "api.example.com"}));
    assert_eq!(status, 400, "{v}");
    assert!(!v["error"].as_str().expect("error").contains("value-refused-999"));
    let many: Vec<String> = (0..257).map(|i| format!("h{i}.example.com")).collect();
    let (status, v) =
        put_secret(&mut c, &pid, "NEW_NAME", &json!({"value": "value-refused-999", "allowedHosts": many}));
    assert_eq!(status, 400);
    assert!(v["error"].as_str().expect("error").contains("allowedHosts has more than 256 entries"), "{v}");
    let (_, list) = c.call("GET", &base, "");
    assert_eq!(list, expected, "refused requests stored nothing");

    // The stored value did not change either: a new sandbox gets the first value.
    let sid = new_sandbox(&h, &mut c, "hosts");
    let p = published(&h, &sid);
    let with_hosts = p.bindings.iter().find(|b| b.0 == "WITH_HOSTS").expect("binding");
    assert_eq!(with_hosts.2, "value-one-111");
    assert_eq!(with_hosts.3, strings(&["api.anthropic.com", "*.example.com", "db.internal.example:5432"]));
    let no_hosts = p.bindings.iter().find(|b| b.0 == "NO_HOSTS").expect("binding");
    assert_eq!(no_hosts.3, strings(&["api.anthropic.com"]), "without its own hosts a secret follows the project");

    // A PUT without allowedHosts replaces the hosts too.
    let (status, _) = put_secret(&mut c, &pid, "WITH_HOSTS", &json!({"value": "value-four-444"}));
    assert_eq!(status, 204);
    let (_, list) = c.call("GET", &base, "");
    assert_eq!(list[2], json!({"name": "WITH_HOSTS", "allowedHosts": []}));

    // The project's egressAllowlist goes through the same parser.
    for bad in ["*.com", "api.example.com:70000", "*.github.io"] {
        let (status, v) = c.call("POST", "/api/projects", &json!({"name": "p2", "egressAllowlist": [bad]}).to_string());
        assert_eq!(status, 400, "{bad}: {v}");
        let msg = v["error"].as_str().expect("error");
        assert!(msg.contains("egressAllowlist") && msg.contains(bad), "{msg}");
        let (status, _) = c.call(
            "PUT",
            &format!("/api/projects/{pid}"),
            &json!({"egressAllowlist": ["ok.example.com", bad]}).to_string(),
        );
        assert_eq!(status, 400);
    }
    let (_, project) = c.call("GET", &format!("/api/projects/{pid}"), "");
    assert_eq!(project["egressAllowlist"], json!(["api.anthropic.com"]), "refused updates changed nothing");
    let (status, p2) =
        c.call("POST", "/api/projects", r#"{"name":"p2","egressAllowlist":["DB.example.com:5432","*.example.org"]}"#);
    assert_eq!(status, 201, "{p2}");
    assert_eq!(p2["egressAllowlist"], json!(["db.example.com:5432", "*.example.org"]));

    let text = String::from_utf8_lossy(&c.transcript).to_string();
    for v in ["value-one-111", "value-two-222", "value-three-333", "value-four-444", "value-refused-999"] {
        assert!(!text.contains(v), "{v} was returned");
    }
}

/// A store as the appliance wrote it before per-secret hosts: no `secret_hosts` database, the
/// secret only in `secrets`. It must still list and seal, following the project's allowlist.
#[test]
fn secrets_stored_before_per_secret_hosts_still_load() {
    let dir = common::temp_dir("old-format");
    let project = ProjectRecord {
        id: "6f9619ff-8b86-d011-b42d-00c04fc964ff".into(),
        name: "legacy".into(),
        template: "base".into(),
        cpu_count: 1,
        memory_mb: 512,
        timeout_sec: 300,
        egress_allowlist: vec!["api.legacy.example".into()],
        auto_hibernate: true,
        created_at: 1_700_000_000,
        updated_at: 1_700_000_000,
    };
    {
        let key =
            appliance::keyfiles::create_master_key(&appliance::keyfiles::master_key_path(&dir)).expect("master key");
        let ring = Keyring::new(key);
        let store_dir = appliance::store::store_path(&dir);
        std::fs::create_dir_all(&store_dir).expect("mkdir");
        let mut options = EnvOpenOptions::new();
        options.map_size(1 << 30).max_dbs(16);
        // SAFETY: a fresh directory no other process or environment uses.
        let env = unsafe { options.open(&store_dir) }.expect("env");
        let mut wtxn = env.write_txn().expect("txn");
        let meta: Database<Str, Bytes> = env.create_database(&mut wtxn, Some("meta")).expect("db");
        let projects: Database<Str, SerdeJson<ProjectRecord>> =
            env.create_database(&mut wtxn, Some("projects")).expect("db");
        let names: Database<Str, Str> = env.create_database(&mut wtxn, Some("project_names")).expect("db");
        let secrets: Database<Str, Bytes> = env.create_database(&mut wtxn, Some("secrets")).expect("db");
        meta.put(&mut wtxn, "schema_version", &1u32.to_be_bytes()).expect("put");
        projects.put(&mut wtxn, &project.id, &project).expect("put");
        names.put(&mut wtxn, &project.name, &project.id).expect("put");
        let blob = ring.seal(b"legacy-value-777", &secret_associated_data(&project.id, "OLD_KEY")).expect("seal");
        secrets.put(&mut wtxn, &secret_key(&project.id, "OLD_KEY"), &blob).expect("put");
        wtxn.commit().expect("commit");
        env.prepare_for_closing().wait();
    }
    let h = Harness::start_in(dir, Arc::new(FakeRuntime::default()), Arc::new(FakePublisher::default()));
    let mut c = h.client();
    let (status, list) = c.call("GET", &format!("/api/projects/{}/secrets", project.id), "");
    assert_eq!((status, list), (200, json!([{"name": "OLD_KEY", "allowedHosts": []}])));
    let sid = new_sandbox(&h, &mut c, "legacy");
    let p = published(&h, &sid);
    assert_eq!(p.bindings.len(), 1);
    assert_eq!(p.bindings[0].2, "legacy-value-777");
    assert_eq!(p.bindings[0].3, strings(&["api.legacy.example"]));
    // And it can be given hosts now.
    let (status, _) = put_secret(
        &mut c,
        &project.id,
        "OLD_KEY",
        &json!({"value": "legacy-value-778", "allowedHosts": ["api.legacy.example"]}),
    );
    assert_eq!(status, 204);
}

#[test]
fn changes_reach_running_sandboxes_with_the_tokens_they_hold() {
    let h = Harness::start("secret-live");
    let mut c = h.client();
    let pid = new_project(&mut c, "live", &["api.anthropic.com", "*.example.com"]);
    put_secret(&mut c, &pid, "A", &json!({"value": "a-value-1"}));
    put_secret(&mut c, &pid, "B", &json!({"value": "b-value-1", "allowedHosts": ["api.b.example.com"]}));
    let other = new_project(&mut c, "other", &["api.other.example.com"]);
    put_secret(&mut c, &other, "A", &json!({"value": "other-value-1"}));
    let sid = new_sandbox(&h, &mut c, "live");
    let oid = new_sandbox(&h, &mut c, "other");
    let (ta, tb) = (token_of(&h, &sid, "A"), token_of(&h, &sid, "B"));
    let env_before = h.runtime.env_of(&sid);
    let allow = strings(&["api.anthropic.com", "*.example.com"]);
    let b_hosts = strings(&["api.b.example.com"]);
    let p = published(&h, &sid);
    assert_eq!(p.egress, allow);
    assert_eq!(
        p.bindings,
        vec![
            ("A".into(), ta.clone(), "a-value-1".into(), allow.clone()),
            ("B".into(), tb.clone(), "b-value-1".into(), b_hosts.clone())
        ]
    );

    // 1. A new value: the same token now stands for it, as soon as the PUT has answered.
    let (status, _) = put_secret(&mut c, &pid, "A", &json!({"value": "a-value-2"}));
    assert_eq!(status, 204);
    assert_eq!(published(&h, &sid).bindings[0], ("A".into(), ta.clone(), "a-value-2".into(), allow.clone()));

    // 2. A new project allowlist: published, and A (no hosts of its own) follows it; B does not.
    let (status, _) = c.call("PUT", &format!("/api/projects/{pid}"), r#"{"egressAllowlist":["api.anthropic.com"]}"#);
    assert_eq!(status, 200);
    let allow2 = strings(&["api.anthropic.com"]);
    let p = published(&h, &sid);
    assert_eq!(p.egress, allow2);
    assert_eq!(p.bindings[0], ("A".into(), ta.clone(), "a-value-2".into(), allow2.clone()));
    assert_eq!(p.bindings[1], ("B".into(), tb.clone(), "b-value-1".into(), b_hosts.clone()));

    // 3. Hosts of its own for A.
    let (status, _) = put_secret(&mut c, &pid, "A", &json!({"value": "a-value-3", "allowedHosts": ["x.example.com"]}));
    assert_eq!(status, 204);
    assert_eq!(
        published(&h, &sid).bindings[0],
        ("A".into(), ta.clone(), "a-value-3".into(), strings(&["x.example.com"]))
    );

    // 4. A secret added after the sandbox was created does not reach it.
    let (status, _) = put_secret(&mut c, &pid, "C", &json!({"value": "c-value-1"}));
    assert_eq!(status, 204);
    assert_eq!(published(&h, &sid).bindings.len(), 2);

    // 5. Deleting B removes its token; re-creating B does not bring that token back.
    let (status, _) = c.call("DELETE", &format!("/api/projects/{pid}/secrets/B"), "");
    assert_eq!(status, 204);
    let p = published(&h, &sid);
    assert_eq!(p.bindings.iter().map(|b| b.0.as_str()).collect::<Vec<_>>(), ["A"]);
    put_secret(&mut c, &pid, "B", &json!({"value": "b-value-2"}));
    assert_eq!(published(&h, &sid).bindings.len(), 1);
    let sid2 = new_sandbox(&h, &mut c, "live");
    assert_eq!(published(&h, &sid2).bindings.len(), 3, "a new sandbox gets A, B and C");

    // 6. Deleting the project: the sandboxes keep running and their allowlist, lose every token.
    let (status, _) = c.call("DELETE", &format!("/api/projects/{pid}"), "");
    assert_eq!(status, 204);
    for id in [&sid, &sid2] {
        let p = published(&h, id);
        assert_eq!(p.egress, allow2);
        assert!(p.bindings.is_empty());
        let (_, s) = c.call("GET", &format!("/api/sandboxes/{id}"), "");
        assert_eq!(s["status"], "running");
    }
    assert_eq!(h.runtime.env_of(&sid), env_before, "the sandbox's environment is never touched");

    // The other project's sandbox was never affected.
    let p = published(&h, &oid);
    assert_eq!(p.bindings.len(), 1);
    assert_eq!(p.bindings[0].2, "other-value-1");

    // A stopped sandbox is withdrawn and no longer re-published.
    let (status, _) = c.call("DELETE", &format!("/api/sandboxes/{oid}"), "");
    assert_eq!(status, 204);
    put_secret(&mut c, &other, "A", &json!({"value": "other-value-2"}));
    assert!(!h.publisher.published.lock().expect("lock").contains_key(&oid));
}

/// A create reads the secret names before booting and publishes after: a change committed in
/// between must be what the sandbox gets, not the value from before it.
#[test]
fn a_change_during_a_create_is_not_lost() {
    let h = Harness::start("secret-race");
    let mut c = h.client();
    let pid = new_project(&mut c, "race", &["api.example.com"]);
    put_secret(&mut c, &pid, "K", &json!({"value": "before-change"}));
    put_secret(&mut c, &pid, "GONE", &json!({"value": "deleted-during-boot"}));
    *h.runtime.boot_delay.lock().expect("lock") = Duration::from_millis(600);
    let addr = h.addr;
    let creator = std::thread::spawn(move || {
        let mut c = Client::new(addr, Some(common::ADMIN_KEY));
        c.call("POST", "/api/sandboxes", r#"{"project":"race"}"#)
    });
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) =
        put_secret(&mut c, &pid, "K", &json!({"value": "after-change", "allowedHosts": ["k.example.com"]}));
    assert_eq!(status, 204);
    let (status, _) = c.call("DELETE", &format!("/api/projects/{pid}/secrets/GONE"), "");
    assert_eq!(status, 204);
    let (status, s) = creator.join().expect("creator");
    assert_eq!(status, 201, "{s}");
    let sid = s["sandboxID"].as_str().expect("id");
    assert!(h.runtime.env_of(sid).iter().any(|(k, _)| k == "GONE"), "the token was minted before the delete");
    let p = published(&h, sid);
    assert_eq!(p.bindings.len(), 1, "the deleted secret is not bound");
    assert_eq!((p.bindings[0].2.as_str(), &p.bindings[0].3), ("after-change", &strings(&["k.example.com"])));
}

#[test]
fn a_sandbox_that_cannot_be_updated_is_withdrawn_and_the_caller_told() {
    let h = Harness::start("secret-fail");
    let mut c = h.client();
    let pid = new_project(&mut c, "fail", &["api.example.com"]);
    put_secret(&mut c, &pid, "K", &json!({"value": "first-value"}));
    let sid = new_sandbox(&h, &mut c, "fail");
    *h.publisher.fail_publish.lock().expect("lock") = true;
    let (status, v) = put_secret(&mut c, &pid, "K", &json!({"value": "second-value"}));
    assert_eq!(status, 500, "{v}");
    let msg = v["error"].as_str().expect("error");
    assert!(msg.contains("the change is stored") && msg.contains(&sid), "{msg}");
    assert!(!h.publisher.published.lock().expect("lock").contains_key(&sid), "fails closed: no old value stays");
    *h.publisher.fail_publish.lock().expect("lock") = false;
    let (status, _) = put_secret(&mut c, &pid, "K", &json!({"value": "third-value"}));
    assert_eq!(status, 204);
    assert_eq!(published(&h, &sid).bindings[0].2, "third-value", "the next change registers it again");
}

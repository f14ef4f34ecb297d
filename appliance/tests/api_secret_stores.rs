//! `/api/secret-stores` over real HTTP, with the request bodies and the fields today's
//! OpenComputer SDKs send and read: a store is a project seen through another API.

mod common;

use common::{Client, Harness};
use serde_json::{json, Value};

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

#[test]
fn a_store_is_a_project_through_another_api() {
    let h = Harness::start("stores-crud");
    let mut c = h.client();

    // SecretStore.create sends the allowlist only when it is not empty.
    let (status, store) =
        c.call("POST", "/api/secret-stores", r#"{"name":"agent-keys","egressAllowlist":["api.openai.com"]}"#);
    assert_eq!(status, 201, "{store}");
    let id = id_of(&store);
    assert_eq!(store["name"], "agent-keys");
    assert_eq!(store["egressAllowlist"], json!(["api.openai.com"]));
    assert!(store["createdAt"].as_str().is_some_and(|t| t.ends_with('Z')), "{store}");
    // The same record, as a project with the appliance's defaults.
    let (status, project) = c.call("GET", &format!("/api/projects/{id}"), "");
    assert_eq!((status, &project["name"], &project["template"]), (200, &json!("agent-keys"), &json!("base")));

    let (status, err) = c.call("POST", "/api/secret-stores", r#"{"name":"agent-keys"}"#);
    assert_eq!(status, 409, "{err}");
    let (status, err) = c.call("POST", "/api/secret-stores", r#"{"egressAllowlist":["x.example"]}"#);
    assert_eq!((status, err["error"].as_str()), (400, Some("name is required")));
    let (status, err) = c.call("POST", "/api/secret-stores", r#"{"name":"bad","egressAllowlist":["not a host"]}"#);
    assert_eq!(status, 400, "{err}");

    let (status, list) = c.call("GET", "/api/secret-stores", "");
    assert_eq!(status, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["id"], json!(id));

    // set_secret: {value, allowedHosts?}; the body of the answer names the secret, never its value.
    let path = format!("/api/secret-stores/{id}/secrets/OPENAI_API_KEY");
    let (status, set) = c.call("PUT", &path, r#"{"value":"sk-store-0123456789"}"#);
    assert_eq!(status, 200, "{set}");
    assert_eq!(set, json!({"name": "OPENAI_API_KEY", "status": "set"}));
    let (status, _) = c.call(
        "PUT",
        &format!("/api/secret-stores/{id}/secrets/HOSTED"),
        r#"{"value":"v2","allowedHosts":["api.anthropic.com"]}"#,
    );
    assert_eq!(status, 200);
    let (status, entries) = c.call("GET", &format!("/api/secret-stores/{id}/secrets"), "");
    assert_eq!(status, 200);
    assert_eq!(
        entries,
        json!([
            {"name": "HOSTED", "storeId": id, "allowedHosts": ["api.anthropic.com"]},
            {"name": "OPENAI_API_KEY", "storeId": id, "allowedHosts": []},
        ])
    );
    // The project's own secret list sees the same secrets.
    let (_, project_secrets) = c.call("GET", &format!("/api/projects/{id}/secrets"), "");
    assert_eq!(project_secrets.as_array().map(Vec::len), Some(2));

    // A sandbox created with secretStore (by name) gets a sealed token for the store's secret.
    let (status, sandbox) = c.call("POST", "/api/sandboxes", r#"{"secretStore":"agent-keys"}"#);
    assert_eq!(status, 201, "{sandbox}");
    let sid = sandbox["sandboxID"].as_str().expect("id").to_string();
    let env = h.runtime.env_of(&sid);
    let token = env.iter().find(|(k, _)| k == "OPENAI_API_KEY").map(|(_, v)| v.clone()).expect("env var");
    assert!(appliance::seal::is_token(&token), "{token}");
    let (status, err) = c.call("POST", "/api/sandboxes", r#"{"secretStore":"no-such-store"}"#);
    assert_eq!(status, 404, "{err}");

    // update: a new name; `[]` clears the allowlist (an absent one keeps it).
    let (status, renamed) = c.call("PUT", &format!("/api/secret-stores/{id}"), r#"{"name":"renamed"}"#);
    assert_eq!(status, 200, "{renamed}");
    assert_eq!((&renamed["name"], &renamed["egressAllowlist"]), (&json!("renamed"), &json!(["api.openai.com"])));
    let (status, cleared) = c.call("PUT", &format!("/api/secret-stores/{id}"), r#"{"egressAllowlist":[]}"#);
    assert_eq!((status, &cleared["egressAllowlist"]), (200, &json!([])));
    // The running sandbox's bindings follow the store's allowlist at once.
    {
        let published = h.publisher.published.lock().expect("lock");
        assert!(published.get(&sid).expect("published").egress_allowlist.is_empty());
    }

    // delete_secret tolerates 404; the route answers it.
    assert_eq!(c.call("DELETE", &format!("/api/secret-stores/{id}/secrets/HOSTED"), "").0, 204);
    assert_eq!(c.call("DELETE", &format!("/api/secret-stores/{id}/secrets/HOSTED"), "").0, 404);

    // Unknown stores are 404 in this API's words.
    let missing = "00000000-0000-4000-8000-000000000000";
    let (status, err) = c.call("GET", &format!("/api/secret-stores/{missing}"), "");
    assert_eq!((status, err["error"].as_str()), (404, Some(format!("secret store {missing} not found").as_str())));
    assert_eq!(c.call("PUT", &format!("/api/secret-stores/{missing}/secrets/X"), r#"{"value":"v"}"#).0, 404);

    // Deleting the sandbox with deleteSecretStore=true takes the store with it.
    let (status, err) = c.call("DELETE", &format!("/api/sandboxes/{sid}?deleteSecretStore=maybe"), "");
    assert_eq!(status, 400, "{err}");
    assert_eq!(c.call("DELETE", &format!("/api/sandboxes/{sid}?deleteSecretStore=true"), "").0, 204);
    assert_eq!(c.call("GET", &format!("/api/secret-stores/{id}"), "").0, 404);
    let (_, list) = c.call("GET", "/api/secret-stores", "");
    assert_eq!(list, json!([]));
    assert!(!String::from_utf8_lossy(&c.transcript).contains("sk-store-0123456789"), "a value came back");
}

#[test]
fn deleting_a_store_deletes_its_secrets_and_a_project_key_sees_only_its_own() {
    let h = Harness::start("stores-scope");
    let mut op = h.client();
    let (_, mine) = op.call("POST", "/api/secret-stores", r#"{"name":"mine"}"#);
    let (_, theirs) = op.call("POST", "/api/secret-stores", r#"{"name":"theirs"}"#);
    let (mine, theirs) = (id_of(&mine), id_of(&theirs));
    let (status, key) = op.call("POST", "/api/keys", r#"{"name":"agent","projects":["mine"]}"#);
    assert_eq!(status, 201, "{key}");
    let mut pk = Client::new(h.addr, key["key"].as_str());
    let (_, seen) = pk.call("GET", "/api/secret-stores", "");
    assert_eq!(seen.as_array().map(|l| l.iter().map(id_of).collect::<Vec<_>>()), Some(vec![mine.clone()]));
    assert_eq!(pk.call("PUT", &format!("/api/secret-stores/{mine}/secrets/K"), r#"{"value":"v"}"#).0, 200);
    assert_eq!(pk.call("GET", &format!("/api/secret-stores/{theirs}/secrets"), "").0, 403);
    assert_eq!(pk.call("DELETE", &format!("/api/secret-stores/{mine}"), "").0, 403);

    assert_eq!(op.call("DELETE", &format!("/api/secret-stores/{mine}"), "").0, 204);
    assert_eq!(op.call("DELETE", &format!("/api/secret-stores/{mine}"), "").0, 404);
    // A store made again under the same name starts empty.
    let (_, again) = op.call("POST", "/api/secret-stores", r#"{"name":"mine"}"#);
    let (_, entries) = op.call("GET", &format!("/api/secret-stores/{}/secrets", id_of(&again)), "");
    assert_eq!(entries, json!([]));
}

//! Secret values end up in HTTP request heads (the sealing proxy substitutes them
//! there), so values that could break or add header lines are refused at the API.

mod common;

use common::Harness;
use serde_json::json;

#[test]
fn secret_values_with_cr_lf_or_nul_are_refused_and_nothing_is_stored() {
    let h = Harness::start("secret-values");
    let mut c = h.client();
    let (status, p) = c.call(
        "POST",
        "/api/projects",
        r#"{"name":"inject","template":"python","egressAllowlist":["api.openai.com"]}"#,
    );
    assert_eq!(status, 201, "{p}");
    let id = p["id"].as_str().expect("id").to_string();
    let base = format!("/api/projects/{id}/secrets");
    let cases = [("\r", "carriage return"), ("\n", "line feed"), ("\r\n", "carriage return"), ("\0", "NUL")];

    // New names: refused, nothing stored.
    for (i, (bad, named)) in cases.iter().enumerate() {
        let value = format!("sk-inject-{i}{bad}X-Evil: 1");
        let (status, body) = c.call("PUT", &format!("{base}/NEW_{i}"), &json!({ "value": value }).to_string());
        assert_eq!(status, 400, "{bad:?}: {body}");
        let error = body["error"].as_str().expect("error message");
        assert!(error.contains(named), "{error}");
        assert!(!error.contains("sk-inject"), "the value is echoed: {error}");
    }
    let (status, names) = c.call("GET", &base, "");
    assert_eq!((status, names), (200, json!([])));

    // An update with a bad value leaves the old value in place.
    let (status, _) = c.call("PUT", &format!("{base}/OPENAI_API_KEY"), r#"{"value":"sk-good-value-1"}"#);
    assert_eq!(status, 204);
    for (bad, _) in &cases {
        let value = format!("sk-good-value-1{bad}X-Evil: 1");
        let (status, body) = c.call("PUT", &format!("{base}/OPENAI_API_KEY"), &json!({ "value": value }).to_string());
        assert_eq!(status, 400, "{body}");
    }
    let (_, names) = c.call("GET", &base, "");
    assert_eq!(common::secret_names(&names), ["OPENAI_API_KEY"]);
    // The value a new sandbox's token stands for is still the old one.
    let (status, s) = c.call("POST", "/api/sandboxes", r#"{"project":"inject"}"#);
    assert_eq!(status, 201, "{s}");
    let sandbox = s["sandboxID"].as_str().expect("id").to_string();
    {
        let published = h.publisher.published.lock().expect("lock");
        let seal = published.get(&sandbox).expect("published");
        assert_eq!(seal.bindings.len(), 1);
        assert_eq!(seal.bindings[0].value.as_slice(), b"sk-good-value-1");
    }
    let text = String::from_utf8_lossy(&c.transcript).to_string();
    assert!(!text.contains("sk-inject") && !text.contains("sk-good-value"));
}

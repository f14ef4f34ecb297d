//! The sealing proxy end to end: a sandbox holding only a sealed token makes HTTPS requests with
//! curl; the test upstream receives the real secret (in a header and in a JSON body), never the
//! token; hosts outside the project's allowlist get 403; and there is no way out but the proxy.

use crate::api::Api;
use crate::harness::{Appliance, Scenario};
use image::err;
use image::error::Result;
use serde_json::{json, Value};

pub const SCENARIOS: &[Scenario] =
    &[Scenario { name: "outbound HTTPS from a sandbox carries the real secret, only through the proxy", run: sealed_requests }];

const SECRET: &str = "sk-ant-sealing-e2e-6a1f0c9b2d";

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(err!("{}", what()))
    }
}

fn header<'a>(record: &'a Value, name: &str) -> Option<&'a str> {
    record["headers"].as_array()?.iter().find(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))?[1].as_str()
}

fn sealed_requests(appliance: &mut Appliance) -> Result<()> {
    let api = Api::new(appliance.machine.api_port, &appliance.api_key);
    let project = api.expect(201, "POST", "/projects", &json!({"name": "sealing", "egressAllowlist": ["api.anthropic.com"]}))?;
    let pid = project["id"].as_str().ok_or_else(|| err!("no id"))?.to_string();
    api.expect(204, "PUT", &format!("/projects/{pid}/secrets/ANTHROPIC_API_KEY"), &json!({"value": SECRET}))?;
    let sid = api.create_sandbox(&json!({"project": "sealing", "timeout": 600}))?;
    let (_, token, _) = api.run(&sid, "printf %s \"$ANTHROPIC_API_KEY\"", 30)?;
    check(token.starts_with("osb_sealed_"), || format!("the sandbox holds {token:?}"))?;
    let before = appliance.upstream.received()?.len();

    // The documented request: the key in a header.
    let header_call = "curl -sS -o /dev/null -w '%{http_code}' https://api.anthropic.com/v1/messages \
        -H \"x-api-key: $ANTHROPIC_API_KEY\" -H 'content-type: application/json' -d '{\"model\":\"m\"}'";
    let (code, out, err) = api.run(&sid, header_call, 60)?;
    check(code == 0 && out == "200", || format!("curl with the key in a header: exit {code}, {out:?}, {err:?}"))?;
    // The key in a JSON body.
    let body_call = "curl -sS -o /dev/null -w '%{http_code}' https://api.anthropic.com/v1/complete \
        -H 'content-type: application/json' -d \"{\\\"api_key\\\": \\\"$ANTHROPIC_API_KEY\\\", \\\"n\\\": 1}\"";
    let (code, out, err) = api.run(&sid, body_call, 60)?;
    check(code == 0 && out == "200", || format!("curl with the key in the body: exit {code}, {out:?}, {err:?}"))?;

    let received = appliance.upstream.received()?;
    let new = &received[before..];
    check(new.len() == 2, || format!("the upstream received {} requests: {new:?}", new.len()))?;
    check(header(&new[0], "x-api-key") == Some(SECRET), || format!("header request arrived as {}", new[0]))?;
    let body: Value = serde_json::from_str(new[1]["body"].as_str().unwrap_or("")).unwrap_or(Value::Null);
    check(body["api_key"] == SECRET, || format!("body request arrived as {}", new[1]))?;
    let all = serde_json::to_string(&received).unwrap_or_default();
    let token_hits = all.matches("osb_sealed_").count();
    check(token_hits == 0, || format!("the upstream saw {token_hits} sealed token(s)"))?;

    // A host outside the allowlist: the proxy answers 403 naming it.
    // (For HTTPS the refusal is the answer to CONNECT: curl reports it as http_connect.)
    let (code, out, err) = api.run(&sid, "curl -sS -o /dev/null -w '%{http_connect}' https://blocked.example.com/", 60)?;
    check(code != 0 && out == "403", || format!("blocked host: exit {code}, {out:?}, {err:?}"))?;
    // No way around the proxy: no proxy settings, or a raw TCP connection, go nowhere.
    let (code, _, _) = api.run(&sid, "curl -sS --noproxy '*' --max-time 10 https://api.anthropic.com/", 30)?;
    check(code != 0, || "curl --noproxy reached something".into())?;
    let (code, _, _) = api.run(&sid, "timeout 10 bash -c 'echo > /dev/tcp/10.0.2.2/443'", 30)?;
    check(code != 0, || "a raw TCP connect to 10.0.2.2:443 succeeded".into())?;
    check(appliance.upstream.received()?.len() == received.len(), || "the upstream got a request past the proxy".into())?;

    api.expect(204, "DELETE", &format!("/sandboxes/{sid}"), &Value::Null)?;
    api.expect(204, "DELETE", &format!("/projects/{pid}"), &Value::Null)?;
    let console = appliance.machine.console();
    check(!console.contains(SECRET), || "the plaintext secret appears in the console log".into())
}

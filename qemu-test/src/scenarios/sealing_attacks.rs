//! The sealing promise against a hostile sandbox (issue 13). A sandbox that makes the upstream
//! echo its request back (as real APIs' error pages do) gets only its own token back, in every
//! place and encoding the echo quotes it; a request fronted with another Host than the tunnel's
//! gets 421 and goes nowhere; a secret deleted while the sandbox runs is no longer substituted
//! on the very next request; and the sandbox's memory never holds the value (searched after
//! power-off with the other dumps, sealing.rs).

use crate::check::check;
use crate::harness::Appliance;
use crate::upstream::header;
use image::err;
use image::error::Result;
use serde_json::{json, Value};
use std::time::Instant;

/// `/` and `+` make the percent-encoded form differ from the raw one, so the echo's
/// percent-encoded quote tests that form of the scrubbing too.
pub const ECHO_SECRET: &str = "sk-ant-echo/e2e+7c41d9a0b3f2";
const PROJECT: &str = "sealing-echo";

/// The response forms the echo upstream is asked for (its query switches), each sent with the
/// token in a header, the query and a JSON body. `identity` is no switch (ignored upstream).
const FORMS: &[&str] = &["identity", "encoding=gzip", "chunked=1", "chunked=1&encoding=gzip"];

/// One shell line for all forms (each `api.run` costs seconds in the nested VM): per form, a
/// `=== <form>` line, then what curl printed (`-i`: head and body; `--compressed` accepts gzip),
/// then `=== status <code>`. The responses are also written to a file in the sandbox, so its
/// disk and page cache hold them for the search after power-off.
fn echo_calls() -> String {
    let forms = FORMS.iter().map(|f| format!("'{f}'")).collect::<Vec<_>>().join(" ");
    format!(
        r#"k="$ANTHROPIC_API_KEY"; for q in {forms}; do echo "=== $q"; curl -sS -i --compressed "https://api.anthropic.com/echo?$q&key=$k" -H "x-api-key: $k" -H 'content-type: application/json' -d "{{\"api_key\": \"$k\"}}" -w '\n=== status %{{http_code}}\n'; done | tee /root/echo-responses.txt; sync"#
    )
}

pub fn echoing_upstream(appliance: &mut Appliance) -> Result<()> {
    let started = Instant::now();
    let api = appliance.api();
    let project =
        api.expect(201, "POST", "/projects", &json!({"name": PROJECT, "egressAllowlist": ["api.anthropic.com"]}))?;
    let pid = project["id"].as_str().ok_or_else(|| err!("no id in {project}"))?.to_string();
    api.expect(204, "PUT", &format!("/projects/{pid}/secrets/ANTHROPIC_API_KEY"), &json!({"value": ECHO_SECRET}))?;
    let sid = api.create_sandbox(&json!({"project": PROJECT, "timeout": 600}))?;
    let (_, token, _) = api.run(&sid, "printf %s \"$ANTHROPIC_API_KEY\"", 30)?;
    check(token.starts_with("osb_sealed_"), || format!("the sandbox holds {token:?}"))?;
    let created = started.elapsed();

    let upstream =
        appliance.upstream.as_mut().ok_or_else(|| err!("this appliance was booted without the test upstream"))?;
    let before = upstream.received()?.len();
    let (code, out, err_out) = api.run(&sid, &echo_calls(), 120)?;
    check(code == 0, || format!("the echo calls: exit {code}, {err_out:?}, {out:?}"))?;
    // Substitution still works: the upstream got the value everywhere the sandbox put its token.
    let received = upstream.received()?;
    let new = &received[before.min(received.len())..];
    check(new.len() == FORMS.len(), || format!("the upstream received {} echo requests: {new:?}", new.len()))?;
    for (form, record) in FORMS.iter().zip(new) {
        let body: Value = serde_json::from_str(record["body"].as_str().unwrap_or("")).unwrap_or(Value::Null);
        let path = record["path"].as_str().unwrap_or("");
        check(
            header(record, "x-api-key") == Some(ECHO_SECRET)
                && path.ends_with(&format!("key={ECHO_SECRET}"))
                && body["api_key"] == ECHO_SECRET
                && !record.to_string().contains("osb_sealed_"),
            || format!("{form}: the request arrived as {record}"),
        )?;
    }
    // What the sandbox saw: the token wherever the echo quoted the value, the value nowhere.
    check_no_value(&out, "the echo responses")?;
    for form in FORMS {
        let section = section(&out, form)?;
        check_echo(form, section, &token)?;
    }
    let echoed = started.elapsed();

    // Fronting: the tunnel is for api.anthropic.com; a Host header naming another host is
    // refused by the proxy (421) and nothing reaches any upstream.
    let before = upstream.received()?.len();
    let fronted = r#"curl -sS -i -H 'Host: evil.example.com' -H "x-api-key: $ANTHROPIC_API_KEY" "https://api.anthropic.com/echo?fronted" -w '\n=== status %{http_code}\n'"#;
    let (code, out, err_out) = api.run(&sid, fronted, 60)?;
    check(code == 0 && out.trim_end().ends_with("=== status 421"), || {
        format!("fronted request: exit {code}, {out:?}, {err_out:?}")
    })?;
    check_no_value(&out, "the 421 answer")?;
    let after = upstream.received()?.len();
    check(after == before, || format!("the fronted request reached the upstream ({} new record(s))", after - before))?;

    // Deleting the secret while the sandbox runs: the next request (sent as soon as the DELETE
    // answered) carries the bare token; the sandbox keeps running.
    api.expect(204, "DELETE", &format!("/projects/{pid}/secrets/ANTHROPIC_API_KEY"), &Value::Null)?;
    let deleted = Instant::now();
    let after_delete = r#"curl -sS -i "https://api.anthropic.com/echo?deleted" -H "x-api-key: $ANTHROPIC_API_KEY" -w '\n=== status %{http_code}\n'"#;
    let (code, out, err_out) = api.run(&sid, after_delete, 60)?;
    let sent_within = deleted.elapsed();
    check(code == 0 && out.trim_end().ends_with("=== status 200"), || {
        format!("request after the deletion: exit {code}, {out:?}, {err_out:?}")
    })?;
    check_no_value(&out, "the answer after the deletion")?;
    upstream
        .expect_revoked_token(after, &token, ECHO_SECRET)
        .map_err(|e| err!("after DELETE of the secret (request done {:.1}s later): {e}", sent_within.as_secs_f64()))?;

    // The responses went through the sandbox's memory: its dump is searched after power-off.
    super::sealing::dump_memory_for_search(&api, &sid, "the echo sandbox", &token, ECHO_SECRET)?;
    api.expect(204, "DELETE", &format!("/projects/{pid}"), &Value::Null)?;
    let console = appliance.machine.console();
    check(!console.contains(ECHO_SECRET), || "the echo secret appears in the console log".into())?;
    // Egress is visible: the proxy's records reach the console (tokens redacted) and /metrics.
    check(console.contains("proxy: egress: sandbox ") && console.contains(": misdirected (421 "), || {
        "no proxy egress record (forwarded tunnel and the 421) on the console".into()
    })?;
    check(!console.contains(&token), || "a sealed token appears in the console log".into())?;
    let metrics = api.metrics()?;
    for decision in ["forwarded", "misdirected"] {
        let count =
            crate::api::metric(&metrics, &format!("appliance_egress_decisions_total{{decision=\"{decision}\"}}"));
        check(count.is_some_and(|n| n >= 1.0), || format!("/metrics counts no {decision} egress: {count:?}"))?;
    }
    let scrubbed = crate::api::metric(&metrics, "appliance_egress_values_scrubbed_total");
    check(scrubbed.is_some_and(|n| n >= 4.0), || format!("/metrics counts {scrubbed:?} scrubbed values"))?;
    eprintln!(
        "[qemu-test]   echo scenario: sandbox ready {:.1}s, {} echo forms {:.1}s, request after DELETE done in {:.1}s, {:.1}s in all",
        created.as_secs_f64(),
        FORMS.len(),
        echoed.saturating_sub(created).as_secs_f64(),
        sent_within.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The value in any form the scrubber knows (raw, percent-encoded, JSON-escaped) is absent.
fn check_no_value(out: &str, what: &str) -> Result<()> {
    let percent = ECHO_SECRET.replace('/', "%2F").replace('+', "%2B");
    let forms = [ECHO_SECRET.to_string(), percent.clone(), percent.to_lowercase(), ECHO_SECRET.replace('/', "\\/")];
    for form in forms {
        check(!out.contains(&form), || format!("{what} hold the secret as {form:?}: {out}"))?;
    }
    Ok(())
}

/// The part of the batched output for one form: after `=== <form>`, up to its status line.
fn section<'a>(out: &'a str, form: &str) -> Result<&'a str> {
    let start = out.find(&format!("=== {form}\n")).ok_or_else(|| err!("no output for {form}: {out}"))?;
    let rest = &out[start..];
    let end = rest.find("\n=== status ").ok_or_else(|| err!("no status for {form}: {rest}"))?;
    let status = rest[end + "\n=== status ".len()..].get(..3);
    check(status == Some("200"), || format!("{form} answered {status:?}: {}", &rest[..end]))?;
    Ok(&rest[..end])
}

/// One echo response as curl printed it: the status line and the X-Echo-Key header quote the
/// token, and the JSON body quotes it in the path, the x-api-key header, the request body and
/// percent-encoded: everywhere the upstream put the value it received.
fn check_echo(form: &str, section: &str, token: &str) -> Result<()> {
    // With a proxy, curl -i also prints the CONNECT answer: the upstream's head is the last one.
    let status_at = section.rfind("HTTP/1.1 ").ok_or_else(|| err!("{form}: no status line in {section}"))?;
    let response = &section[status_at..];
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| err!("{form}: no end of head in {response}"))?;
    let status_line = head.lines().next().unwrap_or("");
    check(status_line.trim_end() == format!("HTTP/1.1 200 Echoed {token}"), || {
        format!("{form}: status line {status_line:?}")
    })?;
    let echo_key = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("x-echo-key").then(|| value.trim())
    });
    check(echo_key == Some(token), || format!("{form}: X-Echo-Key is {echo_key:?} in {head}"))?;
    let echo: Value = serde_json::from_str(body).map_err(|e| err!("{form}: the body is not JSON ({e}): {body}"))?;
    let request = &echo["error"]["request"];
    let sent: Value = serde_json::from_str(request["body"].as_str().unwrap_or("")).unwrap_or(Value::Null);
    check(
        request["path"].as_str().is_some_and(|p| p.ends_with(&format!("key={token}")))
            && header(request, "x-api-key") == Some(token)
            && sent["api_key"] == token
            && request["key_percent_encoded"] == token,
        || format!("{form}: the echo quotes {request}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "osb_sealed_0123456789abcdef0123456789abcdef";

    /// What curl -i prints through the proxy for one echo, quoting `key` everywhere.
    fn printed(key: &str) -> String {
        let percent = key.replace('/', "%2F").replace('+', "%2B");
        let body = json!({"error": {"type": "echo", "request": {
            "method": "POST",
            "path": format!("/echo?chunked=1&key={key}"),
            "headers": [["Host", "api.anthropic.com"], ["x-api-key", key]],
            "body": format!("{{\"api_key\": \"{key}\"}}"),
            "key_percent_encoded": percent,
        }}});
        format!(
            "=== chunked=1\nHTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 Echoed {key}\r\nx-echo-key: {key}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{body}\n=== status 200\n"
        )
    }

    #[test]
    fn a_scrubbed_echo_passes() {
        let out = printed(TOKEN);
        assert!(check_no_value(&out, "echo").is_ok());
        let part = section(&out, "chunked=1").unwrap();
        assert!(check_echo("chunked=1", part, TOKEN).is_ok());
    }

    #[test]
    fn an_echo_holding_the_value_fails() {
        let out = printed(ECHO_SECRET);
        assert!(check_no_value(&out, "echo").is_err());
        let part = section(&out, "chunked=1").unwrap();
        assert!(check_echo("chunked=1", part, TOKEN).is_err());
        // Only the percent-encoded quote left unscrubbed is caught too.
        let percent = ECHO_SECRET.replace('/', "%2F").replace('+', "%2B");
        let out = printed(TOKEN).replace(
            &format!("\"key_percent_encoded\":\"{TOKEN}\""),
            &format!("\"key_percent_encoded\":\"{percent}\""),
        );
        assert!(out.contains(&percent));
        assert!(check_no_value(&out, "echo").is_err());
        assert!(check_echo("chunked=1", section(&out, "chunked=1").unwrap(), TOKEN).is_err());
    }

    #[test]
    fn a_missing_or_failed_form_fails() {
        assert!(section(&printed(TOKEN), "encoding=gzip").is_err());
        assert!(section(&printed(TOKEN).replace("=== status 200", "=== status 502"), "chunked=1").is_err());
    }
}

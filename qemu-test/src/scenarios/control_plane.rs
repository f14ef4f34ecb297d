//! The documented control-plane flow through the real API on the booted appliance: projects
//! with defaults and secrets, sandboxes that inherit them and see only sealed tokens, request
//! fields that override, deletes that leave running sandboxes alone, and data that survives a
//! reboot. No plaintext secret may appear in any API answer or in the console.

use crate::check::check;
use crate::harness::{Appliance, Scenario};
use image::err;
use image::error::Result;
use serde_json::{json, Value};
use std::time::Duration;

pub const SCENARIOS: &[Scenario] = &[
    Scenario { name: "project defaults and sealed secrets reach a sandbox through the API", run: documented_flow },
    Scenario { name: "a project and its secrets are stored before a reboot", run: store_for_reboot },
    Scenario {
        name: "the master key is sealed to the TPM and rotates through the API; the secrets still open",
        run: rotate_master_key,
    },
];

/// Runs after the appliance rebooted (see foundation::FINAL_SCENARIOS).
pub const AFTER_REBOOT: &[Scenario] =
    &[Scenario { name: "the project and its secret names survived the reboot", run: check_after_reboot }];

pub const SECRET_VALUE: &str = "sk-ant-e2e-plaintext-3f9c1b7a5d";
pub const PERSISTED_VALUE: &str = "persisted-plaintext-8e21c4";

/// Every answer is searched for the plaintexts.
fn no_plaintext(answer: &Value) -> Result<()> {
    let text = answer.to_string();
    check(!text.contains(SECRET_VALUE) && !text.contains(PERSISTED_VALUE), || {
        format!("an API answer carries a plaintext secret: {text}")
    })
}

fn documented_flow(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let project = api.expect(
        201,
        "POST",
        "/projects",
        &json!({"name": "my-agent", "cpuCount": 1, "memoryMB": 384, "timeoutSec": 900, "egressAllowlist": ["api.anthropic.com"]}),
    )?;
    let pid = project["id"].as_str().ok_or_else(|| err!("no id in {project}"))?.to_string();
    let (status, dup) = api.call("POST", "/projects", &json!({"name": "my-agent"}))?;
    check(status == 409, || format!("duplicate project name: {status} {dup}"))?;
    api.expect(204, "PUT", &format!("/projects/{pid}/secrets/ANTHROPIC_API_KEY"), &json!({"value": SECRET_VALUE}))?;
    api.expect(204, "PUT", &format!("/projects/{pid}/secrets/OTHER"), &json!({"value": "other-plaintext-value"}))?;
    let list = api.expect(200, "GET", &format!("/projects/{pid}/secrets"), &Value::Null)?;
    no_plaintext(&list)?;
    let names = api.secret_names(&pid)?;
    check(names == ["ANTHROPIC_API_KEY", "OTHER"], || format!("secret names: {names:?}"))?;

    // Inherits the project's memory and timeout, overrides nothing.
    let sandbox = api.expect(201, "POST", "/sandboxes", &json!({"project": "my-agent"}))?;
    no_plaintext(&sandbox)?;
    let sid = sandbox["sandboxID"].as_str().ok_or_else(|| err!("no sandboxID"))?.to_string();
    check(sandbox["memoryMB"] == 384 && sandbox["cpuCount"] == 1, || {
        format!("project defaults not applied: {sandbox}")
    })?;
    let (code, out, _) = api.run(&sid, "echo $ANTHROPIC_API_KEY; grep MemTotal /proc/meminfo", 30)?;
    let lines: Vec<&str> = out.lines().collect();
    let token = lines.first().copied().unwrap_or_default();
    check(code == 0 && token.starts_with("osb_sealed_") && token.len() == 43, || format!("the sandbox sees {out:?}"))?;
    let mem_kib: u64 = lines.get(1).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0);
    check(mem_kib > 300 * 1024 && mem_kib <= 384 * 1024, || {
        format!("MemTotal {mem_kib} KiB for a 384 MiB project default")
    })?;

    project_key_stays_in_its_project(appliance, &pid, &sid)?;

    // Request-level fields override the project's. Two vCPUs where the appliance has them; on a
    // one-vCPU appliance (the TCG harness) asking for two is refused, and memory still overrides.
    let vcpus = api.expect(200, "GET", "/system", &Value::Null)?["capacity"]["vcpus"]["total"].as_u64().unwrap_or(0);
    let cpus = if vcpus >= 2 {
        2
    } else {
        let (status, refused) = api.call("POST", "/sandboxes", &json!({"project": "my-agent", "cpuCount": 2}))?;
        check(status == 400 && refused.to_string().contains("cpuCount must be at most 1"), || {
            format!("cpuCount 2 on a 1-vCPU appliance: {status} {refused}")
        })?;
        1
    };
    // A root disk smaller than the template's cannot be made.
    let (status, refused) = api.call("POST", "/sandboxes", &json!({"project": "my-agent", "diskMB": 1024}))?;
    check(status == 400 && refused.to_string().contains("smaller than the template's disk"), || {
        format!("diskMB 1024: {status} {refused}")
    })?;
    let over = api.expect(
        201,
        "POST",
        "/sandboxes",
        &json!({"project": "my-agent", "timeout": 120, "cpuCount": cpus, "memoryMB": 512, "diskMB": 3072, "envs": {"ANTHROPIC_API_KEY": "from-request", "EXTRA": "x1"}}),
    )?;
    let oid = over["sandboxID"].as_str().ok_or_else(|| err!("no sandboxID"))?.to_string();
    check(over["diskMB"] == 3072, || format!("diskMB not recorded: {over}"))?;
    let (code, out, _) = api.run(
        &oid,
        "nproc; grep MemTotal /proc/meminfo; echo $ANTHROPIC_API_KEY $EXTRA; echo ${OTHER%%_*}; df -Pm / | awk 'NR==2{print $2}'",
        30,
    )?;
    // The guest grew its filesystem to the 3072 MiB disk (ext4 keeps a little for itself).
    let root_mb: u64 = out.lines().nth(4).and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    check((2800..=3072).contains(&root_mb), || {
        format!("root filesystem of {root_mb} MiB on a 3072 MiB disk: {out:?}")
    })?;
    let out = out.lines().take(4).collect::<Vec<_>>().join("\n");
    let mem_kib: u64 =
        out.lines().nth(1).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0);
    check(mem_kib > 400 * 1024 && mem_kib <= 512 * 1024, || format!("MemTotal {mem_kib} KiB for memoryMB 512"))?;
    let without_mem: Vec<&str> = out.lines().enumerate().filter(|(i, _)| *i != 1).map(|(_, l)| l).collect();
    check(code == 0 && without_mem.join("\n") == format!("{cpus}\nfrom-request x1\nosb"), || {
        format!("request overrides inside the sandbox: {out:?}")
    })?;
    let (start, end) = (over["startedAt"].as_str().unwrap_or(""), over["endAt"].as_str().unwrap_or(""));
    check(seconds_between(start, end) == Some(120), || format!("timeout 120 gave startedAt {start}, endAt {end}"))?;
    api.expect(204, "DELETE", &format!("/sandboxes/{oid}"), &Value::Null)?;

    // Deleting a secret, then the project: the running sandbox keeps its token and keeps working.
    api.expect(204, "DELETE", &format!("/projects/{pid}/secrets/OTHER"), &Value::Null)?;
    let names = api.secret_names(&pid)?;
    check(names == ["ANTHROPIC_API_KEY"], || format!("after deleting OTHER: {names:?}"))?;
    api.expect(204, "DELETE", &format!("/projects/{pid}"), &Value::Null)?;
    let (status, _) = api.call("GET", &format!("/projects/{pid}"), &Value::Null)?;
    check(status == 404, || format!("deleted project answered {status}"))?;
    let (status, gone) = api.call("POST", "/sandboxes", &json!({"project": "my-agent"}))?;
    check(status == 404 && gone.to_string().contains("my-agent"), || {
        format!("sandbox for a deleted project: {status} {gone}")
    })?;
    let (code, out, _) = api.run(&sid, "echo $ANTHROPIC_API_KEY", 30)?;
    check(code == 0 && out.trim() == token, || format!("after the project was deleted the sandbox printed {out:?}"))?;
    api.expect(204, "DELETE", &format!("/sandboxes/{sid}"), &Value::Null)?;

    let console = appliance.machine.console();
    check(!console.contains(SECRET_VALUE), || "the plaintext secret appears in the console log".into())
}

/// A key made for project `pid` (holding sandbox `sid`) uses that sandbox, and cannot widen the
/// project's allowlist, read another project or create sandboxes outside its project; revoked,
/// it stops working at once.
fn project_key_stays_in_its_project(appliance: &Appliance, pid: &str, sid: &str) -> Result<()> {
    let api = appliance.api();
    let other = api.expect(201, "POST", "/projects", &json!({"name": "someone-else"}))?;
    let other_id = other["id"].as_str().ok_or_else(|| err!("no id in {other}"))?.to_string();
    let made = api.expect(201, "POST", "/keys", &json!({"name": "agent", "projects": ["my-agent"]}))?;
    let key = made["key"].as_str().ok_or_else(|| err!("no key in {made}"))?;
    let key_id = made["id"].as_str().ok_or_else(|| err!("no id in {made}"))?.to_string();
    let scoped = crate::api::Api::new(appliance.machine.api(), key);
    let (code, out, _) = scoped.run(sid, "echo scoped-ok", 30)?;
    check(code == 0 && out.trim() == "scoped-ok", || format!("the project key's command printed {out:?}"))?;
    for (method, path, body) in [
        ("PUT", format!("/projects/{pid}"), json!({"egressAllowlist": ["evil.example"]})),
        ("GET", format!("/projects/{other_id}"), Value::Null),
        ("POST", "/sandboxes".to_string(), json!({"project": "someone-else"})),
        ("GET", "/system".to_string(), Value::Null),
    ] {
        let (status, answer) = scoped.call(method, &path, &body)?;
        check(status == 403 && answer.to_string().contains("scope"), || {
            format!("project key: {method} {path}: {status} {answer}")
        })?;
    }
    let project = api.expect(200, "GET", &format!("/projects/{pid}"), &Value::Null)?;
    check(project["egressAllowlist"] == json!(["api.anthropic.com"]), || format!("allowlist changed: {project}"))?;
    // The audit trail names the key behind the refused allowlist change, and holds no key.
    let trail = api.expect(200, "GET", "/audit?limit=20", &Value::Null)?;
    let refused = trail["entries"].as_array().into_iter().flatten().any(|e| {
        e["keyID"] == key_id.as_str()
            && e["method"] == "PUT"
            && e["route"] == "/api/projects/{id}"
            && e["status"] == 403
    });
    check(refused && !trail.to_string().contains(key), || format!("audit trail: {trail}"))?;
    api.expect(204, "DELETE", &format!("/keys/{key_id}"), &Value::Null)?;
    let (status, _) = scoped.call("GET", &format!("/sandboxes/{sid}"), &Value::Null)?;
    check(status == 401, || format!("a revoked key answered {status}"))?;
    api.expect(204, "DELETE", &format!("/projects/{other_id}"), &Value::Null).map(|_| ())
}

/// Whole seconds between two RFC 3339 UTC timestamps of the same day (`...THH:MM:SSZ`).
fn seconds_between(start: &str, end: &str) -> Option<i64> {
    Some(crate::api::rfc3339_seconds(end)? - crate::api::rfc3339_seconds(start)?)
}

fn store_for_reboot(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let project = api.expect(201, "POST", "/projects", &json!({"name": "survivor", "timeoutSec": 600}))?;
    let pid = project["id"].as_str().ok_or_else(|| err!("no id"))?;
    api.expect(204, "PUT", &format!("/projects/{pid}/secrets/KEPT"), &json!({"value": PERSISTED_VALUE}))?;
    Ok(())
}

fn rotate_master_key(appliance: &mut Appliance) -> Result<()> {
    let sealed = appliance.machine.wait_for_console("is sealed to the TPM (/dev/tpmrm0)", 0, Duration::from_secs(1))?;
    let api = appliance.api();
    let rotated = api.expect(200, "POST", "/system/master-key/rotate", &Value::Null)?;
    let new_id = rotated["keyId"].as_str().unwrap_or_default();
    check(rotated["store"] == "tpm" && rotated["secrets"].as_u64() >= Some(1) && !sealed.contains(new_id), || {
        format!("rotation answered {rotated} after the console said {sealed:?}")
    })?;
    appliance.machine.wait_for_console(&format!("master key rotated to {new_id} (tpm)"), 0, Duration::from_secs(5))?;
    // Served on under the new key: the stored secret still opens for a new sandbox.
    let sid = api.create_sandbox(&json!({"project": "survivor"}))?;
    let (code, out, _) = api.run(&sid, "echo $KEPT", 30)?;
    api.expect(204, "DELETE", &format!("/sandboxes/{sid}"), &Value::Null)?;
    check(code == 0 && out.starts_with("osb_sealed_"), || format!("after the rotation the sandbox sees {out:?}"))
}

fn check_after_reboot(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let projects = api.expect(200, "GET", "/projects", &Value::Null)?;
    no_plaintext(&projects)?;
    let survivor = projects
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == "survivor"))
        .ok_or_else(|| err!("project survivor is gone after the reboot: {projects}"))?;
    check(survivor["timeoutSec"] == 600, || format!("survivor changed: {survivor}"))?;
    let pid = survivor["id"].as_str().unwrap_or_default();
    let names = api.secret_names(pid)?;
    check(names == ["KEPT"], || format!("secret names after reboot: {names:?}"))?;
    // The secret still opens: a sandbox of the project gets a token for it.
    let sid = api.create_sandbox(&json!({"project": "survivor"}))?;
    let (code, out, _) = api.run(&sid, "echo $KEPT", 30)?;
    api.expect(204, "DELETE", &format!("/sandboxes/{sid}"), &Value::Null)?;
    check(code == 0 && out.starts_with("osb_sealed_"), || format!("after reboot the sandbox sees {out:?}"))?;
    let console = appliance.machine.console();
    check(!console.contains(PERSISTED_VALUE), || "the plaintext secret appears in the console log".into())
}

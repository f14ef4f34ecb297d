//! The sealing proxy end to end: a sandbox holding only a sealed token makes HTTPS requests with
//! curl; the test upstream receives the real secret (in a header and in a JSON body), never the
//! token; hosts outside the project's allowlist get 403; and there is no way out but the proxy.

use crate::api::Api;
use crate::check::check;
use crate::harness::{Appliance, Scenario};
use image::err;
use image::error::Result;
use serde_json::{json, Value};

pub const SCENARIOS: &[Scenario] = &[Scenario {
    name: "outbound HTTPS from a sandbox carries the real secret, only through the proxy",
    run: sealed_requests,
}];

/// Runs once the appliance is powered off: searches what it left behind.
pub const AFTER_POWERDOWN: &[Scenario] = &[Scenario {
    name: "no plaintext secret in a sandbox's memory dump, its disk, the data partition or the console",
    run: secret_search,
}];

const SECRET: &str = "sk-ant-sealing-e2e-6a1f0c9b2d";

fn sealed_requests(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let project =
        api.expect(201, "POST", "/projects", &json!({"name": "sealing", "egressAllowlist": ["api.anthropic.com"]}))?;
    let pid = project["id"].as_str().ok_or_else(|| err!("no id"))?.to_string();
    api.expect(204, "PUT", &format!("/projects/{pid}/secrets/ANTHROPIC_API_KEY"), &json!({"value": SECRET}))?;
    let sid = api.create_sandbox(&json!({"project": "sealing", "timeout": 600}))?;
    let (_, token, _) = api.run(&sid, "printf %s \"$ANTHROPIC_API_KEY\"", 30)?;
    check(token.starts_with("osb_sealed_"), || format!("the sandbox holds {token:?}"))?;
    let upstream =
        appliance.upstream.as_ref().ok_or_else(|| err!("this appliance was booted without the test upstream"))?;
    let before = upstream.received()?.len();

    send_key_twice(&api, &sid, "ANTHROPIC_API_KEY")?;
    let received = upstream.expect_real_key(before, SECRET)?;

    // A host outside the allowlist: the proxy answers 403 naming it.
    // (For HTTPS the refusal is the answer to CONNECT: curl reports it as http_connect.)
    let (code, out, err) =
        api.run(&sid, "curl -sS -o /dev/null -w '%{http_connect}' https://blocked.example.com/", 60)?;
    check(code != 0 && out == "403", || format!("blocked host: exit {code}, {out:?}, {err:?}"))?;
    // No way around the proxy: no proxy settings, or a raw TCP connection, go nowhere.
    let (code, _, _) = api.run(&sid, "curl -sS --noproxy '*' --max-time 10 https://api.anthropic.com/", 30)?;
    check(code != 0, || "curl --noproxy reached something".into())?;
    let (code, _, _) = api.run(&sid, "timeout 10 bash -c 'echo > /dev/tcp/10.0.2.2/443'", 30)?;
    check(code != 0, || "a raw TCP connect to 10.0.2.2:443 succeeded".into())?;
    check(upstream.received()?.len() == received.len(), || "the upstream got a request past the proxy".into())?;

    // The sandbox stays up; its guest memory goes to the data disk for the search after power-off.
    let dump = api.expect(200, "POST", &format!("/sandboxes/{sid}/diagnostics/memory-dump"), &Value::Null)?;
    let bytes = dump["bytes"].as_u64().unwrap_or(0);
    check(bytes >= 256 << 20, || format!("memory dump: {dump}"))?;
    api.expect(204, "DELETE", &format!("/projects/{pid}"), &Value::Null)?;
    let console = appliance.machine.console();
    check(!console.contains(SECRET), || "the plaintext secret appears in the console log".into())
}

/// Counts `needle` in the data regions of a (sparse) file, matches across chunk edges included.
fn count_in_file(path: &std::path::Path, needle: &[u8]) -> Result<u64> {
    use image::error::Context;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let mut file = std::fs::File::open(path).ctx(|| format!("open {}", path.display()))?;
    let len = file.metadata().ctx(|| "stat".into())?.len();
    let mut count = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    let mut offset = 0u64;
    while offset < len {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after offset
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { hole as u64 };
        file.seek(SeekFrom::Start(data as u64)).ctx(|| "seek".into())?;
        let mut carry: Vec<u8> = Vec::new();
        let mut pos = data as u64;
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            file.read_exact(&mut buf[..want]).ctx(|| "read".into())?;
            carry.extend_from_slice(&buf[..want]);
            count += carry.windows(needle.len()).filter(|w| *w == needle).count() as u64;
            let keep = carry.len().saturating_sub(needle.len() - 1);
            carry.drain(..keep);
            pos += want as u64;
        }
        offset = end;
    }
    Ok(count)
}

fn secret_search(appliance: &mut Appliance) -> Result<()> {
    let plaintexts = [
        ("the sealing secret", SECRET),
        ("the control-plane secret", super::control_plane::SECRET_VALUE),
        ("the persisted secret", super::control_plane::PERSISTED_VALUE),
        ("the documented example's secret", super::documented::DOCUMENTED_SECRET),
    ];
    let mut report = Vec::new();
    for (label, secret) in plaintexts {
        let on_disk = count_in_file(&appliance.data_disk, secret.as_bytes())?;
        let in_console = appliance.machine.console().matches(secret).count();
        report.push(format!("{label}: data disk {on_disk}, console {in_console}"));
        check(on_disk == 0 && in_console == 0, || format!("plaintext found: {}", report.join("; ")))?;
    }
    // The search can see guest memory and sandbox disks: tokens, which the sandbox does hold, are there.
    let tokens = count_in_file(&appliance.data_disk, b"osb_sealed_")?;
    eprintln!(
        "[qemu-test]   secret search: {}; sealed tokens on the data disk (memory dump, sandbox disks): {tokens}",
        report.join("; ")
    );
    check(tokens > 0, || "no sealed token found on the data disk: the search does not see the memory dump".into())
}

/// From sandbox `sid`, curl sends the sealed token in `$env` to api.anthropic.com twice (through
/// the proxy): in an `x-api-key` header, then in a JSON body; both must answer 200.
/// Upstream::expect_real_key checks what arrived.
pub fn send_key_twice(api: &Api, sid: &str, env: &str) -> Result<()> {
    // The documented request: the key in a header.
    let header_call = format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' https://api.anthropic.com/v1/messages \\
        -H \"x-api-key: ${env}\" -H 'content-type: application/json' -d '{{\"model\":\"m\"}}'"
    );
    let (code, out, err) = api.run(sid, &header_call, 60)?;
    check(code == 0 && out == "200", || format!("curl with the key in a header: exit {code}, {out:?}, {err:?}"))?;
    // The key in a JSON body.
    let body_call = format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' https://api.anthropic.com/v1/complete \\
        -H 'content-type: application/json' -d \"{{\\\"api_key\\\": \\\"${env}\\\", \\\"n\\\": 1}}\""
    );
    let (code, out, err) = api.run(sid, &body_call, 60)?;
    check(code == 0 && out == "200", || format!("curl with the key in the body: exit {code}, {out:?}, {err:?}"))
}

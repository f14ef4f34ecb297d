//! The sealing proxy end to end: a sandbox holding only a sealed token makes HTTPS requests with
//! curl; the test upstream receives the real secret (in a header and in a JSON body), never the
//! token; hosts outside the project's allowlist get 403; and there is no way out but the proxy.
//! After power-off, what the appliance left behind (memory dumps, disks, console) holds no
//! secret value. The hostile-sandbox scenarios live in sealing_attacks.rs.

use crate::api::Api;
use crate::check::check;
use crate::harness::{Appliance, Scenario};
use image::err;
use image::error::Result;
use serde_json::{json, Value};
use std::sync::{Mutex, PoisonError};

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "outbound HTTPS from a sandbox carries the real secret, only through the proxy",
        run: sealed_requests,
    },
    Scenario {
        name: "an echoing upstream hands the sandbox only its own token, never the secret (421 when fronted, deleted secret stops)",
        run: super::sealing_attacks::echoing_upstream,
    },
];

/// Runs once the appliance is powered off: searches what it left behind.
pub const AFTER_POWERDOWN: &[Scenario] = &[Scenario {
    name: "no plaintext secret in a sandbox's memory dump, its disk, the data partition or the console",
    run: secret_search,
}];

const SECRET: &str = "sk-ant-sealing-e2e-6a1f0c9b2d";

/// Sandboxes whose guest memory was dumped: (label, the sealed token they hold, the secret it
/// stands for). The search after power-off must find each token (so it does see that sandbox's
/// memory) and not one copy of the secret.
static DUMPED: Mutex<Vec<(&'static str, String, &'static str)>> = Mutex::new(Vec::new());

/// Dumps sandbox `sid`'s guest memory to the data disk (the sandbox keeps running) and has the
/// search after power-off look there for `secret`, next to the sandbox's `token`.
pub fn dump_memory_for_search(
    api: &Api,
    sid: &str,
    label: &'static str,
    token: &str,
    secret: &'static str,
) -> Result<()> {
    let dump = api.expect(200, "POST", &format!("/sandboxes/{sid}/diagnostics/memory-dump"), &Value::Null)?;
    let bytes = dump["bytes"].as_u64().unwrap_or(0);
    check(bytes >= 256 << 20, || format!("memory dump: {dump}"))?;
    DUMPED.lock().unwrap_or_else(PoisonError::into_inner).push((label, token.to_string(), secret));
    Ok(())
}

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
    dump_memory_for_search(&api, &sid, "the sealing sandbox", &token, SECRET)?;
    api.expect(204, "DELETE", &format!("/projects/{pid}"), &Value::Null)?;
    let console = appliance.machine.console();
    check(!console.contains(SECRET), || "the plaintext secret appears in the console log".into())
}

/// Counts each of `needles` in the data regions of a (sparse) file, matches across chunk edges
/// included: one pass over the file however many needles (a data disk holds gigabytes).
fn count_in_file(path: &std::path::Path, needles: &[&[u8]]) -> Result<Vec<u64>> {
    use image::error::Context;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let mut file = std::fs::File::open(path).ctx(|| format!("open {}", path.display()))?;
    let len = file.metadata().ctx(|| "stat".into())?.len();
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(1).max(1);
    let mut counts = vec![0u64; needles.len()];
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
        // How many leading bytes of `carry` were already searched (the kept tail of the last
        // chunk): a match must end past them, so none is counted twice.
        let mut searched = 0usize;
        let mut pos = data as u64;
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            file.read_exact(&mut buf[..want]).ctx(|| "read".into())?;
            carry.extend_from_slice(&buf[..want]);
            for (needle, count) in needles.iter().zip(counts.iter_mut()) {
                if needle.is_empty() {
                    continue;
                }
                // Start where a match could first end past the searched bytes.
                let from = (searched + 1).saturating_sub(needle.len());
                *count += carry[from..].windows(needle.len()).filter(|w| w == needle).count() as u64;
            }
            let keep = carry.len().saturating_sub(longest - 1);
            carry.drain(..keep);
            searched = carry.len();
            pos += want as u64;
        }
        offset = end;
    }
    Ok(counts)
}

fn secret_search(appliance: &mut Appliance) -> Result<()> {
    let mut plaintexts = vec![
        ("the sealing secret", SECRET),
        ("the echo scenario's secret", super::sealing_attacks::ECHO_SECRET),
        ("the control-plane secret", super::control_plane::SECRET_VALUE),
        ("the persisted secret", super::control_plane::PERSISTED_VALUE),
        ("the documented example's secret", super::documented::DOCUMENTED_SECRET),
    ];
    let dumped = DUMPED.lock().unwrap_or_else(PoisonError::into_inner).clone();
    for (label, _, secret) in &dumped {
        if !plaintexts.iter().any(|(_, s)| s == secret) {
            plaintexts.push((label, secret));
        }
    }
    // One pass over the data disk: the secrets, every token prefix, each dumped sandbox's token.
    let mut needles: Vec<&[u8]> = plaintexts.iter().map(|(_, secret)| secret.as_bytes()).collect();
    needles.push(b"osb_sealed_");
    needles.extend(dumped.iter().map(|(_, token, _)| token.as_bytes()));
    let counts = count_in_file(&appliance.data_disk, &needles)?;
    let (on_disk, rest) = counts.split_at(plaintexts.len());
    let console = appliance.machine.console();
    let mut report = Vec::new();
    for ((label, secret), on_disk) in plaintexts.iter().zip(on_disk) {
        let in_console = console.matches(secret).count();
        report.push(format!("{label}: data disk {on_disk}, console {in_console}"));
        check(*on_disk == 0 && in_console == 0, || format!("plaintext found: {}", report.join("; ")))?;
    }
    // The search can see guest memory and sandbox disks: tokens, which the sandbox does hold, are there.
    let tokens = rest.first().copied().unwrap_or(0);
    eprintln!(
        "[qemu-test]   secret search: {}; sealed tokens on the data disk (memory dump, sandbox disks): {tokens}",
        report.join("; ")
    );
    check(tokens > 0, || "no sealed token found on the data disk: the search does not see the memory dump".into())?;
    // Each dumped sandbox: its own token is found (the search sees its memory) and its secret,
    // counted above over the whole disk, is not.
    for ((label, _, _), found) in dumped.iter().zip(rest.iter().skip(1)) {
        eprintln!("[qemu-test]   {label}: its token {found} time(s) on the data disk, its secret 0");
        check(*found > 0, || format!("{label}'s token is not on the data disk: its memory dump was not searched"))?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::count_in_file;

    #[test]
    fn needles_are_counted_once_each_across_chunk_edges() {
        // The reader's chunk is 8 MiB: one needle straddles that edge, a short one sits in the
        // tail kept for the long needle (it must not be counted twice).
        let edge = 8 << 20;
        let mut data = vec![b'.'; edge + 64];
        data[edge - 3..edge + 3].copy_from_slice(b"LONGER");
        data[10..16].copy_from_slice(b"LONGER");
        data[edge - 5..edge - 3].copy_from_slice(b"xy");
        data[edge + 10..edge + 12].copy_from_slice(b"xy");
        let path = std::env::temp_dir().join(format!("oc-count-{}", std::process::id()));
        std::fs::write(&path, &data).unwrap();
        let counts = count_in_file(&path, &[b"LONGER", b"xy", b"absent"]);
        let _ = std::fs::remove_file(&path);
        assert_eq!(counts.unwrap(), vec![2, 2, 0]);
    }
}

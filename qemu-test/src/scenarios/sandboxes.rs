//! Sandboxes through the real API: the VMM boots the guest kernel on a clone of the `base`
//! template, the agent runs commands and moves files, guest power actions end the VMM with the
//! right status, and booting many sandboxes in a row leaks nothing.

use crate::api::{metric, Api};
use crate::check::check;
use crate::harness::{Appliance, Scenario};
use image::err;
use image::error::Result;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const SCENARIOS: &[Scenario] = &[
    Scenario { name: "a sandbox boots and its agent runs commands and moves files", run: commands_and_files },
    Scenario { name: "guest reboot and poweroff end the VMM with the right status", run: guest_power_ends_vmm },
    Scenario { name: "20 sandboxes booted and destroyed in a row leak nothing", run: twenty_in_a_row },
    Scenario { name: "a sandbox is killed at its timeout, which POST /timeout moves", run: killed_at_timeout },
    Scenario {
        name: "the timeout is an idle timeout: commands keep a sandbox running, idleness hibernates it, 0 never",
        run: idle_timeout,
    },
    Scenario {
        name: "a sandbox restarted through the API keeps its files and gets its envs and sealed token back",
        run: restart_keeps_files_and_environment,
    },
];

const LEAK_GAUGES: &[&str] =
    &["process_open_fds", "appliance_vmm_processes", "appliance_vsock_cids_in_use", "appliance_sandbox_disks"];

fn commands_and_files(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let started = Instant::now();
    let id = api.create_sandbox(&json!({}))?;
    eprintln!("[qemu-test]   sandbox {id} created in {:.1}s", started.elapsed().as_secs_f64());
    if let Err(e) = commands_and_files_in(&api, &id) {
        // Leave no VMM behind for the leak checks of the scenarios that follow.
        let _ = api.call("DELETE", &format!("/sandboxes/{id}"), &Value::Null);
        return Err(e);
    }

    api.expect(204, "DELETE", &format!("/sandboxes/{id}"), &Value::Null)?;
    let (status, after) = api.call("GET", &format!("/sandboxes/{id}"), &Value::Null)?;
    check(status == 404, || format!("after DELETE: {status} {after}"))?;
    let (status, _) = api.call("POST", &format!("/sandboxes/{id}/commands"), &json!({"cmd": "true"}))?;
    check(status == 404, || format!("a command for a deleted sandbox answered {status}"))
}

/// Commands and files in the running sandbox `id`.
fn commands_and_files_in(api: &Api, id: &str) -> Result<()> {
    let (code, out, _) = api.run(id, "echo hi", 30)?;
    check(code == 0 && out == "hi\n", || format!("echo hi: exit {code}, stdout {out:?}"))?;
    // PID 1 (and so the agent) is the appliance's own, from the sandbox initramfs, running on the
    // root disk it switched to; the template has no init of ours to run instead.
    let (code, out, err) =
        api.run(id, "readlink /proc/1/exe; awk '$2 == \"/\" {print $1, $3}' /proc/self/mounts; ls /sbin/oc-init", 30)?;
    check(code != 0 && out == "/oc-init\n/dev/vda ext4\n" && err.contains("No such file"), || {
        format!("PID 1 and the root: exit {code}, {out:?}, stderr {err:?}")
    })?;
    let (code, out, _) = api.run(id, "uname -a", 30)?;
    // Its own name, also when it was resumed from its template's snapshot.
    let name = format!("Linux sandbox-{} ", id.get(..8).unwrap_or(id));
    check(code == 0 && out.starts_with(&name), || format!("uname -a: exit {code}, {out:?}"))?;
    // The template's own name files, not the build host's: localhost resolves without DNS
    // (as a program asks for it, through Python), and no build machine's resolver is in it.
    let names = "python3 -c 'import socket; print(socket.gethostbyname(\"localhost\"))'; grep -c nameserver /etc/resolv.conf; cat /etc/hostname";
    let (code, out, err) = api.run(id, names, 60)?;
    check(code == 0 && out == "127.0.0.1\n0\nsandbox\n", || {
        format!("name files: exit {code}, {out:?}, stderr {err:?}")
    })?;
    let (code, _, err) = api.run(id, "echo oops >&2; exit 7", 30)?;
    check(code == 7 && err == "oops\n", || format!("failing command: exit {code}, stderr {err:?}"))?;

    let t = Instant::now();
    let (code, _, err) = api.run(id, "sleep 60", 2)?;
    let took = t.elapsed();
    check(code == 124 && err.contains("timeout") && took < Duration::from_secs(30), || {
        format!("timeout: exit {code}, stderr {err:?}, after {took:?}")
    })?;
    // The whole process group died with it: no sleep is left behind.
    let (_, out, _) = api.run(id, "ps -eo comm | grep -c '^sleep$' || true", 30)?;
    check(out.trim() == "0", || format!("{} sleep process(es) outlived the timeout", out.trim()))?;

    let (code, out, _) = api.run(id, "head -c 1048576 /dev/zero | tr '\\0' x", 60)?;
    check(code == 0 && out.len() == 1 << 20 && out.bytes().all(|b| b == b'x'), || {
        format!("1 MiB of output: exit {code}, {} bytes", out.len())
    })?;

    let (code, out, _) =
        api.run(id, "echo $SSL_CERT_FILE; grep -c 'BEGIN CERTIFICATE' $SSL_CERT_FILE; echo $HTTPS_PROXY", 30)?;
    let lines: Vec<&str> = out.lines().collect();
    check(
        code == 0
            && lines.len() == 3
            && lines[1].parse::<u32>().unwrap_or(0) > 100
            && lines[2] == "http://127.0.0.1:3128",
        || format!("CA bundle and proxy settings: {out:?}"),
    )?;

    let binary: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let (status, _) = api.raw("PUT", &format!("/sandboxes/{id}/files?path=/root/data/blob.bin"), &binary)?;
    check(status == 204 || status == 200, || format!("file write answered {status}"))?;
    let (status, back) = api.raw("GET", &format!("/sandboxes/{id}/files?path=/root/data/blob.bin"), b"")?;
    check(status == 200 && back == binary, || {
        format!("file read: {status}, {} bytes back, equal: {}", back.len(), back == binary)
    })?;
    let listing = api.expect(200, "GET", &format!("/sandboxes/{id}/files/list?path=/root/data"), &Value::Null)?;
    check(listing[0]["name"] == "blob.bin" && listing[0]["size"] == 65536 && listing[0]["isDir"] == false, || {
        format!("listing: {listing}")
    })?;
    let (code, out, _) = api.run(id, "sha256sum /root/data/blob.bin | cut -c1-16", 30)?;
    check(code == 0 && out.len() == 17, || format!("the agent's file is visible to commands: {out:?}"))?;
    api.expect(204, "POST", &format!("/sandboxes/{id}/files/mkdir?path=/root/a/b/c"), &Value::Null)?;
    api.expect(204, "DELETE", &format!("/sandboxes/{id}/files?path=/root/a"), &Value::Null)?;
    let (status, _) = api.call("GET", &format!("/sandboxes/{id}/files?path=/root/a/b"), &Value::Null)?;
    check(status == 404, || format!("a removed directory answered {status}"))
}

/// Waits for the appliance's log line about the VMM of `id` ending.
fn vmm_end_line(appliance: &mut Appliance, id: &str, from: usize) -> Result<String> {
    appliance.machine.wait_for_console(&format!("sandbox {id}: VMM ended"), from, Duration::from_secs(120))
}

fn guest_power_ends_vmm(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    for (signal, expected) in [("INT", "guest rebooted (exit 3)"), ("TERM", "guest powered off (exit 0)")] {
        let from = appliance.console_len();
        let id = api.create_sandbox(&json!({}))?;
        // PID 1 of the sandbox: SIGINT reboots, SIGTERM powers off. The command's own
        // connection may break as the guest goes down; only the VMM's end matters.
        let _ = api.run(&id, &format!("kill -{signal} 1"), 30);
        let line = vmm_end_line(appliance, &id, from)?;
        check(line.contains(expected), || format!("kill -{signal} 1: {line}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = api.expect(200, "GET", &format!("/sandboxes/{id}"), &Value::Null)?;
            if state["status"] == "stopped" {
                break;
            }
            if Instant::now() > deadline {
                return Err(err!("sandbox {id} still {} after its VMM ended", state["status"]));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(())
}

pub(crate) fn leak_gauges(api: &Api) -> Result<Vec<(String, f64)>> {
    let text = api.metrics()?;
    let mut out = Vec::new();
    for name in LEAK_GAUGES.iter().chain(["process_threads"].iter()) {
        let value = metric(&text, name).ok_or_else(|| err!("/metrics has no {name}"))?;
        out.push((name.to_string(), value));
    }
    Ok(out)
}

fn twenty_in_a_row(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let before = leak_gauges(&api)?;
    let started = Instant::now();
    let rounds: u32 = std::env::var("OC_E2E_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(20);
    for n in 0..rounds {
        let id = api.create_sandbox(&json!({}))?;
        let (code, out, _) = api.run(&id, &format!("echo round-{n}"), 30)?;
        check(code == 0 && out == format!("round-{n}\n"), || format!("round {n}: exit {code}, {out:?}"))?;
        api.expect(204, "DELETE", &format!("/sandboxes/{id}"), &Value::Null)?;
    }
    let each = started.elapsed().as_secs_f64() / f64::from(rounds.max(1));
    // Threads that end asynchronously (VMM waiters) get a moment to finish.
    std::thread::sleep(Duration::from_secs(2));
    let after = leak_gauges(&api)?;
    eprintln!("[qemu-test]   {rounds} sandboxes, {each:.2}s each (create + command + delete); gauges before {before:?}, after {after:?}");
    for ((name, b), (_, a)) in before.iter().zip(after.iter()) {
        // A per-sandbox leak grows by `rounds`; the scrape's own connection and tiny-http's
        // idle workers move descriptors and threads by one or two.
        let allowed = if name == "process_threads" || name == "process_open_fds" { 2.0 } else { 0.0 };
        check(*a <= *b + allowed, || format!("{name} grew from {b} to {a} over {rounds} sandboxes"))?;
    }
    check(after.iter().any(|(n, v)| n == "appliance_vmm_processes" && *v == 0.0), || format!("VMMs left: {after:?}"))
}

fn status_of(api: &Api, id: &str) -> Result<Value> {
    api.expect(200, "GET", &format!("/sandboxes/{id}"), &Value::Null)
}

fn killed_at_timeout(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    // Its idle timeout stops a sandbox of this project (by default it would hibernate it).
    api.expect(201, "POST", "/projects", &json!({"name": "timeout-stops-e2e", "autoHibernate": false}))?;
    let id = api.create_sandbox(&json!({"project": "timeout-stops-e2e", "timeout": 5}))?;
    // Moved out: still running well past the original 5 s.
    api.expect(204, "POST", &format!("/sandboxes/{id}/timeout"), &json!({"timeout": 60}))?;
    std::thread::sleep(Duration::from_secs(8));
    let state = status_of(&api, &id)?;
    check(state["status"] == "running", || format!("after moving the timeout to 60 s: {state}"))?;
    let (code, out, _) = api.run(&id, "echo still-here", 30)?;
    check(code == 0 && out == "still-here\n", || format!("command after the move: {code} {out:?}"))?;
    // Moved in: gone within a few seconds of the new end.
    let from = appliance.console_len();
    api.expect(204, "POST", &format!("/sandboxes/{id}/timeout"), &json!({"timeout": 2}))?;
    let line = appliance.machine.wait_for_console(&format!("sandbox {id} stopped"), from, Duration::from_secs(60))?;
    check(line.contains("timeout reached"), || format!("stopped for another reason: {line}"))?;
    let state = status_of(&api, &id)?;
    check(state["status"] == "stopped", || format!("after its timeout: {state}"))?;
    let (status, _) = api.call("POST", &format!("/sandboxes/{id}/commands"), &json!({"cmd": "true"}))?;
    check(status == 404 || status == 409, || format!("a command after the timeout answered {status}"))?;
    let gauges = leak_gauges(&api)?;
    check(gauges.iter().any(|(n, v)| n == "appliance_vmm_processes" && *v == 0.0), || {
        format!("VMM left after the timeout: {gauges:?}")
    })
}

/// The 60 s timeout with a command every 15 s for 120 s, scaled down by six.
fn idle_timeout(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    // Created last, so its first command follows its creation at once (creates take seconds).
    let idle = api.create_sandbox(&json!({"timeout": 10}))?;
    let forever = api.create_sandbox(&json!({"timeout": 0}))?;
    let busy = api.create_sandbox(&json!({"timeout": 10}))?;
    let result = (|| {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(24) {
            let (code, out, _) = api.run(&busy, "echo busy", 30)?;
            check(code == 0 && out == "busy\n", || {
                format!("busy sandbox after {:?}: {code} {out:?}", started.elapsed())
            })?;
            std::thread::sleep(Duration::from_millis(2500));
        }
        let (b, i, f) = (status_of(&api, &busy)?, status_of(&api, &idle)?, status_of(&api, &forever)?);
        check(b["status"] == "running", || format!("a command every 2.5 s did not keep it running: {b}"))?;
        // An idle timeout hibernates a sandbox unless its project says otherwise.
        check(i["status"] == "hibernated", || format!("24 s idle with a 10 s timeout: {i}"))?;
        check(f["status"] == "running" && f["endAt"].is_null(), || format!("timeout 0: {f}"))
    })();
    for id in [&busy, &idle, &forever] {
        let _ = api.call("DELETE", &format!("/sandboxes/{id}"), &Value::Null);
    }
    result
}

fn restart_keeps_files_and_environment(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let project =
        api.expect(201, "POST", "/projects", &json!({"name": "restart-e2e", "egressAllowlist": ["api.example.com"]}))?;
    let pid = project["id"].as_str().ok_or_else(|| err!("no project id in {project}"))?.to_string();
    api.expect(204, "PUT", &format!("/projects/{pid}/secrets/SERVICE_KEY"), &json!({"value": "sk-restart-e2e-0000"}))?;
    let id =
        api.create_sandbox(&json!({"project": "restart-e2e", "envs": {"GREETING": "hello-restart"}, "timeout": 0}))?;
    let result = (|| {
        let probe = "echo $GREETING $SERVICE_KEY; cat /proc/sys/kernel/random/boot_id; cat /root/kept.txt; echo; pgrep -c -x sleep || true";
        let (status, _) =
            api.raw("PUT", &format!("/sandboxes/{id}/files?path=/root/kept.txt"), b"kept across the restart")?;
        check(status == 204, || format!("writing the file answered {status}"))?;
        api.expect(201, "POST", &format!("/sandboxes/{id}/exec"), &json!({"cmd": "sleep 600"}))?;
        let (_, before, _) = api.run(&id, probe, 30)?;
        let started = Instant::now();
        let restarted = api.expect(200, "POST", &format!("/sandboxes/{id}/reboot"), &Value::Null)?;
        let took = started.elapsed();
        check(restarted["status"] == "running", || format!("after the restart: {restarted}"))?;
        let (code, after, err) = api.run(&id, probe, 30)?;
        check(code == 0, || format!("the probe after the restart exited {code}: {err}"))?;
        let (b, a): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
        check(b.len() == 4 && a.len() == 4, || format!("probe output before {before:?}, after {after:?}"))?;
        check(a[0] == b[0] && a[0].starts_with("hello-restart osb_sealed_"), || {
            format!("the environment came back as {:?} (before: {:?})", a[0], b[0])
        })?;
        check(a[1] != b[1], || format!("the guest did not boot again (boot id {} both times)", a[1]))?;
        check(a[2] == "kept across the restart", || format!("the file came back as {:?}", a[2]))?;
        check(b[3] == "1" && a[3] == "0", || format!("sleep processes before/after: {} / {}", b[3], a[3]))?;
        eprintln!("[qemu-test]   restarted in {:.1}s: same files, envs and token; new boot id", took.as_secs_f64());
        Ok(())
    })();
    let _ = api.call("DELETE", &format!("/sandboxes/{id}"), &Value::Null);
    let _ = api.call("DELETE", &format!("/projects/{pid}"), &Value::Null);
    result
}

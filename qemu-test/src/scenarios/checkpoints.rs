//! Checkpoints and forks through the real API and the real VMM: a checkpoint restored in place
//! brings the sandbox's files back (and its processes: the guest resumes); two forks of one
//! checkpoint are new sandboxes with the checkpoint's files, different sealed tokens and different
//! `/dev/urandom` output, and each one's sealed requests reach the upstream with the real key,
//! while the original sandbox's token, replayed from a fork, is substituted by nothing.

use super::sealing::send_key_twice;
use crate::api::Api;
use crate::check::check;
use crate::harness::{Appliance, Scenario, SHUTDOWN_TIMEOUT};
use image::err;
use image::error::Result;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const SCENARIOS: &[Scenario] = &[Scenario {
    name: "checkpoints restore files and processes in place; forks get their own tokens, entropy and egress",
    run: checkpoints_and_forks,
}];

/// Runs once the appliance is powered off (after the power-loss rounds): boots it again.
pub const POWER_CUT: &[Scenario] = &[Scenario {
    name: "a power cut while a checkpoint is written leaves the earlier one usable",
    run: power_cut_during_a_checkpoint,
}];

const SECRET: &str = "sk-ant-forks-e2e-93b1d04c7e";

fn token_of(api: &Api, sid: &str) -> Result<String> {
    let (_, token, _) = api.run(sid, "printf %s \"$ANTHROPIC_API_KEY\"", 30)?;
    check(token.starts_with("osb_sealed_"), || format!("sandbox {sid} holds {token:?}"))?;
    Ok(token)
}

fn file_of(api: &Api, sid: &str, path: &str) -> Result<(u16, String)> {
    let (status, body) = api.raw("GET", &format!("/sandboxes/{sid}/files?path={path}"), b"")?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn checkpoints_and_forks(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let project =
        api.expect(201, "POST", "/projects", &json!({"name": "forks", "egressAllowlist": ["api.anthropic.com"]}))?;
    let pid = project["id"].as_str().ok_or_else(|| err!("no id"))?.to_string();
    api.expect(204, "PUT", &format!("/projects/{pid}/secrets/ANTHROPIC_API_KEY"), &json!({"value": SECRET}))?;
    let sid = api.create_sandbox(&json!({"project": "forks", "timeout": 0}))?;
    let mut forks: Vec<String> = Vec::new();
    let result = (|| {
        let (status, _) = api.raw("PUT", &format!("/sandboxes/{sid}/files?path=/root/state.txt"), b"v1")?;
        check(status == 204, || format!("writing the file answered {status}"))?;
        let (code, pid_out, err) = api.run(&sid, "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!", 30)?;
        check(code == 0, || format!("starting the background process: {err}"))?;
        let sleeper = pid_out.trim().to_string();
        let original_token = token_of(&api, &sid)?;

        let started = Instant::now();
        let cp = api.expect(201, "POST", &format!("/sandboxes/{sid}/checkpoints"), &json!({"name": "v1"}))?;
        let checkpoint_s = started.elapsed().as_secs_f64();
        let cp_id = cp["id"].as_str().ok_or_else(|| err!("no checkpoint id in {cp}"))?.to_string();
        check(cp["status"] == "ready" && cp["sandboxID"] == sid.as_str(), || format!("checkpoint: {cp}"))?;

        // The sandbox runs on and changes; the restore takes it back.
        api.raw("PUT", &format!("/sandboxes/{sid}/files?path=/root/state.txt"), b"v2")?;
        api.raw("PUT", &format!("/sandboxes/{sid}/files?path=/root/later.txt"), b"later")?;
        api.run(&sid, &format!("kill {sleeper}"), 30)?;
        let started = Instant::now();
        api.expect(200, "POST", &format!("/sandboxes/{sid}/checkpoints/{cp_id}/restore"), &Value::Null)?;
        let restore_s = started.elapsed().as_secs_f64();
        check(file_of(&api, &sid, "/root/state.txt")? == (200, "v1".into()), || "state.txt is not v1".into())?;
        let (later, _) = file_of(&api, &sid, "/root/later.txt")?;
        check(later == 404, || format!("a file written after the checkpoint answered {later}"))?;
        let (code, _, _) = api.run(&sid, &format!("kill -0 {sleeper}"), 30)?;
        check(code == 0, || format!("the process {sleeper} killed after the checkpoint is not back"))?;
        check(token_of(&api, &sid)? == original_token, || "the restored sandbox's token changed".into())?;

        // Two forks of the checkpoint.
        let mut fork_s = Vec::new();
        for _ in 0..2 {
            let started = Instant::now();
            let fork =
                api.expect(201, "POST", &format!("/sandboxes/from-checkpoint/{cp_id}"), &json!({"timeout": 0}))?;
            fork_s.push(started.elapsed().as_secs_f64());
            let id = fork["sandboxID"].as_str().ok_or_else(|| err!("no sandboxID in {fork}"))?.to_string();
            check(fork["status"] == "running" && id != sid, || format!("fork: {fork}"))?;
            forks.push(id);
        }
        let upstream =
            appliance.upstream.as_mut().ok_or_else(|| err!("this appliance was booted without the test upstream"))?;
        let mut tokens = vec![original_token.clone()];
        let mut randoms = Vec::new();
        for fork in &forks {
            check(file_of(&api, fork, "/root/state.txt")? == (200, "v1".into()), || {
                format!("fork {fork} lacks the checkpoint's file")
            })?;
            let (_, hostname, _) = api.run(fork, "hostname", 30)?;
            check(hostname.trim() == format!("sandbox-{}", &fork[..8]), || {
                format!("fork {fork} is named {hostname:?}")
            })?;
            let token = token_of(&api, fork)?;
            check(!tokens.contains(&token), || format!("fork {fork} holds a token another sandbox has"))?;
            tokens.push(token);
            let (_, random, _) = api.run(fork, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'", 30)?;
            check(random.len() == 64, || format!("urandom in {fork}: {random:?}"))?;
            randoms.push(random);
            let before = upstream.received()?.len();
            send_key_twice(&api, fork, "ANTHROPIC_API_KEY")?;
            upstream.expect_real_key(before, SECRET)?;
        }
        check(randoms[0] != randoms[1], || format!("both forks read {} from /dev/urandom", randoms[0]))?;

        // The checkpointed guest's memory still knows the original's token: from a fork the proxy
        // does not substitute it (it belongs to another CID), so it reaches the upstream as itself.
        let before = upstream.received()?.len();
        let replay = format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' https://api.anthropic.com/v1/messages -H 'x-api-key: {original_token}'"
        );
        let (code, out, err) = api.run(&forks[0], &replay, 60)?;
        check(code == 0, || format!("the replayed request: exit {code}, {out:?}, {err:?}"))?;
        upstream.expect_revoked_token(before, &original_token, SECRET)?;

        api.expect(204, "DELETE", &format!("/sandboxes/{sid}/checkpoints/{cp_id}"), &Value::Null)?;
        let list = api.expect(200, "GET", &format!("/sandboxes/{sid}/checkpoints"), &Value::Null)?;
        check(list == json!([]), || format!("after the delete the list is {list}"))?;
        eprintln!(
            "[qemu-test]   checkpoint {checkpoint_s:.1}s, restore {restore_s:.1}s, forks {:.1}s and {:.1}s; 3 different tokens, 2 different urandom reads",
            fork_s[0], fork_s[1]
        );
        Ok(())
    })();
    for id in forks.iter().chain([&sid]) {
        let _ = api.call("DELETE", &format!("/sandboxes/{id}"), &Value::Null);
    }
    let _ = api.call("DELETE", &format!("/projects/{pid}"), &Value::Null);
    result
}

fn power_cut_during_a_checkpoint(appliance: &mut Appliance) -> Result<()> {
    // In the suite the appliance is off by now (its QEMU reaped: an error here); run on its own,
    // it is still up.
    if let Ok(None) = appliance.machine.try_exit() {
        appliance.machine.power_down(SHUTDOWN_TIMEOUT)?;
    }
    appliance.boot_again()?;
    let api = appliance.api();
    let sid = api.create_sandbox(&json!({"timeout": 0}))?;
    api.raw("PUT", &format!("/sandboxes/{sid}/files?path=/root/state.txt"), b"earlier")?;
    let earlier = api.expect(201, "POST", &format!("/sandboxes/{sid}/checkpoints"), &json!({"name": "earlier"}))?;
    let earlier_id = earlier["id"].as_str().ok_or_else(|| err!("no checkpoint id in {earlier}"))?.to_string();
    // 192 MiB of guest memory to write makes the next checkpoint take seconds, not milliseconds.
    let (code, _, err) = api.run(&sid, "head -c 192m /dev/urandom > /dev/shm/ballast", 120)?;
    check(code == 0, || format!("filling guest memory: {err}"))?;
    api.raw("PUT", &format!("/sandboxes/{sid}/files?path=/root/state.txt"), b"later")?;
    let answer = std::thread::scope(|scope| {
        let later =
            scope.spawn(|| api.call("POST", &format!("/sandboxes/{sid}/checkpoints"), &json!({"name": "later"})));
        std::thread::sleep(Duration::from_millis(700));
        appliance.machine.kill();
        later.join()
    });
    if let Ok(Ok((201, written))) = answer {
        return Err(err!("the checkpoint was complete before the cut ({written}); cut earlier"));
    }
    appliance.boot_again()?;
    let api = appliance.api();
    let list = api.expect(200, "GET", &format!("/sandboxes/{sid}/checkpoints"), &Value::Null)?;
    let names: Vec<&str> =
        list.as_array().map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect()).unwrap_or_default();
    check(names == ["earlier"], || format!("after the cut the checkpoints are {list}"))?;
    let fork = api.expect(201, "POST", &format!("/sandboxes/from-checkpoint/{earlier_id}"), &json!({"timeout": 0}))?;
    let fork_id = fork["sandboxID"].as_str().ok_or_else(|| err!("no sandboxID in {fork}"))?.to_string();
    let state = file_of(&api, &fork_id, "/root/state.txt")?;
    check(state == (200, "earlier".into()), || format!("the earlier checkpoint's file reads {state:?}"))?;
    let console = appliance.machine.console();
    let removed = console.contains("a crash interrupted writing it");
    eprintln!(
        "[qemu-test]   cut 0.7 s into a checkpoint; after the boot: only the earlier one, forked with its file{}",
        if removed { "; the half-kept one was removed at the start" } else { "" }
    );
    let _ = api.call("DELETE", &format!("/sandboxes/{fork_id}"), &Value::Null);
    let _ = api.call("DELETE", &format!("/sandboxes/{sid}"), &Value::Null);
    Ok(())
}

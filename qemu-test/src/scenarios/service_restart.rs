//! A crash of the appliance service while sandboxes run: the test image's probe SIGKILLs it
//! (asked through a sandbox's serial console), init starts it again, and its one reconcile
//! adopts the three running sandboxes: commands work in each, and the one with a sealed secret
//! still reaches the upstream with the real value (its tokens were registered with the new
//! process's proxy from the store).

use crate::api::Api;
use crate::check::check;
use crate::harness::{Appliance, Scenario};
use crate::scenarios::sealing::send_key_twice;
use image::err;
use image::error::Result;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const SCENARIOS: &[Scenario] = &[Scenario {
    name: "after a SIGKILL of the appliance service, running sandboxes are adopted with their sealed tokens",
    run: killed_while_running,
}];

const SECRET: &str = "sk-ant-restart-e2e-41c7d09e";
const PROJECT: &str = "restart";

fn killed_while_running(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let project =
        api.expect(201, "POST", "/projects", &json!({"name": PROJECT, "egressAllowlist": ["api.anthropic.com"]}))?;
    let pid = project["id"].as_str().ok_or_else(|| err!("no id"))?.to_string();
    api.expect(204, "PUT", &format!("/projects/{pid}/secrets/ANTHROPIC_API_KEY"), &json!({"value": SECRET}))?;
    let mut sandboxes = Vec::new();
    let outcome = (|| {
        sandboxes.push(api.create_sandbox(&json!({"project": PROJECT, "memoryMB": 256, "timeout": 900}))?);
        for _ in 0..2 {
            sandboxes.push(api.create_sandbox(&json!({"memoryMB": 256, "timeout": 900}))?);
        }
        kill_and_check(appliance, &api, &sandboxes)
    })();
    for id in &sandboxes {
        let _ = api.call("DELETE", &format!("/sandboxes/{id}"), &Value::Null);
    }
    let _ = api.call("DELETE", &format!("/projects/{pid}"), &Value::Null);
    outcome
}

fn kill_and_check(appliance: &mut Appliance, api: &Api, sandboxes: &[String]) -> Result<()> {
    let sealed = &sandboxes[0];
    let (_, token, _) = api.run(sealed, "printf %s \"$ANTHROPIC_API_KEY\"", 30)?;
    check(token.starts_with("osb_sealed_"), || format!("the sandbox holds {token:?}"))?;

    let console_from = appliance.console_len();
    let started = Instant::now();
    // The answer may or may not make it out before the probe acts; either is fine.
    let _ = api.call(
        "POST",
        &format!("/sandboxes/{sealed}/commands"),
        &json!({"cmd": "printf 'OC-PROBE-KILL-APPLIANCE crash1\\n' > /dev/ttyS0", "timeout": 30}),
    );
    let line =
        appliance.machine.wait_for_console("PROBE killed-appliance crash1", console_from, Duration::from_secs(60))?;
    check(line.contains(" ok "), || format!("probe: {line}"))?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok((200, _)) = api.call("GET", "/healthz", &Value::Null) {
            break;
        }
        if Instant::now() > deadline {
            return Err(err!("the API did not come back within 180 s after the kill"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let back = started.elapsed();

    for id in sandboxes {
        let sandbox = api.expect(200, "GET", &format!("/sandboxes/{id}"), &Value::Null)?;
        check(sandbox["status"] == "running", || format!("after the restart: {sandbox}"))?;
        let (code, out, _) = api.run(id, "echo adopted", 30)?;
        check(code == 0 && out == "adopted\n", || format!("sandbox {id} after the restart: exit {code}, {out:?}"))?;
    }
    let (_, after, _) = api.run(sealed, "printf %s \"$ANTHROPIC_API_KEY\"", 30)?;
    check(after == token, || "the sandbox's token changed across the restart".into())?;
    let upstream = appliance.upstream.as_ref().ok_or_else(|| err!("booted without the test upstream"))?;
    let before = upstream.received()?.len();
    send_key_twice(api, sealed, "ANTHROPIC_API_KEY")?;
    upstream.expect_real_key(before, SECRET)?;
    let console = appliance.machine.console();
    let since = console.get(console_from..).unwrap_or_default();
    // Other scenarios' sandboxes may be running too: only these three are counted.
    let adopted_line =
        |id: &str| since.lines().find(|l| l.contains(&format!("sandbox {id}: adopted, "))).map(str::to_string);
    let lines: Vec<Option<String>> = sandboxes.iter().map(|id| adopted_line(id)).collect();
    eprintln!("[qemu-test]   restart: API back {:.1}s after the kill request", back.as_secs_f64());
    check(lines.iter().all(Option::is_some), || format!("not every sandbox was adopted: {lines:?}"))?;
    check(lines[0].as_deref().is_some_and(|l| l.contains("adopted, 1 sealed token")), || {
        format!("the sealed sandbox's adoption: {:?}", lines[0])
    })?;
    check(!console.contains(SECRET), || "the plaintext secret appears in the console log".into())
}

//! The control plane under load on the booted appliance: forty commands that sleep on one
//! sandbox hold no request worker, so health and project reads answer at once; creates that do
//! not fit the appliance's memory or vCPUs are refused with a clear error, and the sandbox
//! already running keeps working; a guest whose agent is replaced by one that floods directory
//! listings costs the appliance a 502 and bounded memory, nothing else.

use crate::api::{metric, Api};
use crate::check::check;
use crate::harness::{Appliance, Scenario};
use image::err;
use image::error::Result;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "40 sleeping commands leave the API fast; creates beyond capacity are refused",
        run: busy_and_full,
    },
    Scenario { name: "a guest whose agent floods file lists gets a 502 and costs bounded memory", run: hostile_guest },
];

/// The impostor agent the hostile guest runs (see the script's header).
const FLOOD_AGENT: &str = include_str!("guest/flood_agent.py");
/// The bound on what one hostile guest may add to the appliance's resident memory.
const RSS_LIMIT: f64 = 64.0 * 1024.0 * 1024.0;

const SLEEPERS: usize = 40;
const SLEEP_SEC: u64 = 30;
/// Between two sleepers' connects (see `busy_and_full_with`).
const CONNECT_GAP: Duration = Duration::from_millis(100);
/// The bound for every cheap answer while the sleepers run.
const CHEAP_LIMIT: Duration = Duration::from_secs(1);

fn busy_and_full(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let id = api.create_sandbox(&json!({"memoryMB": 512}))?;
    let outcome = busy_and_full_with(&api, &id);
    let _ = api.call("DELETE", &format!("/sandboxes/{id}"), &Value::Null);
    outcome
}

fn busy_and_full_with(api: &Api, id: &str) -> Result<()> {
    let started = Instant::now();
    // QEMU's user-mode network listens for forwarded connections with a backlog of 1 (`ss -ltn`
    // shows it): a burst of 40 connects overflows the host's queue, and connects the host kernel
    // cannot hand over within its SYN-ACK retries are reset half a minute later, before they
    // ever reach the appliance. So the sleepers connect 100 ms apart; they all run at once.
    let sleepers: Vec<_> = (0..SLEEPERS)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(CONNECT_GAP);
            }
            let (api, id) = (Api::new(api.endpoint.clone(), &api.key), id.to_string());
            std::thread::spawn(move || api.run(&id, &format!("sleep {SLEEP_SEC}"), SLEEP_SEC + 60))
        })
        .collect();
    // Probe while every sleeper is certainly still running (they end SLEEP_SEC after starting).
    std::thread::sleep(Duration::from_secs(1));
    let mut slowest = (Duration::ZERO, "");
    let mut probes = 0;
    while started.elapsed() < Duration::from_secs(SLEEP_SEC - 5) {
        for path in ["/healthz", "/projects"] {
            let t = Instant::now();
            let (status, body) = api.call("GET", path, &Value::Null)?;
            let took = t.elapsed();
            check(status == 200, || format!("GET {path} while busy: {status} {body}"))?;
            if took > slowest.0 {
                slowest = (took, path);
            }
            probes += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let probing_ended = started.elapsed();
    let mut failures = Vec::new();
    let mut finished = 0;
    for s in sleepers {
        match s.join() {
            Ok(Ok((0, _, _))) => finished += 1,
            Ok(Ok((code, _, err))) => failures.push(format!("exit {code}, stderr {err:?}")),
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push("a sleeper thread panicked".into()),
        }
    }
    check(failures.is_empty(), || {
        format!("{} of {SLEEPERS} commands failed: {}", failures.len(), failures.join(" | "))
    })?;
    let all_done = started.elapsed();
    eprintln!(
        "[qemu-test]   busy: {probes} probes during {SLEEPERS} x sleep {SLEEP_SEC}, slowest {:.0} ms ({}), all {finished} commands done after {:.1}s",
        slowest.0.as_secs_f64() * 1000.0,
        slowest.1,
        all_done.as_secs_f64()
    );
    // The sleepers must have overlapped the probing, or the probes proved nothing.
    check(all_done >= Duration::from_secs(SLEEP_SEC) && probing_ended < all_done, || {
        format!("the commands ended after {all_done:?}, probing after {probing_ended:?}")
    })?;
    check(slowest.0 < CHEAP_LIMIT, || format!("GET {} took {:?} while busy", slowest.1, slowest.0))?;

    refused_beyond_capacity(api, id)
}

fn refused_beyond_capacity(api: &Api, id: &str) -> Result<()> {
    let system = api.expect(200, "GET", "/system", &Value::Null)?;
    let capacity = &system["capacity"];
    let number = |v: &Value, what: &str| v.as_u64().ok_or_else(|| err!("no {what} in {capacity}"));
    let free = number(&capacity["memoryMB"]["free"], "memoryMB.free")?;
    let for_sandboxes = number(&capacity["memoryMB"]["forSandboxes"], "memoryMB.forSandboxes")?;
    let vcpus = number(&capacity["vcpus"]["total"], "vcpus.total")?;
    check(free + 512 <= for_sandboxes, || format!("the running 512 MiB sandbox is not committed: {capacity}"))?;

    let too_big = free + 1;
    let (status, answer) = api.call("POST", "/sandboxes", &json!({"memoryMB": too_big}))?;
    let want = format!("not enough memory for a {too_big} MiB sandbox: {free} MiB free of {for_sandboxes} MiB");
    check(status == 503 && answer["error"].as_str().is_some_and(|e| e.contains(&want)), || {
        format!("a create beyond free memory answered {status} {answer}, wanted 503 with {want:?}")
    })?;
    let (status, answer) = api.call("POST", "/sandboxes", &json!({"cpuCount": vcpus + 1}))?;
    check(status == 400 && answer["error"].as_str().is_some_and(|e| e.contains("cpuCount")), || {
        format!("cpuCount {} on a {vcpus}-vCPU appliance answered {status} {answer}", vcpus + 1)
    })?;
    let (status, answer) = api.call("POST", "/sandboxes", &json!({"memoryMB": for_sandboxes + 1}))?;
    check(status == 400 && answer["error"].as_str().is_some_and(|e| e.contains("memoryMB")), || {
        format!("memoryMB beyond the machine answered {status} {answer}")
    })?;

    // Nothing was lost: the running sandbox still works and its memory is still committed.
    let (code, out, _) = api.run(id, "echo still-here", 30)?;
    check(code == 0 && out == "still-here\n", || format!("the running sandbox after the refusals: {code} {out:?}"))?;
    let after = api.expect(200, "GET", "/system", &Value::Null)?;
    check(after["capacity"]["memoryMB"]["free"] == capacity["memoryMB"]["free"], || {
        format!("refused creates changed the free memory: {capacity} then {}", after["capacity"])
    })
}

fn hostile_guest(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let victim = api.create_sandbox(&json!({"memoryMB": 256}))?;
    let bystander = match api.create_sandbox(&json!({"memoryMB": 256})) {
        Ok(id) => id,
        Err(e) => {
            let _ = api.call("DELETE", &format!("/sandboxes/{victim}"), &Value::Null);
            return Err(e);
        }
    };
    let outcome = hostile_guest_with(&api, &victim, &bystander);
    for id in [&victim, &bystander] {
        let _ = api.call("DELETE", &format!("/sandboxes/{id}"), &Value::Null);
    }
    outcome
}

fn resident(api: &Api) -> Result<f64> {
    metric(&api.metrics()?, "process_resident_memory_bytes").ok_or_else(|| err!("no process_resident_memory_bytes"))
}

fn hostile_guest_with(api: &Api, victim: &str, bystander: &str) -> Result<()> {
    let (status, _) =
        api.raw("PUT", &format!("/sandboxes/{victim}/files?path=/root/flood.py"), FLOOD_AGENT.as_bytes())?;
    check(status == 204, || format!("uploading the impostor answered {status}"))?;
    let before = resident(api)?;
    // The impostor may lose the race for the port to the agent init restarts; then the real
    // agent answers and the script can be started again.
    let mut outcome = None;
    for attempt in 1..=3 {
        let (code, _, err) = api.run(victim, "setsid python3 /root/flood.py </dev/null >/dev/null 2>&1 & echo", 30)?;
        check(code == 0, || format!("starting the impostor: exit {code}, {err:?}"))?;
        std::thread::sleep(Duration::from_secs(4));
        let t = Instant::now();
        let (status, answer) = api.call("GET", &format!("/sandboxes/{victim}/files/list?path=/root"), &Value::Null)?;
        let took = t.elapsed();
        if status != 200 {
            outcome = Some((status, answer, took));
            break;
        }
        eprintln!("[qemu-test]   the real agent kept its port (attempt {attempt}); starting the impostor again");
    }
    let (status, answer, took) = outcome.ok_or_else(|| err!("the impostor never took the agent's port"))?;
    let error = answer["error"].as_str().unwrap_or_default().to_string();
    let after = resident(api)?;
    eprintln!(
        "[qemu-test]   hostile guest: {status} after {:.1}s ({error}); appliance RSS {:.1} -> {:.1} MiB",
        took.as_secs_f64(),
        before / 1048576.0,
        after / 1048576.0
    );
    check(status == 502 && error.contains(victim) && error.contains("entries"), || {
        format!("the flooded listing answered {status} {answer}")
    })?;
    check(took < Duration::from_secs(35), || format!("the flooded listing took {took:?}"))?;
    check(after - before < RSS_LIMIT, || format!("appliance RSS grew from {before} to {after} bytes"))?;
    let (code, out, _) = api.run(bystander, "echo unaffected", 30)?;
    check(code == 0 && out == "unaffected\n", || format!("the other sandbox: exit {code}, {out:?}"))?;
    let (status, body) = api.call("GET", "/healthz", &Value::Null)?;
    check(status == 200, || format!("healthz after the flood: {status} {body}"))
}

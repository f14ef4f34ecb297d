//! Snapshots through the real API and the real VMM: hibernating a sandbox writes its machine
//! state and memory and ends its VMM; waking restores them, so processes, their working
//! directories and files carry on; a command for a hibernated sandbox wakes it by itself.

use super::sandboxes::leak_gauges;
use crate::api::{metric, Api};
use crate::check::check;
use crate::harness::{Appliance, Scenario};
use image::error::Result;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "hibernate and wake: a background process keeps its PID and working directory, files and envs stay",
        run: hibernate_and_wake,
    },
    Scenario {
        name: "hibernate/wake cycles leak no memory, descriptors, CIDs, VMMs or disks",
        run: cycles_leak_nothing,
    },
];

fn status_of(api: &Api, id: &str) -> Result<String> {
    let state = api.expect(200, "GET", &format!("/sandboxes/{id}"), &Value::Null)?;
    Ok(state["status"].as_str().unwrap_or_default().to_string())
}

fn hibernate(api: &Api, id: &str) -> Result<Duration> {
    let started = Instant::now();
    api.expect(200, "POST", &format!("/sandboxes/{id}/hibernate"), &Value::Null)?;
    let took = started.elapsed();
    let status = status_of(api, id)?;
    check(status == "hibernated", || format!("after hibernate the sandbox is {status:?}"))?;
    Ok(took)
}

fn wake(api: &Api, id: &str) -> Result<Duration> {
    let started = Instant::now();
    api.expect(200, "POST", &format!("/sandboxes/{id}/wake"), &json!({}))?;
    let took = started.elapsed();
    let status = status_of(api, id)?;
    check(status == "running", || format!("after wake the sandbox is {status:?}"))?;
    Ok(took)
}

fn hibernate_and_wake(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let id = api.create_sandbox(&json!({"envs": {"GREETING": "hello-hibernate"}, "timeout": 0}))?;
    let result = (|| {
        let (status, _) =
            api.raw("PUT", &format!("/sandboxes/{id}/files?path=/root/kept.txt"), b"kept across hibernation")?;
        check(status == 204, || format!("writing the file answered {status}"))?;
        // A process started in its own working directory, holding a file open.
        // A heartbeat on the guest console: if a restored guest stops running, its console
        // (part of a failed wake's error) shows where.
        api.run(&id, "setsid sh -c 'while :; do echo guest-tick-$(date +%s) > /dev/console; sleep 5; done' </dev/null >/dev/null 2>&1 &", 30)?;
        let (code, out, err) =
            api.run(&id, "mkdir -p /tmp/work && cd /tmp/work && setsid sh -c 'exec 3>open.txt; exec sleep 1000' </dev/null >/dev/null 2>&1 & \
             pid=$!; for i in $(seq 100); do [ -e /proc/$pid/fd/3 ] && break; sleep 0.1; done; echo $pid", 30)?;
        check(code == 0, || format!("starting the background process: {err}"))?;
        let pid = out.trim().to_string();
        let probe = format!(
            "kill -0 {pid} && readlink /proc/{pid}/cwd /proc/{pid}/fd/3 && cat /root/kept.txt && echo && \
             echo $GREETING && cat /proc/sys/kernel/random/boot_id"
        );
        let (_, before, _) = api.run(&id, &probe, 30)?;
        let gauges = api.metrics()?;
        let vmms_before = metric(&gauges, "appliance_vmm_processes").unwrap_or(-1.0);

        let hibernated_in = hibernate(&api, &id)?;
        let vmms = metric(&api.metrics()?, "appliance_vmm_processes").unwrap_or(-1.0);
        check((vmms_before - vmms - 1.0).abs() < 0.5, || {
            format!("VMM processes {vmms_before} before, {vmms} while hibernated")
        })?;
        let woken_in = wake(&api, &id)?;
        let (code, after, err) = api.run(&id, &probe, 30)?;
        check(code == 0 && after == before, || {
            format!("after wake: exit {code}, {after:?} (before: {before:?}), {err}")
        })?;
        let lines: Vec<&str> = before.lines().collect();
        check(lines.len() == 5 && lines[0] == "/tmp/work" && lines[1] == "/tmp/work/open.txt", || {
            format!("the probe said {before:?}")
        })?;

        // A command for a hibernated sandbox wakes it first.
        hibernate(&api, &id)?;
        let started = Instant::now();
        let (code, again, err) = api.run(&id, &probe, 60)?;
        check(code == 0 && again == before, || format!("a command woke it to: exit {code}, {again:?}, {err}"))?;
        eprintln!(
            "[qemu-test]   hibernated in {:.1}s, woken in {:.1}s, woken by a command in {:.1}s; same boot id, PID {pid} alive",
            hibernated_in.as_secs_f64(),
            woken_in.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })();
    let _ = api.call("DELETE", &format!("/sandboxes/{id}"), &Value::Null);
    result
}

fn cycles_leak_nothing(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let rounds: u32 = std::env::var("OC_E2E_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(20);
    let id = api.create_sandbox(&json!({"timeout": 0}))?;
    let result = (|| {
        let (code, _, err) = api.run(&id, "head -c 64m /dev/urandom > /dev/shm/ballast", 60)?;
        check(code == 0, || format!("writing 64 MiB into the guest's memory: {err}"))?;
        // One cycle first: lazily created things (threads, caches) exist before the count.
        hibernate(&api, &id)?;
        wake(&api, &id)?;
        std::thread::sleep(Duration::from_secs(1));
        let before = leak_gauges(&api)?;
        let rss_before = metric(&api.metrics()?, "process_resident_memory_bytes").unwrap_or(0.0);
        let started = Instant::now();
        for n in 0..rounds {
            hibernate(&api, &id)?;
            wake(&api, &id)?;
            let (code, out, _) = api.run(&id, &format!("echo cycle-{n}; test -s /dev/shm/ballast && echo kept"), 30)?;
            check(code == 0 && out == format!("cycle-{n}\nkept\n"), || format!("cycle {n}: exit {code}, {out:?}"))?;
        }
        let each = started.elapsed().as_secs_f64() / f64::from(rounds.max(1));
        std::thread::sleep(Duration::from_secs(2));
        let after = leak_gauges(&api)?;
        let rss_after = metric(&api.metrics()?, "process_resident_memory_bytes").unwrap_or(0.0);
        for ((name, b), (_, a)) in before.iter().zip(&after) {
            // Threads come and go with requests in flight; a few either way is not a leak.
            let slack = if name == "process_threads" { 4.0 } else { 0.0 };
            check(a - b <= slack, || format!("{name}: {b} before {rounds} cycles, {a} after"))?;
        }
        let grew = (rss_after - rss_before) / f64::from(1 << 20);
        check(grew < 16.0, || format!("the appliance's RSS grew by {grew:.1} MiB over {rounds} cycles"))?;
        eprintln!(
            "[qemu-test]   {rounds} hibernate/wake cycles, {each:.1}s each; gauges unchanged, RSS {grew:+.1} MiB"
        );
        Ok(())
    })();
    let _ = api.call("DELETE", &format!("/sandboxes/{id}"), &Value::Null);
    result
}

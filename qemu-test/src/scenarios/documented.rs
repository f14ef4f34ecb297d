//! The documentation, run: every Python example in README.md and sdk/python/README.md runs as it
//! stands, with the SDK, against the booted appliance. The examples print what a user would
//! look at; each is checked here by the heading it sits under, and the sealed-key example also
//! by what the test upstream received.

use crate::api::Api;
use crate::check::check;
use crate::harness::{Appliance, Scenario};
use crate::snippets::{self, Snippet};
use image::err;
use image::error::Result;
use std::time::Duration;

pub const SCENARIOS: &[Scenario] =
    &[Scenario { name: "the documented Python examples run as written against the appliance", run: run_examples }];

/// The secret value the quickstart stores, exactly as documented.
pub const DOCUMENTED_SECRET: &str = "sk-ant-...";
/// Generous: the timeout example waits 20 s and every example boots at least one sandbox.
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(300);
const DOCUMENTS: &[&str] = &["README.md", "sdk/python/README.md"];

type Checker = fn(&[&str], &mut Appliance, usize) -> Result<()>;

/// What each documented example must print, by its heading. An example under a heading that is
/// not here fails: new documentation needs a check.
const CHECKS: &[(&str, Checker)] = &[
    ("Quickstart", quickstart),
    ("Calling an API with the sealed key", sealed_key),
    ("Only allowed hosts, and only through the proxy", no_way_out),
    ("Per-sandbox resources and environment", overrides),
    ("Files and background commands", files_and_exec),
    ("Updating and deleting a project", update_and_delete),
    ("Timeouts", timeouts),
];

fn run_examples(appliance: &mut Appliance) -> Result<()> {
    let examples = snippets::python_blocks(DOCUMENTS)?;
    check(examples.len() >= CHECKS.len(), || {
        format!("found only {} Python examples in {DOCUMENTS:?}", examples.len())
    })?;
    let python = snippets::sdk_python()?;
    let api = appliance.api();
    let dir = appliance.run_dir.join("examples");
    for (n, example) in examples.iter().enumerate() {
        let checker = CHECKS
            .iter()
            .find(|(heading, _)| *heading == example.heading)
            .map(|(_, f)| *f)
            .ok_or_else(|| err!("{}: no check for the example under {:?}", example.source, example.heading))?;
        let upstream_before = match &appliance.upstream {
            Some(upstream) => upstream.received()?.len(),
            None => 0,
        };
        let ca_file = appliance.machine.api_ca_file.clone();
        let output = run_one(&python, &api, &ca_file, example, &dir.join(format!("example-{n}.py")))?;
        let lines: Vec<&str> = output.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
        checker(&lines, appliance, upstream_before)
            .map_err(|e| err!("{} ({}): {e}\nit printed:\n{output}", example.heading, example.source))?;
        eprintln!("[qemu-test]   example {:?} ({}): ok, {} lines", example.heading, example.source, lines.len());
    }
    Ok(())
}

fn run_one(
    python: &std::path::Path,
    api: &Api,
    ca_file: &std::path::Path,
    example: &Snippet,
    file: &std::path::Path,
) -> Result<String> {
    let env = [
        ("OPENCOMPUTER_API_URL", api.endpoint.url()),
        ("OPENCOMPUTER_API_KEY", api.key.clone()),
        // The API CA learned from the console's fingerprint, trusted the documented way.
        ("SSL_CERT_FILE", ca_file.display().to_string()),
    ];
    let out = snippets::run_python(python, &example.code, file, &env, EXAMPLE_TIMEOUT)?;
    check(out.status == Some(0), || {
        format!(
            "{} ({}) exited with {:?}\nstdout:\n{}\nstderr:\n{}",
            example.heading, example.source, out.status, out.stdout, out.stderr
        )
    })?;
    Ok(out.stdout)
}

fn is_token(text: &str) -> bool {
    text.strip_prefix("osb_sealed_").is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn quickstart(lines: &[&str], _: &mut Appliance, _: usize) -> Result<()> {
    check(lines.len() == 3, || format!("{} lines instead of 3", lines.len()))?;
    check(lines[0] == "['ANTHROPIC_API_KEY']", || format!("list_secrets printed {}", lines[0]))?;
    check(is_token(lines[1]), || format!("the sandbox's ANTHROPIC_API_KEY is {:?}", lines[1]))?;
    check(lines[2] == "Hello, world!", || format!("the file read back as {:?}", lines[2]))
}

fn sealed_key(lines: &[&str], appliance: &mut Appliance, before: usize) -> Result<()> {
    check(lines.len() == 2 && lines.iter().all(|l| l.starts_with("0 {\"received\": ")), || {
        "both curls must succeed".into()
    })?;
    let upstream = appliance.upstream.as_ref().ok_or_else(|| err!("booted without the test upstream"))?;
    upstream.expect_real_key(before, DOCUMENTED_SECRET).map(|_| ())
}

fn no_way_out(lines: &[&str], appliance: &mut Appliance, before: usize) -> Result<()> {
    check(lines.len() == 3, || format!("{} lines instead of 3", lines.len()))?;
    check(lines[0] == "403", || format!("example.com got {:?} instead of 403", lines[0]))?;
    check(lines[1] != "0", || "curl --noproxy reached something".into())?;
    check(lines[2] != "0", || "a raw TCP connect succeeded".into())?;
    let upstream = appliance.upstream.as_ref().ok_or_else(|| err!("booted without the test upstream"))?;
    let after = upstream.received()?.len();
    check(after == before, || format!("the upstream received {} request(s) it must not have", after - before))
}

fn overrides(lines: &[&str], _: &mut Appliance, _: usize) -> Result<()> {
    check(lines.len() == 4, || format!("{} lines instead of 4", lines.len()))?;
    check(lines[0] == "1", || format!("nproc printed {}", lines[0]))?;
    let kib: u64 = lines[1].split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    // MemTotal is the guest RAM less what the kernel keeps for itself.
    check((600 << 10..=768 << 10).contains(&kib), || format!("{} for a 768 MB sandbox", lines[1]))?;
    check(lines[2] == "batch", || format!("MODE is {:?}", lines[2]))?;
    let times: Vec<i64> = lines[3].split_whitespace().filter_map(crate::api::rfc3339_seconds).collect();
    check(times.len() == 2 && times[1] - times[0] == 120, || format!("lifetime {:?} is not 120 s", lines[3]))
}

fn files_and_exec(lines: &[&str], _: &mut Appliance, _: usize) -> Result<()> {
    check(lines.len() >= 7, || format!("{} lines, expected at least 7", lines.len()))?;
    check(lines[0] == "[('input.bin', 1024)]", || format!("the listing is {:?}", lines[0]))?;
    check(lines[1] == "True", || "exec.list did not show the one session".into())?;
    // An output chunk may carry one tick or several; what matters is all of it, in order.
    let (streamed, end) = lines[2..].split_at(lines.len() - 4);
    let ticks: Vec<&str> = streamed.iter().map(|l| l.strip_prefix("stdout ").unwrap_or(l)).collect();
    check(ticks == ["tick 1", "tick 2", "tick 3"], || format!("streamed output {ticks:?}"))?;
    check(end == ["exit code 3", "False"], || format!("exit code and exists() after remove: {end:?}"))
}

fn update_and_delete(lines: &[&str], _: &mut Appliance, _: usize) -> Result<()> {
    check(lines.len() == 2, || format!("{} lines instead of 2", lines.len()))?;
    check(lines[0] == "my-agent 1024 ['api.anthropic.com']", || format!("update returned {:?}", lines[0]))?;
    check(is_token(lines[1]), || format!("after the project was deleted the sandbox holds {:?}", lines[1]))
}

fn timeouts(lines: &[&str], _: &mut Appliance, _: usize) -> Result<()> {
    check(lines == ["True", "False"], || format!("is_running before/after the timeout: {lines:?}"))
}

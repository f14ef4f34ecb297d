//! Today's OpenComputer clients, unchanged: the Python SDK from PyPI and the TypeScript SDK from
//! npm, installed by this test at pinned versions, each run a program (`qemu-test/clients/`)
//! against the booted appliance with nothing changed but the URL, the key and the CA to trust.
//! Both run at once: each spends most of its time in commands longer than a minute and in the
//! two-minute idle-timeout check.

use crate::check::check;
use crate::harness::Appliance;
use crate::harness::Scenario;
use image::err;
use image::error::{Context, Result};
use image::host::run_quiet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SCENARIOS: &[Scenario] = &[Scenario {
    name: "the published Python and TypeScript SDKs work unchanged against the appliance",
    run: published_clients,
}];

/// The published releases under test: the ones docs/client-wire-contract.md was read from.
pub const PYTHON_SDK: (&str, &str) = ("opencomputer-sdk", "1.1.0");
pub const NODE_SDK: (&str, &str) = ("@opencomputer/sdk", "0.12.4");
/// The WebSocket for Node releases without a global one (Node < 22 without a flag).
const NODE_WS: (&str, &str) = ("ws", "8.18.3");
/// Both programs run a 65 s command and a 120 s idle-timeout check; installing is separate.
const RUN_TIMEOUT: Duration = Duration::from_secs(420);

/// What each program must print (`ok <line>`), by the start of the line, in any order.
const PYTHON_CHECKS: &[&str] = &[
    "created two sandboxes with timeout=60",
    "exec.run: exit code, stdout and stderr",
    "exec.run of a 65 s command answered after",
    "template python: a venv with pip",
    "exec.start streams over the WebSocket with ?api_key=",
    "exec.shell keeps its state between runs",
    "files: 1 MiB binary and UTF-8 text round trip",
    "signed URLs: upload and download without a key; another path is refused",
    "pty: tty, stty size 24 80, resized to 40 120, top draws its screen",
    "secret store: created, secret set, sealed in the sandbox, deleted with it",
    "timeout=60: a command every 15 s keeps it for 120 s; the idle one no longer runs",
    "set_timeout(0) and set_timeout(300)",
    "killed",
];
const NODE_CHECKS: &[&str] = &[
    "created a sandbox with timeout=60",
    "commands.run (run-async, answered inline)",
    "commands.run of a 65 s command through run-async answered after",
    "template node: node and npm run",
    "exec.start streams over the WebSocket with ?api_key=",
    "exec.shell keeps its state between runs",
    "files: 1 MiB binary and UTF-8 text round trip",
    "signed URLs: upload and download without a key; another path is refused",
    "pty: tty, stty size 30 100, resized to 43 132",
    "setTimeout(0), setTimeout(300), isRunning",
    "killed",
];

fn published_clients(appliance: &mut Appliance) -> Result<()> {
    let dir = image::workspace::target_dir().join("published-clients");
    let started = Instant::now();
    let python = install_python_sdk(&dir.join("python"))?;
    let node_dir = install_node_sdk(&dir.join("node"))?;
    eprintln!("[qemu-test]   installed {PYTHON_SDK:?} and {NODE_SDK:?} in {:.0}s", started.elapsed().as_secs_f64());

    let api = appliance.api();
    let ca = appliance.machine.api_ca_file.display().to_string();
    let api_url = api.endpoint.url();
    let clients = image::workspace::root().join("qemu-test/clients");
    let run_dir = appliance.run_dir.join("published-clients");
    std::fs::create_dir_all(&run_dir).ctx(|| format!("create {}", run_dir.display()))?;

    // Python gets the URL without /api, as users write it: its terminal WebSocket then goes to
    // /sandboxes/{id}/pty/{sid}, without the prefix, which the appliance serves too.
    let base_url = api_url.trim_end_matches("/api").to_string();
    let mut py = Command::new(&python);
    py.arg(clients.join("published_python.py")).env("OPENCOMPUTER_API_URL", &base_url).env("SSL_CERT_FILE", &ca);
    // Node resolves the packages from the script's directory.
    let node_script = node_dir.join("published_node.mjs");
    std::fs::copy(clients.join("published_node.mjs"), &node_script)
        .ctx(|| format!("copy to {}", node_script.display()))?;
    let mut node = Command::new("node");
    node.arg(&node_script).env("OPENCOMPUTER_API_URL", &api_url).env("NODE_EXTRA_CA_CERTS", &ca);

    let started = Instant::now();
    let mut running = Vec::new();
    for (name, cmd) in [("python", &mut py), ("node", &mut node)] {
        cmd.env("OPENCOMPUTER_API_KEY", &api.key).env("NO_PROXY", "127.0.0.1,localhost").env("no_proxy", "127.0.0.1");
        running.push((name, spawn_logged(cmd, &run_dir.join(name))?));
    }
    let mut failures = Vec::new();
    for (name, child) in running {
        let checks = if name == "python" { PYTHON_CHECKS } else { NODE_CHECKS };
        if let Err(e) = finish(name, child, &run_dir.join(name), checks) {
            failures.push(e.to_string());
        }
    }
    eprintln!("[qemu-test]   both clients ran in {:.0}s", started.elapsed().as_secs_f64());
    check(failures.is_empty(), || failures.join("\n"))
}

/// A venv with the pinned release from PyPI, made once per target directory.
fn install_python_sdk(venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin/python");
    let (package, version) = PYTHON_SDK;
    let installed = |python: &Path| {
        let probe = format!("import importlib.metadata as m; print(m.version({package:?}))");
        run_quiet(Command::new(python).args(["-c", &probe])).is_ok_and(|v| v.trim() == version)
    };
    if python.is_file() && installed(&python) {
        return Ok(python);
    }
    run_quiet(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    run_quiet(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("{package}=={version}")),
    )?;
    check(installed(&python), || format!("{package}=={version} is not what pip installed in {}", venv.display()))?;
    Ok(python)
}

/// A directory with the pinned release from npm (and `ws`), made once per target directory.
fn install_node_sdk(dir: &Path) -> Result<PathBuf> {
    let (package, version) = NODE_SDK;
    let manifest = dir.join("node_modules").join(package).join("package.json");
    let installed = || {
        std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|m| m["version"] == version)
    };
    if !installed() {
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        // A package.json of our own, so npm installs here and not in a parent directory.
        std::fs::write(dir.join("package.json"), "{\"private\": true, \"type\": \"module\"}\n")
            .ctx(|| format!("write {}", dir.display()))?;
        run_quiet(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                .arg(dir)
                .arg(format!("{package}@{version}"))
                .arg(format!("{}@{}", NODE_WS.0, NODE_WS.1)),
        )
        .map_err(|e| err!("npm install {package}@{version} (needs node and npm on this machine): {e}"))?;
        check(installed(), || format!("{package}@{version} is not what npm installed in {}", dir.display()))?;
    }
    Ok(dir.to_path_buf())
}

/// Starts `cmd` with its output in `<base>.stdout` and `<base>.stderr`.
fn spawn_logged(cmd: &mut Command, base: &Path) -> Result<Child> {
    let out = std::fs::File::create(base.with_extension("stdout")).ctx(|| format!("create {}", base.display()))?;
    let errors = std::fs::File::create(base.with_extension("stderr")).ctx(|| format!("create {}", base.display()))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(errors).spawn().ctx(|| format!("start {cmd:?}"))
}

/// Waits for a client program (killing it at `RUN_TIMEOUT`) and checks that it printed every
/// line in `checks`.
fn finish(name: &str, mut child: Child, base: &Path, checks: &[&str]) -> Result<()> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().ctx(|| format!("wait for the {name} client"))? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let read = |ext: &str| std::fs::read_to_string(base.with_extension(ext)).unwrap_or_default();
    let (stdout, stderr) = (read("stdout"), read("stderr"));
    let printed: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("ok ")).collect();
    for line in &printed {
        eprintln!("[qemu-test]   {name}: {line}");
    }
    let missing: Vec<&&str> = checks.iter().filter(|c| !printed.iter().any(|p| p.starts_with(**c))).collect();
    let tail: String =
        stderr.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    match status {
        Some(s) if s.success() && missing.is_empty() => Ok(()),
        Some(s) => Err(err!("the {name} client ended with {s}; missing {missing:?}; its stderr ends:\n{tail}")),
        None => Err(err!("the {name} client ran past {RUN_TIMEOUT:?}; missing {missing:?}; its stderr ends:\n{tail}")),
    }
}

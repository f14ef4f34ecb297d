//! Runs `<vmm-bin> selfcheck` once at startup (10 s limit) and keeps its JSON for healthz.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const SELFCHECK_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(vmm_bin: &Path, timeout: Duration) -> Value {
    let mut child = match Command::new(vmm_bin)
        .arg("selfcheck")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return json!({"kvm": "error", "error": format!("cannot run {} selfcheck: {e}", vmm_bin.display())}),
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return json!({"kvm": "error", "error": format!("vmm selfcheck did not finish within {} s", timeout.as_secs())});
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return json!({"kvm": "error", "error": format!("waiting for vmm selfcheck failed: {e}")}),
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.by_ref().take(64 * 1024).read_to_string(&mut out);
    }
    let line = out.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    match serde_json::from_str::<Value>(line) {
        Ok(v) if v.is_object() => v,
        _ => json!({"kvm": "error", "error": "vmm selfcheck printed no JSON object"}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(name: &str, body: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("appliance-selfcheck-{name}-{}", std::process::id()));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn parses_ok_line_and_reports_failures() {
        let ok = script("ok", r#"echo '{"kvm":"ok","apiVersion":12,"vcpu":true}'"#);
        assert_eq!(run(&ok, SELFCHECK_TIMEOUT)["apiVersion"], 12);
        let garbage = script("garbage", "echo hello");
        assert_eq!(run(&garbage, SELFCHECK_TIMEOUT)["kvm"], "error");
        let slow = script("slow", "exec sleep 5");
        let started = Instant::now();
        let v = run(&slow, Duration::from_millis(300));
        assert_eq!(v["kvm"], "error");
        assert!(started.elapsed() < Duration::from_secs(3));
        let missing = run(Path::new("/nonexistent/vmm"), SELFCHECK_TIMEOUT);
        assert!(missing["error"].as_str().unwrap_or("").contains("cannot run"));
        for p in [ok, garbage, slow] {
            let _ = std::fs::remove_file(p);
        }
    }
}

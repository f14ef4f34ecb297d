//! `oc-probe`: a supervised service that exists only in the test image variant. It checks, from
//! inside the booted appliance, what the end-to-end tests cannot see through the API (who PID 1
//! is, zombie reaping, service restarts, data persistence, the host programs the image carries)
//! and reports `PROBE ...` lines on the console. It must never be part of the product image.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BOOTS_FILE: &str = "/data/probe/boots";

fn report(line: &str) {
    println!("PROBE {line}");
    let _ = std::io::stdout().flush();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("orphan-parent") => orphan_parent(),
        Some("sleep") => std::thread::sleep(Duration::from_millis(1500)),
        _ => probe(),
    }
}

fn probe() {
    let exe =
        std::fs::read_link("/proc/1/exe").map_or_else(|e| format!("unreadable ({e})"), |p| p.display().to_string());
    report(&format!("pid1 exe={exe}"));
    let boots = count_boot();
    match &boots {
        Ok(n) => report(&format!("boots={n}")),
        Err(e) => report(&format!("boots FAIL {e}")),
    }
    match wait_for_service("appliance", None, Duration::from_secs(60)) {
        Some(pid) => report(&format!("supervised appliance pid={pid} ppid=1")),
        None => report("supervised FAIL no appliance process with parent 1"),
    }
    match zombie_reaped() {
        Ok(pid) => report(&format!("zombie-reaped ok pid={pid}")),
        Err(e) => report(&format!("zombie-reaped FAIL {e}")),
    }
    match mke2fs_makes_ext4() {
        Ok(what) => report(&format!("mke2fs ok {what}")),
        Err(e) => report(&format!("mke2fs FAIL {e}")),
    }
    // Killing the appliance is checked on the first boot only: later boots serve scenarios
    // that must not lose the API under them.
    if boots.as_ref().is_ok_and(|n| *n == 1) {
        match service_restarted() {
            Ok((old, new)) => report(&format!("service-restart ok old={old} new={new}")),
            Err(e) => report(&format!("service-restart FAIL {e}")),
        }
    }
    report("done");
    // Stay up (if the probe exited, init would restart it and it would count a boot again),
    // killing the appliance when a sandbox asks (see `watch_for_kill_requests`).
    watch_for_kill_requests();
}

/// What a sandbox prints on its serial console to have the probe SIGKILL the appliance
/// service, followed by a word naming the request: the end-to-end test of a crash while
/// sandboxes run. Only a test image has the probe.
const KILL_MARKER: &str = "OC-PROBE-KILL-APPLIANCE ";
const SANDBOXES_DIR: &str = "/data/sandboxes";

/// Looks through the end of every sandbox's console log twice a second for `KILL_MARKER`;
/// each request (its word) is acted on once.
fn watch_for_kill_requests() -> ! {
    let mut done: Vec<String> = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let Ok(entries) = std::fs::read_dir(SANDBOXES_DIR) else { continue };
        for entry in entries.flatten() {
            let Some(tail) = tail_of(&entry.path().join("console.log"), 64 << 10) else { continue };
            let requests = tail.match_indices(KILL_MARKER).filter_map(|(at, _)| {
                let word: String =
                    tail[at + KILL_MARKER.len()..].chars().take_while(char::is_ascii_alphanumeric).collect();
                (!word.is_empty()).then_some(word)
            });
            for word in requests.collect::<Vec<_>>() {
                if done.contains(&word) {
                    continue;
                }
                done.push(word.clone());
                match service_restarted() {
                    Ok((old, new)) => report(&format!("killed-appliance {word} ok old={old} new={new}")),
                    Err(e) => report(&format!("killed-appliance {word} FAIL {e}")),
                }
            }
        }
    }
}

/// The last `max` bytes of a file, as text (lossy).
fn tail_of(path: &std::path::Path, max: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Increments the boot counter on the data disk, durably.
fn count_boot() -> Result<u64, String> {
    let previous = match std::fs::read_to_string(BOOTS_FILE) {
        Ok(text) => text.trim().parse::<u64>().map_err(|e| format!("corrupt {BOOTS_FILE}: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(format!("read {BOOTS_FILE}: {e}")),
    };
    let next = previous + 1;
    std::fs::create_dir_all("/data/probe").map_err(|e| format!("mkdir /data/probe: {e}"))?;
    let tmp = format!("{BOOTS_FILE}.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| format!("create {tmp}: {e}"))?;
    file.write_all(format!("{next}\n").as_bytes()).map_err(|e| format!("write {tmp}: {e}"))?;
    file.sync_all().map_err(|e| format!("fsync {tmp}: {e}"))?;
    std::fs::rename(&tmp, BOOTS_FILE).map_err(|e| format!("rename to {BOOTS_FILE}: {e}"))?;
    std::fs::File::open("/data/probe").and_then(|d| d.sync_all()).map_err(|e| format!("fsync /data/probe: {e}"))?;
    Ok(next)
}

/// (pid, parent pid, command name) of every process.
fn processes() -> Vec<(i32, i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (left, right) = (stat.find('(')?, stat.rfind(')')?);
            let comm = stat[left + 1..right].to_string();
            let ppid = stat[right + 2..].split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid, comm))
        })
        .collect()
}

fn wait_for_service(name: &str, not_pid: Option<i32>, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some((pid, _, _)) =
            processes().into_iter().find(|(pid, ppid, comm)| comm == name && *ppid == 1 && Some(*pid) != not_pid)
        {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// Leaves a grandchild orphaned so it is re-parented to PID 1, then checks that once it exits
/// PID 1 reaps it (its /proc entry disappears instead of staying a zombie).
fn zombie_reaped() -> Result<i32, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut parent =
        Command::new(exe).arg("orphan-parent").stdout(Stdio::piped()).spawn().map_err(|e| format!("spawn: {e}"))?;
    let stdout = parent.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).map_err(|e| format!("read orphan pid: {e}"))?;
    parent.wait().map_err(|e| format!("wait: {e}"))?;
    let orphan: i32 = line.trim().parse().map_err(|_| format!("bad orphan pid {line:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen_reparented = false;
    loop {
        match std::fs::read_to_string(format!("/proc/{orphan}/stat")) {
            Err(_) if seen_reparented => return Ok(orphan),
            Err(_) => return Err(format!("orphan {orphan} vanished before it could be observed under PID 1")),
            Ok(stat) => {
                let after = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
                let mut fields = after.split_whitespace();
                let state = fields.next().unwrap_or("?");
                let ppid = fields.next().unwrap_or("?");
                seen_reparented |= ppid == "1";
                if Instant::now() > deadline {
                    return Err(format!("orphan {orphan} still present in state {state} with parent {ppid}"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Child of the probe: starts a grandchild and exits at once without waiting for it.
fn orphan_parent() {
    let Ok(exe) = std::env::current_exe() else { std::process::exit(1) };
    match Command::new(exe).arg("sleep").stdout(Stdio::null()).spawn() {
        Ok(child) => println!("{}", child.id()),
        Err(_) => std::process::exit(1),
    }
}

/// Where the image puts e2fsprogs' mke2fs (image/src/pipeline.rs), which the appliance runs to
/// make template disks from imported archives.
const MKE2FS: &str = "/sbin/mke2fs";

/// Runs `/sbin/mke2fs -t ext4 -d DIR FILE SIZE` as the appliance will, on the data disk, with no
/// /etc/mke2fs.conf in the image, and checks what it made: an ext4 superblock with the features
/// of the templates' ext4 (extents, 64bit, metadata_csum) and the directory's file inside.
fn mke2fs_makes_ext4() -> Result<String, String> {
    let dir = std::path::Path::new("/data/probe/mke2fs");
    let _ = std::fs::remove_dir_all(dir);
    let source = dir.join("root");
    std::fs::create_dir_all(source.join("etc")).map_err(|e| format!("mkdir {}: {e}", source.display()))?;
    let marker = format!("oc-probe mke2fs marker {:x}\n", u64::from(std::process::id()) * 7919);
    std::fs::write(source.join("etc/marker"), &marker).map_err(|e| format!("write the marker: {e}"))?;
    let disk = dir.join("disk.ext4");
    let out = Command::new(MKE2FS)
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&source)
        .arg(&disk)
        .arg("16M")
        .env_remove("MKE2FS_CONFIG")
        .output()
        .map_err(|e| format!("run {MKE2FS}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Err(format!("{MKE2FS} failed ({}): {stderr}", out.status));
    }
    let image = std::fs::read(&disk).map_err(|e| format!("read {}: {e}", disk.display()))?;
    let _ = std::fs::remove_dir_all(dir);
    let sb = image.get(1024..2048).ok_or("the disk is smaller than a superblock")?;
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if sb[0x38..0x3a] != [0x53, 0xef] {
        return Err("no ext4 superblock".into());
    }
    // INCOMPAT_EXTENTS | INCOMPAT_64BIT, RO_COMPAT_METADATA_CSUM: what `-t ext4` gives with the
    // built-in profile as with Debian's /etc/mke2fs.conf.
    if u32_at(0x60) & 0xc0 != 0xc0 || u32_at(0x64) & 0x400 == 0 {
        return Err(format!(
            "not the ext4 features expected: incompat {:#x}, ro_compat {:#x}",
            u32_at(0x60),
            u32_at(0x64)
        ));
    }
    if !image.windows(marker.len()).any(|w| w == marker.as_bytes()) {
        return Err("the file from the -d directory is not in the filesystem".into());
    }
    let config = if std::path::Path::new("/etc/mke2fs.conf").exists() { "with" } else { "without" };
    let warnings = if stderr.is_empty() { String::new() } else { format!(", said {stderr:?}") };
    Ok(format!("ext4 of 16M from a directory, {config} /etc/mke2fs.conf{warnings}"))
}

/// Kills the appliance service and waits for init to start a new one.
fn service_restarted() -> Result<(i32, i32), String> {
    let old = wait_for_service("appliance", None, Duration::from_secs(5)).ok_or("appliance is not running")?;
    // SAFETY: kill(2) with plain integers on a pid we just looked up.
    if unsafe { libc::kill(old, libc::SIGKILL) } != 0 {
        return Err(format!("kill {old}: {}", std::io::Error::last_os_error()));
    }
    let new = wait_for_service("appliance", Some(old), Duration::from_secs(30))
        .ok_or("no new appliance process within 30 s")?;
    Ok((old, new))
}

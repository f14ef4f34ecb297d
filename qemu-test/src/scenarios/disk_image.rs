//! `qemu-test e2e-disk`: the bootable disk image on its own. UEFI firmware (OVMF) boots a copy of
//! the built image with no -kernel and no other disk; the admin key comes from the
//! configuration file on its EFI partition. Checks: API ready, a project survives a reboot (on
//! a disk grown in between, so the data partition is grown too), the appliance serves and runs
//! a sandbox with the network unplugged (templates come from the image), and the same image
//! converted to compressed qcow2 boots. Power is cut three times during API writes: every
//! acknowledged write survives and the data partition checks clean. The configuration file
//! also sets a static address (the port forward goes to it), a host name, and the sealing
//! proxy's host map and extra trusted CA for the test upstream, which a sandbox's sealed key
//! then reaches. A/B upgrade: a power cut
//! while an upgrade is being installed leaves the running slot in charge and the upload is
//! cleaned up; a rebuilt image (another version) staged gzip-compressed through
//! `POST /api/system/upgrade` (uploads it cannot read are refused first) runs
//! from slot B after `POST /api/system/reboot` with the project and secret intact and is
//! committed; a broken image staged next panics on each of its tries and systemd-boot falls back
//! to the committed slot; an image whose API never answers healthy (its data disk is missing)
//! is rebooted by init's trial watchdog on each try and falls back too; data intact throughout.
//! Prints the measurements. `OC_E2E_DISK_ONLY=upgrade` runs only the first boot and the upgrades,
//! `OC_E2E_DISK_ONLY=cuts` only the rest.

use super::power_loss;
use crate::api::Api;
use crate::check::check;
use crate::upstream::Upstream;
use image::err;
use image::error::{Context, Result};
use image::esp;
use image::pipeline::{self, Variant};
use image::qemu::{self, Boot, DiskFormat, Machine, MachineConfig, Network};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(180);
const PROJECT: &str = "disk-e2e";
const SECRET: &str = "UPGRADE_SURVIVES";
/// An upload of the raw image through QEMU's user network into an emulated guest is slow.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(1200);
/// The broken image makes the kernel panic: no such initramfs init, so it falls back to
/// mounting a root device, which does not exist. panic=10 reboots.
const BROKEN_CMDLINE: &str = "rdinit=/no-such-init";
/// An image that boots but never gets healthy: its data disk is not found, so the appliance
/// answers 503; init gives each try TRIAL_SECS before rebooting. Its kernel command line
/// overrides both the default data partition and the file's `trial_timeout = 600`.
const TRIAL_SECS: u64 = 40;
const UNHEALTHY_CMDLINE: &str = "oc.data=/dev/no-such-disk oc.trial_timeout=40";
/// Power cuts during API writes on the disk image (the kernel-boot e2e suite does ten).
const DISK_CUT_ROUNDS: usize = 3;
/// The static address the configuration file gives the appliance (QEMU's user network).
const STATIC_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 50);
const SEALED_VALUE: &str = "sk-disk-e2e-sealed-0123456789";
/// The ESP file name of the extra CA the configuration file names.
const CA_FILE: &str = "upstream-ca.pem";

struct Run {
    dir: PathBuf,
    key: String,
    times: Vec<(String, f64)>,
}

pub fn run() -> Result<String> {
    let started = Instant::now();
    let only = std::env::var("OC_E2E_DISK_ONLY").ok();
    let (upgrades, others) = match only.as_deref() {
        None => (true, true),
        Some("upgrade") => (true, false),
        Some("cuts") => (false, true),
        Some(other) => return Err(err!("OC_E2E_DISK_ONLY={other}: expected upgrade or cuts")),
    };
    let (_, built) = image::disk_image::build_disk(Variant::Product)?;
    qemu::ensure_disk_tools()?;
    let dir = image::workspace::target_dir().join("qemu-test-disk");
    std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    let base_allocated = allocated(&built.path)?;
    let base_version = pipeline::image_version();
    // The images an upgrade installs, rebuilt from the same sources (the build overwrites its
    // output, so each is copied away; the original is used only through copies below).
    let original = dir.join("original.img");
    qemu::prepare_disk_copy(&built.path, &original, 0)?;
    let rebuilt_version = format!("{base_version}-rebuilt");
    let rebuilt = build_variant(&dir, "rebuilt.img", &rebuilt_version, "")?;
    let broken = build_variant(&dir, "broken.img", &format!("{base_version}-broken"), BROKEN_CMDLINE)?;
    let unhealthy = build_variant(&dir, "unhealthy.img", &format!("{base_version}-unhealthy"), UNHEALTHY_CMDLINE)?;
    let mut run = Run { dir: dir.clone(), key: image::run::generate_api_key()?, times: Vec::new() };
    let upstream = Upstream::start(&dir.join("upstream"))?;

    // The operator's configuration goes onto the copy's EFI partition, like an operator would.
    let conf = dir.join("opencomputer.conf");
    let text = format!(
        "# written by qemu-test e2e-disk\nadmin_key = {}\nhostname = oc-disk-e2e\nhostnmae = a-typo\n\
         net = static\nip = {STATIC_IP}/24\ngw = 10.0.2.2\ndns = 10.0.2.3\n\
         trusted_ca = {CA_FILE}\nhost.api.anthropic.com = 10.0.2.2\nallow_private = 10.0.2.2/32\n\
         trial_timeout = 600\n",
        run.key
    );
    std::fs::write(&conf, text).ctx(|| "write the test configuration".into())?;
    let ca = dir.join(CA_FILE);
    std::fs::write(&ca, &upstream.ca_pem).ctx(|| "write the upstream CA".into())?;
    let pristine = dir.join("configured.img");
    qemu::prepare_disk_copy(&original, &pristine, 0)?;
    let esp_at = image::disk_image::esp_offset_spec(&pristine)?;
    esp::copy_in(&pristine, &esp_at, image::disk_image::CONFIG_FILE, &conf)?;
    esp::copy_in(&pristine, &esp_at, CA_FILE, &ca)?;

    let disk = dir.join("disk.img");
    qemu::prepare_disk_copy(&pristine, &disk, 8)?;

    // Boot 1: first boot creates the data partition; a project is stored.
    let mut m = run.boot("first boot (raw, 8 GiB)", &disk, DiskFormat::Raw, Network::Outbound)?;
    m.wait_for_console("data partition /dev/vda4 created", 0, Duration::from_secs(5))?;
    m.wait_for_console("admin API key: from opencomputer.conf line 2", 0, Duration::from_secs(1))?;
    // A mistake in the file is named on the console, and the rest of the file still applies.
    m.wait_for_console(
        "CONFIGURATION PROBLEM: opencomputer.conf line 4: unknown key \"hostnmae\"",
        0,
        Duration::from_secs(1),
    )?;
    check(!m.console().contains(&run.key), || "the admin key appears on the console".into())?;
    // The rest of the file: host name, static address (the API is reached through it).
    m.wait_for_console("hostname oc-disk-e2e (opencomputer.conf line 3)", 0, Duration::from_secs(1))?;
    m.wait_for_console(&format!("{STATIC_IP}/24 via 10.0.2.2 (static)"), 0, Duration::from_secs(1))?;
    let api = Api::new(m.api(), &run.key);
    let system = api.expect(200, "GET", "/system", &Value::Null)?;
    check(system["hostname"] == "oc-disk-e2e", || format!("GET /api/system: {system}"))?;
    let project =
        api.expect(201, "POST", "/projects", &json!({"name": PROJECT, "egressAllowlist": ["api.anthropic.com"]}))?;
    let id = project["id"].as_str().ok_or_else(|| err!("no id in {project}"))?.to_string();
    api.expect(204, "PUT", &format!("/projects/{id}/secrets/{SECRET}"), &json!({"value": SEALED_VALUE}))?;
    // The host map, private-range permission and extra CA from the file: a sandbox's sealed
    // key reaches the test upstream (on the host) as the real value.
    let sid = api.create_sandbox(&json!({"project": PROJECT}))?;
    let before = upstream.received()?.len();
    super::sealing::send_key_twice(&api, &sid, SECRET)?;
    upstream.expect_real_key(before, SEALED_VALUE)?;
    check(!m.console().contains(SEALED_VALUE), || "the secret appears on the console".into())?;
    m.wait_for_console("is kept on the EFI system partition, not the data partition", 0, Duration::from_secs(1))?;
    power_down(&mut m)?;
    data_partition_copy_decrypts_nothing(&run, &disk)?;

    if others {
        more_boots(&mut run, &disk, &id)?;
        power_cuts_during_writes(&mut run, &disk)?;
    }
    let mut upgrade_secs = 0.0;
    if upgrades {
        power_cut_while_installing(&mut run, &disk, &id, &rebuilt, &base_version)?;
        upgrade_secs = upgrade(&mut run, &disk, &id, &rebuilt, &base_version, &rebuilt_version)?;
        fallback(&mut run, &disk, &id, &broken, &rebuilt_version)?;
        watchdog_fallback(&mut run, &disk, &id, &unhealthy, &rebuilt_version)?;
    }
    let qcow2_size = if others { qcow2_boot(&mut run, &pristine)? } else { 0 };

    let mut report = format!(
        "disk image {} (a copy of the first build)\n  sha256 {}\n  raw size {} MiB ({} MiB allocated), qcow2 -c {} MiB\n  upgrade (upload + reboot to API ready on slot B): {upgrade_secs:.1}s\n",
        original.display(),
        built.sha256,
        built.size >> 20,
        base_allocated >> 20,
        qcow2_size >> 20
    );
    for (what, secs) in &run.times {
        report.push_str(&format!("  {what}: {secs:.1}s\n"));
    }
    report.push_str(&format!("  e2e-disk total {:.0}s\n", started.elapsed().as_secs_f64()));
    Ok(report)
}

/// Without a TPM the master key is on the ESP: the data partition copied out of the disk decrypts
/// nothing, and the key on the ESP opens every secret (the control).
fn data_partition_copy_decrypts_nothing(run: &Run, disk: &Path) -> Result<()> {
    let extent = image::disk_image::partition_extent(disk, boot_disk::layout::DATA_NAME)?;
    let findings = super::data_copy::decrypts_nothing(disk, Some(extent), &run.dir)?;
    let (esp_offset, _) = image::disk_image::partition_extent(disk, boot_disk::layout::ESP_NAME)?;
    let file = std::fs::File::open(disk).ctx(|| format!("open {}", disk.display()))?;
    let mut esp = boot_disk::fat::Fat::open(file, esp_offset).map_err(|e| err!("the ESP: {e}"))?;
    let path = format!("{}/{}", appliance::master_key::files::ESP_DIR, appliance::keyfiles::MASTER_KEY_FILE);
    let text = esp.read_file(&path, 4096).map_err(|e| err!("the master key on the ESP: {e}"))?;
    let raw = appliance::keyfiles::decode_key(&text).ok_or_else(|| err!("{path} on the ESP is not a key"))?;
    let key = appliance::crypto::MasterKey::from_bytes(raw.as_ref()).map_err(|e| err!("{path}: {e}"))?;
    super::data_copy::control_opens_all(key, &findings, "ESP's")
}

/// Builds the product disk image with another version (and command-line suffix), copied to `dir`.
fn build_variant(dir: &Path, name: &str, version: &str, extra_cmdline: &str) -> Result<PathBuf> {
    let options =
        image::disk_image::DiskOptions { version: version.to_string(), extra_cmdline: extra_cmdline.to_string() };
    let (_, image) = image::disk_image::build_disk_with(Variant::Product, &options)?;
    let copy = dir.join(name);
    qemu::prepare_disk_copy(&image.path, &copy, 0)?;
    let signature = image::signing::signature_path(&copy);
    std::fs::copy(&image.signature, &signature).ctx(|| format!("copy {}", image.signature.display()))?;
    Ok(copy)
}

/// The signature statement the build wrote for `image` (sent with its upload).
fn signature_of(image: &Path) -> Result<String> {
    let path = image::signing::signature_path(image);
    Ok(std::fs::read_to_string(&path).ctx(|| format!("read {}", path.display()))?.trim().to_string())
}

fn more_boots(run: &mut Run, disk: &Path, id: &str) -> Result<()> {
    // Boot 2, after the disk grew: the partition and filesystem grow, the project is still there.
    qemu::resize(disk, DiskFormat::Raw, 12)?;
    let mut m = run.boot("second boot (disk grown to 12 GiB)", disk, DiskFormat::Raw, Network::Outbound)?;
    m.wait_for_console("data partition /dev/vda4 grown", 0, Duration::from_secs(5))?;
    m.wait_for_console("data filesystem on /dev/vda4 grown", 0, Duration::from_secs(5))?;
    let api = Api::new(m.api(), &run.key);
    let again = api.expect(200, "GET", &format!("/projects/{id}"), &Value::Null)?;
    check(again["name"] == PROJECT, || format!("the project did not survive the reboot: {again}"))?;
    power_down(&mut m)?;

    // Boot 3, network unplugged: only the API port forward reaches the guest.
    let mut m = run.boot("network unplugged", disk, DiskFormat::Raw, Network::Unplugged)?;
    let api = Api::new(m.api(), &run.key);
    let sandbox_started = Instant::now();
    let sid = api.create_sandbox(&json!({}))?;
    let (code, out, err_out) = api.run(&sid, "echo hi", 60)?;
    check(code == 0 && out == "hi\n", || {
        format!("echo hi in a sandbox: exit {code}, stdout {out:?}, stderr {err_out:?}")
    })?;
    run.times.push(("sandbox created + echo hi (unplugged)".into(), sandbox_started.elapsed().as_secs_f64()));
    power_down(&mut m)
}

/// Power cuts during API writes on the disk image itself (the data filesystem on partition 4
/// of the boot disk): each round boots, finds every write acknowledged so far, has four
/// clients write projects, kills QEMU mid-stream and checks the data partition of a copy.
fn power_cuts_during_writes(run: &mut Run, disk: &Path) -> Result<()> {
    // The data partition was created and grown by the boots before; it stays where it is.
    let extent = image::disk_image::partition_extent(disk, boot_disk::layout::DATA_NAME)?;
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..DISK_CUT_ROUNDS {
        let mut m = run.boot(
            &format!("power cut {} of {DISK_CUT_ROUNDS} during writes", round + 1),
            disk,
            DiskFormat::Raw,
            Network::Outbound,
        )?;
        power_loss::check_present(&Api::new(m.api(), &run.key), &acknowledged)?;
        let prefix = format!("disk-cut-{round}");
        // Early, middle and late in the stream of 200.
        let (acked, in_flight) =
            power_loss::write_until_cut(&mut m, &run.key, &prefix, power_loss::cut_point(round * 4))?;
        let cut_at = acked.len();
        acknowledged.extend(acked);
        power_loss::check_xfs_after_cut(disk, Some(extent), &run.dir).map_err(|e| err!("{prefix}: {e}"))?;
        eprintln!("[qemu-test]   {prefix}: cut after {cut_at} acknowledged writes ({in_flight} in flight), data partition clean");
    }
    let mut m = run.boot("after the power cuts", disk, DiskFormat::Raw, Network::Outbound)?;
    power_loss::check_present(&Api::new(m.api(), &run.key), &acknowledged)?;
    eprintln!(
        "[qemu-test]   {DISK_CUT_ROUNDS} power cuts on the disk image, {} acknowledged writes, none lost",
        acknowledged.len()
    );
    power_down(&mut m)
}

/// The configured image as compressed qcow2, booted fresh; returns the qcow2 file's size.
fn qcow2_boot(run: &mut Run, pristine: &Path) -> Result<u64> {
    let dir = run.dir.clone();
    let qcow2 = dir.join("disk.qcow2");
    let _ = std::fs::remove_file(&qcow2);
    image::host::run_quiet(Command::new("qemu-img").args(["convert", "-c", "-O", "qcow2"]).arg(pristine).arg(&qcow2))?;
    let qcow2_size = size(&qcow2)?;
    qemu::resize(&qcow2, DiskFormat::Qcow2, 8)?;
    let mut m = run.boot("qcow2 first boot", &qcow2, DiskFormat::Qcow2, Network::Outbound)?;
    m.wait_for_console("data partition /dev/vda4 created", 0, Duration::from_secs(5))?;
    power_down(&mut m)?;
    Ok(qcow2_size)
}

#[derive(Clone, Copy, Debug)]
enum Upload {
    Raw,
    /// `gzip -1`, sent with `Content-Encoding: gzip` (about a tenth of the bytes).
    Gzip,
}

/// Stages `image` through the API; returns the answer.
fn stage(api: &image::http::Endpoint, key: &str, image: &Path, upload: Upload) -> Result<Value> {
    let signature = signature_of(image)?;
    let mut headers = vec![
        ("X-API-Key", key),
        ("Content-Type", "application/octet-stream"),
        (boot_disk::signature::HEADER, signature.as_str()),
    ];
    let body = match upload {
        Upload::Raw => std::fs::read(image).ctx(|| format!("read {}", image.display()))?,
        Upload::Gzip => {
            headers.push(("Content-Encoding", "gzip"));
            let out = Command::new("gzip").args(["-1", "-c"]).arg(image).output().ctx(|| "run gzip".into())?;
            check(out.status.success(), || {
                format!("gzip {}: {}", image.display(), String::from_utf8_lossy(&out.stderr))
            })?;
            out.stdout
        }
    };
    eprintln!("[qemu-test] uploading {} ({upload:?}, {} MiB)", image.display(), body.len() >> 20);
    let resp = image::http::request(api, "POST", "/api/system/upgrade", &headers, &body, UPLOAD_TIMEOUT)?;
    let value: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    check(resp.status == 200, || format!("POST /api/system/upgrade: {} {}", resp.status, resp.text()))?;
    Ok(value)
}

#[derive(Clone, Copy)]
enum RebootBy {
    /// `POST /api/system/reboot`.
    Api,
    /// Ctrl-Alt-Del on the console's keyboard.
    Keyboard,
}

/// Asks for a clean reboot; waits until the old system is gone, then for the API.
fn reboot(run: &mut Run, m: &mut Machine, by: RebootBy, what: &str, timeout: Duration) -> Result<usize> {
    let from = m.console().len();
    match by {
        RebootBy::Api => {
            let answer = Api::new(m.api(), &run.key).expect(202, "POST", "/system/reboot", &Value::Null)?;
            check(answer["state"] == "rebooting", || format!("POST /api/system/reboot: {answer}"))?;
        }
        RebootBy::Keyboard => {
            m.monitor("sendkey ctrl-alt-delete")?;
        }
    }
    m.wait_for_console("reboot now", from, Duration::from_secs(120))?;
    let started = Instant::now();
    m.wait_api_ready(timeout, &|| false)
        .map_err(|e| err!("{what}: {e}\nlast console lines:\n{}", m.console_tail(40)))?;
    run.times.push((format!("{what}: reboot to API ready"), started.elapsed().as_secs_f64()));
    Ok(from)
}

/// `GET /api/system` says the appliance runs `version` from `slot`, committed; returns the answer.
fn expect_committed(api: &Api, slot: &str, version: &str, when: &str) -> Result<Value> {
    let system = api.expect(200, "GET", "/system", &Value::Null)?;
    check(system["slot"] == slot && system["version"] == version && system["state"] == "committed", || {
        format!("{when}: {system}")
    })?;
    Ok(system)
}

fn data_intact(api: &Api, id: &str) -> Result<()> {
    let project = api.expect(200, "GET", &format!("/projects/{id}"), &Value::Null)?;
    check(project["name"] == PROJECT, || format!("the project did not survive: {project}"))?;
    let secrets = api.secret_names(id)?;
    check(secrets.iter().any(|n| n == SECRET), || format!("the secret did not survive: {secrets:?}"))
}

/// The same statement as `signed`, signed by a key of its own that no appliance trusts.
fn stranger_signature(signed: &str, dir: &Path) -> Result<String> {
    let (statement, _) =
        boot_disk::signature::Statement::parse(signed).map_err(|e| err!("the build's signature: {e}"))?;
    let key_file = dir.join("stranger-key.pem");
    let _ = std::fs::remove_file(&key_file);
    image::signing::generate(&key_file)?;
    let stranger = image::signing::SigningKey::from_file(&key_file)?;
    let statement = boot_disk::signature::Statement { key: stranger.public_hex(), ..statement };
    Ok(stranger.sign(&statement))
}

/// Boot A, stage the rebuilt image, reboot into B, data intact, committed. Returns the upgrade
/// time: upload start to the API answering on B.
fn upgrade(run: &mut Run, disk: &Path, id: &str, rebuilt: &Path, base: &str, rebuilt_version: &str) -> Result<f64> {
    let mut m = run.boot("upgrade: slot A", disk, DiskFormat::Raw, Network::Outbound)?;
    let api = Api::new(m.api(), &run.key);
    expect_committed(&api, "a", base, "before the upgrade")?;
    // Uploads nobody trusted signing, and uploads the appliance cannot read, are refused plainly
    // and leave nothing staged. (A statement by an unknown key is refused before the body.)
    let signed = signature_of(rebuilt)?;
    let stranger = stranger_signature(&signed, &run.dir)?;
    for (signature, encoding, body, status, says) in [
        ("", "identity", &b"x"[..], 400, "the upload is unsigned"),
        (stranger.as_str(), "identity", &b"x"[..], 403, "which this appliance does not trust"),
        (signed.as_str(), "br", &b"x"[..], 415, "Content-Encoding \"br\" is not supported"),
        (signed.as_str(), "gzip", &b"not gzip at all"[..], 400, "cannot read the uploaded image"),
    ] {
        let mut headers = vec![("X-API-Key", run.key.as_str()), ("Content-Encoding", encoding)];
        if !signature.is_empty() {
            headers.push((boot_disk::signature::HEADER, signature));
        }
        let resp =
            image::http::request(&m.api(), "POST", "/api/system/upgrade", &headers, body, Duration::from_secs(60))?;
        let error: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        let error = error["error"].as_str().unwrap_or("");
        check(resp.status == status && error.contains(says), || {
            format!("a {encoding} upload of {body:?}: {} {}", resp.status, resp.text())
        })?;
    }
    let system = api.expect(200, "GET", "/system", &Value::Null)?;
    check(system["staged"].is_null(), || format!("a refused upload left something staged: {system}"))?;
    let started = Instant::now();
    let staged = stage(&m.api(), &run.key, rebuilt, Upload::Gzip)?;
    let upload = started.elapsed().as_secs_f64();
    eprintln!("[qemu-test] staged in {upload:.1}s: {staged}");
    run.times.push(("upgrade: upload (gzip) + stage".into(), upload));
    for (key, what) in [
        ("receiveSeconds", "upgrade: of which upload + gunzip to the data disk"),
        ("installSeconds", "upgrade: of which checks + install into slot B"),
    ] {
        run.times.push((what.into(), staged[key].as_f64().unwrap_or(f64::NAN)));
    }
    check(staged["slot"] == "b" && staged["version"] == rebuilt_version, || format!("staged: {staged}"))?;
    let system = api.expect(200, "GET", "/system", &Value::Null)?;
    check(system["staged"]["state"] == "staged", || format!("after staging: {system}"))?;
    let from = reboot(run, &mut m, RebootBy::Api, "upgrade: slot B", BOOT_TIMEOUT)?;
    let upgrade_secs = started.elapsed().as_secs_f64();
    let api = Api::new(m.api(), &run.key);
    let system = api.expect(200, "GET", "/system", &Value::Null)?;
    check(system["slot"] == "b" && system["version"] == rebuilt_version, || {
        format!("after the upgrade reboot: {system}")
    })?;
    data_intact(&api, id)?;
    m.wait_for_console("UPGRADE COMMITTED: slot b", from, Duration::from_secs(60))?;
    let system = api.expect(200, "GET", "/system", &Value::Null)?;
    check(system["state"] == "committed", || format!("after the commit: {system}"))?;
    power_down(&mut m)?;
    Ok(upgrade_secs)
}

/// On the committed slot B, stage a broken image into A and reboot: each try panics, then
/// systemd-boot boots B again, data intact.
fn fallback(run: &mut Run, disk: &Path, id: &str, broken: &Path, good_version: &str) -> Result<()> {
    let mut m = run.boot("fallback: slot B", disk, DiskFormat::Raw, Network::Outbound)?;
    let staged = stage(&m.api(), &run.key, broken, Upload::Raw)?;
    check(staged["slot"] == "a", || format!("broken image staged: {staged}"))?;
    let from =
        reboot(run, &mut m, RebootBy::Keyboard, "fallback: broken slot A tried, back on B", Duration::from_secs(1800))?;
    let panics = m.console()[from..].matches("Kernel panic").count();
    check(panics == boot_disk::entry::DEFAULT_TRIES as usize, || {
        format!("expected {} panicking tries of the broken image, saw {panics}", boot_disk::entry::DEFAULT_TRIES)
    })?;
    let api = Api::new(m.api(), &run.key);
    let system = expect_committed(&api, "b", good_version, "after the fallback")?;
    check(system["staged"]["state"] == "failed", || format!("the broken upgrade is not reported as failed: {system}"))?;
    data_intact(&api, id)?;
    power_down(&mut m)
}

/// On slot A, the power is cut while a staged image is being installed into slot B (reboot,
/// power-off and a second upgrade are refused with 409 meanwhile): the next boot is slot A,
/// committed, nothing staged, the upload removed, data intact.
fn power_cut_while_installing(run: &mut Run, disk: &Path, id: &str, image: &Path, base: &str) -> Result<()> {
    let mut m = run.boot("power cut while installing: slot A", disk, DiskFormat::Raw, Network::Outbound)?;
    let from = m.console().len();
    // The second upgrade below is signed, so that it is its timing that is refused.
    let signature = signature_of(image)?;
    let (endpoint, key, image) = (m.api(), run.key.clone(), image.to_path_buf());
    let staging = std::thread::spawn(move || stage(&endpoint, &key, &image, Upload::Gzip));
    m.wait_for_console("upgrade image received", from, UPLOAD_TIMEOUT)?;
    let received = Instant::now();
    // While it installs, power requests and a second upgrade are refused, not queued.
    let api = Api::new(m.api(), &run.key);
    for path in ["/system/reboot", "/system/poweroff", "/system/upgrade"] {
        let (status, answer) = if path == "/system/upgrade" {
            let headers = [("X-API-Key", run.key.as_str()), (boot_disk::signature::HEADER, signature.as_str())];
            let resp =
                image::http::request(&m.api(), "POST", "/api/system/upgrade", &headers, b"", Duration::from_secs(60))?;
            (resp.status, serde_json::from_slice(&resp.body).unwrap_or(Value::Null))
        } else {
            api.call("POST", path, &Value::Null)?
        };
        let said = answer["error"].as_str().unwrap_or("");
        check(status == 409 && said.contains("upgrade is being staged"), || {
            format!("POST {path} while installing: {status} {answer}")
        })?;
    }
    // Into the copy of the system partition (it takes tens of seconds under emulation).
    std::thread::sleep(Duration::from_secs(5).saturating_sub(received.elapsed()));
    m.kill();
    let cut = staging.join().map_err(|_| err!("the staging thread panicked"))?;
    check(cut.is_err(), || format!("the staging finished before the power cut: {cut:?}"))?;
    let mut m = run.boot("power cut while installing: next boot", disk, DiskFormat::Raw, Network::Outbound)?;
    m.wait_for_console("removed an interrupted upgrade upload", 0, Duration::from_secs(5))?;
    let api = Api::new(m.api(), &run.key);
    let system = expect_committed(&api, "a", base, "after the power cut")?;
    check(system["staged"].is_null(), || format!("a half-installed slot is offered for booting: {system}"))?;
    data_intact(&api, id)?;
    power_down(&mut m)
}

/// On the committed slot B, stage an image whose API never answers healthy into A and reboot:
/// on each try init's watchdog reboots after TRIAL_SECS, then systemd-boot boots B again.
fn watchdog_fallback(run: &mut Run, disk: &Path, id: &str, unhealthy: &Path, good_version: &str) -> Result<()> {
    let mut m = run.boot("watchdog: slot B", disk, DiskFormat::Raw, Network::Outbound)?;
    let staged = stage(&m.api(), &run.key, unhealthy, Upload::Gzip)?;
    check(staged["slot"] == "a", || format!("unhealthy image staged: {staged}"))?;
    let timeout = Duration::from_secs(600 + 3 * TRIAL_SECS);
    let from = reboot(run, &mut m, RebootBy::Api, "watchdog: unhealthy slot A tried, back on B", timeout)?;
    let tail = &m.console()[from..];
    let missing = tail.matches("DATA DISK MISSING").count();
    let gave_up =
        tail.matches(&format!("UPGRADE FAILED: the API did not answer healthy within {TRIAL_SECS}s on slot a")).count();
    let tries = boot_disk::entry::DEFAULT_TRIES as usize;
    check(missing == tries && gave_up == tries, || {
        format!("expected {tries} unhealthy tries each ended by the watchdog; saw {missing} data-disk reports and {gave_up} watchdog reboots")
    })?;
    let api = Api::new(m.api(), &run.key);
    let system = expect_committed(&api, "b", good_version, "after the watchdog fallback")?;
    check(system["staged"]["state"] == "failed", || {
        format!("the unhealthy upgrade is not reported as failed: {system}")
    })?;
    data_intact(&api, id)?;
    power_down(&mut m)
}

impl Run {
    /// Boots `disk` under UEFI alone and waits for the API; records the time to API ready.
    fn boot(&mut self, what: &str, disk: &Path, format: DiskFormat, network: Network) -> Result<Machine> {
        let (accel, why) = qemu::detect_accel();
        let run_dir = self.dir.join("run");
        let _ = std::fs::remove_file(run_dir.join("console.log"));
        eprintln!(
            "[qemu-test] {what}: booting {} ({accel:?}: {why}); console: {}",
            disk.display(),
            run_dir.join("console.log").display()
        );
        let cfg = MachineConfig {
            tpm_state: None,
            boot: Boot::Disk { image: disk.to_path_buf(), format },
            network,
            memory_mib: 3072,
            cpus: std::env::var("OC_QEMU_CPUS").ok().and_then(|c| c.parse().ok()).unwrap_or(qemu::default_cpus(accel)),
            api_port: qemu::free_port(0)?,
            // The configuration file gives the appliance this address.
            api_guest_addr: Some(STATIC_IP),
            // The key comes from the configuration file on the EFI partition, not fw_cfg.
            admin_key_file: None,
            plain_http: false,
            proxy_config_file: None,
            run_dir,
            accel,
        };
        let started = Instant::now();
        let mut machine = Machine::start(&cfg)?;
        machine
            .wait_api_ready(BOOT_TIMEOUT, &|| false)
            .map_err(|e| err!("{what}: {e}\nlast console lines:\n{}", machine.console_tail(40)))?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!("[qemu-test] {what}: API ready after {secs:.1}s");
        self.times.push((format!("{what}: boot to API ready"), secs));
        Ok(machine)
    }
}

fn power_down(machine: &mut Machine) -> Result<()> {
    let status = machine.power_down(SHUTDOWN_TIMEOUT)?;
    check(status.success(), || format!("QEMU exited with {status}"))?;
    machine.wait_for_console("/data unmounted cleanly", 0, Duration::from_secs(1)).map(|_| ())
}

fn size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).ctx(|| format!("stat {}", path.display()))?.len())
}

fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path).ctx(|| format!("stat {}", path.display()))?.blocks() * 512)
}

//! `GET /api/system` (running slot, version, staged upgrade, capacity), `POST /api/system/upgrade`
//! (the raw body is a disk image built by `image build --disk`; it is staged into the slot
//! that is not running and boots on the next reboot, see crate::upgrade), and
//! `POST /api/system/reboot` / `poweroff`, and `POST /api/system/master-key/rotate`.

use std::time::Duration;

use serde_json::json;
use tiny_http::Request;

use crate::app::App;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::upgrade::{inspect, install, receive, signature, status};

/// Far above a real image (~1 GiB raw), far below a data disk.
pub const MAX_IMAGE_BYTES: u64 = 16 << 30;

/// The boot/upgrade status plus `capacity` (memory, vCPUs and disk: what sandboxes may commit,
/// what they hold, what is free).
pub fn get(app: &App) -> Reply {
    let mut report = status::report();
    if let Some(fields) = report.as_object_mut() {
        fields.insert("capacity".into(), app.capacity.report());
    }
    Reply::json(200, &report)
}

pub fn upgrade(app: &App, request: &mut Request) -> Result<Reply, AppError> {
    // Before anything else: an image nobody trusted signing is not even received.
    let signed = app.upgrades.trusted.verify(crate::http::request::header(request, boot_disk::signature::HEADER))?;
    let Some((running, _, _)) = status::boot_state() else {
        return Err(AppError::unavailable("upgrades need an appliance booted from the disk image (no A/B slots here)"));
    };
    if request.body_length().is_some_and(|n| n as u64 > MAX_IMAGE_BYTES) {
        return Err(AppError::too_large(format!("an image larger than {MAX_IMAGE_BYTES} bytes is refused")));
    }
    let Some(_guard) = app.upgrades.try_lock() else {
        return Err(AppError::conflict("another upgrade is being staged"));
    };
    let dir = app.upgrades.dir();
    std::fs::create_dir_all(dir).map_err(|e| AppError::internal(format!("create {}: {e}", dir.display())))?;
    let gzip = match crate::http::request::header(request, "Content-Encoding").map(|v| v.trim().to_ascii_lowercase()) {
        None => false,
        Some(v) if v == "identity" => false,
        Some(v) if v == "gzip" => true,
        Some(other) => {
            return Err(AppError::new(415, format!("Content-Encoding {other:?} is not supported: send the raw image, or gzip it with Content-Encoding: gzip")));
        }
    };
    let staging = app.upgrades.staging_file();
    let started = std::time::Instant::now();
    // The image is checked and hashed as it was built (uncompressed); the size limit applies to
    // it too, so a small gzip bomb is refused like a large image.
    let mut gunzip;
    let body: &mut dyn std::io::Read = if gzip {
        gunzip = flate2::read::MultiGzDecoder::new(request.as_reader());
        &mut gunzip
    } else {
        request.as_reader()
    };
    let (bytes, sha256) = receive::receive(body, &staging, MAX_IMAGE_BYTES).map_err(|e| match e {
        receive::ReceiveError::TooLarge(limit) => {
            AppError::too_large(format!("an image larger than {limit} bytes is refused"))
        }
        receive::ReceiveError::Read(e) => AppError::bad_request(format!("cannot read the uploaded image: {e}")),
        receive::ReceiveError::Write(e) => AppError::internal(format!("cannot store the uploaded image: {e}")),
    })?;
    let received = started.elapsed();
    println!(
        "appliance: upgrade image received ({bytes} bytes in {:.1}s); checking it and installing it into the other slot",
        received.as_secs_f64()
    );
    // The staging file goes whatever happens next: it is the only thing written to the data disk.
    let result = signature::check_digest(&signed, &sha256)
        .and_then(|()| {
            inspect::inspect(&staging)
                .map_err(|e| AppError::new(422, format!("not an installable OpenComputer disk image: {e}")))
        })
        .and_then(|candidate| {
            let installed = install::install(&staging, &candidate, running).map_err(|e| match e {
                install::InstallError::Conflict(m) => AppError::conflict(m),
                install::InstallError::Failed(m) => AppError::internal(format!("staging the upgrade failed: {m}")),
            })?;
            Ok((candidate, installed))
        });
    let _ = std::fs::remove_file(&staging);
    let (candidate, installed) = result?;
    println!(
        "appliance: upgrade to {} staged in slot {} as {} (sha256 {sha256}, signed by {}, {bytes} bytes received in {:.1}s, installed in {:.1}s)",
        candidate.version,
        installed.slot,
        installed.entry,
        signed.key.get(..16).unwrap_or_default(),
        received.as_secs_f64(),
        started.elapsed().saturating_sub(received).as_secs_f64()
    );
    Ok(Reply::json(
        200,
        &json!({
            "sha256": sha256,
            "signedBy": signed.key,
            "bytes": bytes,
            "version": candidate.version,
            "slot": installed.slot.letter(),
            "entry": installed.entry,
            "from": candidate.entry_name,
            "state": "staged",
            "receiveSeconds": received.as_secs_f64(),
            "installSeconds": started.elapsed().saturating_sub(received).as_secs_f64(),
        }),
    ))
}

#[derive(Clone, Copy, Debug)]
pub enum PowerAction {
    Reboot,
    PowerOff,
}

/// Time for the 202 answer to reach the client before services are stopped.
const POWER_DELAY: Duration = Duration::from_millis(500);

/// `POST /api/system/reboot` and `/api/system/poweroff`: asks oc-init (PID 1), which stops the
/// services, syncs and unmounts the data disk, then reboots or powers off.
pub fn power(app: &App, action: PowerAction) -> Result<Reply, AppError> {
    if !app.power_control {
        return Err(AppError::unavailable(
            "this appliance process does not control the machine's power (it was not started by the appliance's init)",
        ));
    }
    // A reboot would cut a staging short (which install survives, but the upload is lost).
    if app.upgrades.try_lock().is_none() {
        return Err(AppError::conflict("an upgrade is being staged; try again when it has finished"));
    }
    let (signal, state) = match action {
        PowerAction::Reboot => (libc::SIGUSR1, "rebooting"),
        PowerAction::PowerOff => (libc::SIGUSR2, "powering off"),
    };
    println!("appliance: {state} on request");
    let spawned = std::thread::Builder::new().name("power".into()).spawn(move || {
        std::thread::sleep(POWER_DELAY);
        // SAFETY: kill(2) sends a signal PID 1 (oc-init) handles as a reboot or power-off
        // request; it touches no memory of ours.
        if unsafe { libc::kill(1, signal) } != 0 {
            println!("appliance: cannot signal init: {}", std::io::Error::last_os_error());
        }
    });
    spawned.map_err(|e| AppError::internal(format!("cannot start the power request: {e}")))?;
    Ok(Reply::json(202, &json!({"state": state})))
}

/// `POST /api/system/master-key/rotate`: a fresh master key, kept where the current one is (the
/// TPM, the ESP or the data directory), with every secret, CA key and running sandbox's stored
/// tokens re-encrypted under it in one store transaction. Requests keep being served; a crash
/// midway is finished at the next start.
pub fn rotate_master_key(app: &App) -> Result<Reply, AppError> {
    let Some(keys) = &app.master_keys else {
        return Err(AppError::conflict(
            "the master key is the operator's file (--master-key-file): rotate it offline with \
             `appliance rotate-key --master-key-file OLD --new-master-key-file NEW`",
        ));
    };
    // One rotation at a time; an upgrade being staged is left alone too (both change the ESP).
    let Some(_guard) = app.upgrades.try_lock() else {
        return Err(AppError::conflict(
            "an upgrade or another key rotation is running; try again when it has finished",
        ));
    };
    let started = std::time::Instant::now();
    let report = crate::master_key::rotate(keys, &app.store, &app.keyring)
        .map_err(|e| AppError::internal(format!("master key rotation failed: {e}")))?;
    println!(
        "appliance: master key rotated to {} ({}): {} secret(s) and {} CA key(s) re-encrypted in {:.0} ms",
        report.new_key_id,
        keys.name(),
        report.secrets,
        report.ca_keys,
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(Reply::json(
        200,
        &json!({
            "keyId": report.new_key_id,
            "store": keys.name(),
            "secrets": report.secrets,
            "caKeys": report.ca_keys,
        }),
    ))
}

//! Files through the API stream: a large file goes into a sandbox and back with the appliance's
//! peak resident memory (`VmHWM`, from /metrics) moving by no more than a bounded buffer's worth.
//!
//! The suite moves 256 MiB, four times what the appliance's memory may grow by, which is what
//! shows the transfer is streamed. `OC_E2E_FILE_MIB=2048` moves the 2 GiB; under this
//! machine's emulation that takes about 17 minutes (the upload ran at 4 MiB/s), too long for CI.

use crate::api::{metric, Api};
use crate::check::check;
use crate::harness::{Appliance, Scenario};
use image::err;
use image::error::Result;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const SCENARIOS: &[Scenario] = &[Scenario {
    name: "a large file goes into a sandbox and back through the API with the appliance's memory flat",
    run: large_file_round_trip,
}];

/// The file's size unless `OC_E2E_FILE_MIB` says otherwise.
const DEFAULT_FILE_MIB: usize = 256;

fn file_bytes() -> usize {
    std::env::var("OC_E2E_FILE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_FILE_MIB) << 20
}
/// What the appliance's peak resident memory may grow by over both transfers: its pipes hold a
/// few MiB; allocator and thread stacks take some more.
const MAX_PEAK_GROWTH: f64 = 64.0 * 1024.0 * 1024.0;

/// Bytes that are not all alike (a file of zeros could be shortcut anywhere on its way).
fn pattern(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn peak(api: &Api) -> Result<f64> {
    let text = api.metrics()?;
    metric(&text, "process_resident_memory_peak_bytes").ok_or_else(|| err!("/metrics has no peak resident memory"))
}

/// The appliance's resident memory now, from /metrics.
fn resident(api: &Api) -> Option<f64> {
    api.metrics().ok().and_then(|text| metric(&text, "process_resident_memory_bytes"))
}

fn large_file_round_trip(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.api();
    let sampler_api = appliance.api();
    let sandbox = api.expect(201, "POST", "/sandboxes", &json!({"diskMB": 4096, "timeout": 0}))?;
    let id = sandbox["sandboxID"].as_str().ok_or_else(|| err!("no sandboxID in {sandbox}"))?.to_string();
    let before = peak(&api)?;
    let resident_before = resident(&api).ok_or_else(|| err!("/metrics has no resident memory"))?;
    let done = AtomicBool::new(false);
    let (outcome, most_resident) = std::thread::scope(|scope| {
        // Samples the appliance's resident memory twice a second while the file moves.
        let sampler = scope.spawn(|| {
            let mut most = resident_before;
            while !done.load(Ordering::Relaxed) {
                most = most.max(resident(&sampler_api).unwrap_or(0.0));
                std::thread::sleep(Duration::from_millis(500));
            }
            most
        });
        let result = transfers(&api, &id);
        done.store(true, Ordering::Relaxed);
        (result, sampler.join().unwrap_or(f64::NAN))
    });
    // The sandbox goes either way: its 4 GiB disk must not outlive a failure.
    api.expect(204, "DELETE", &format!("/sandboxes/{id}"), &serde_json::Value::Null)?;
    let (upload, download) = outcome?;
    let size_mib = file_bytes() >> 20;
    let after = peak(&api)?;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    eprintln!(
        "[qemu-test]   {size_mib} MiB up in {:.1}s ({:.1} MiB/s), down in {:.1}s ({:.1} MiB/s); appliance RSS {:.1} MiB before, at most {:.1} MiB during (sampled twice a second); peak RSS {:.1} -> {:.1} MiB",
        upload.as_secs_f64(),
        size_mib as f64 / upload.as_secs_f64(),
        download.as_secs_f64(),
        size_mib as f64 / download.as_secs_f64(),
        mib(resident_before),
        mib(most_resident),
        mib(before),
        mib(after)
    );
    check(after - before <= MAX_PEAK_GROWTH, || {
        format!("the appliance's peak resident memory grew by {:.1} MiB over the transfers", mib(after - before))
    })?;
    Ok(())
}

/// Uploads the file, checks its size in the sandbox, downloads it and compares; answers how
/// long each way took.
fn transfers(api: &Api, id: &str) -> Result<(Duration, Duration)> {
    let bytes = file_bytes();
    let data = pattern(bytes);
    let started = Instant::now();
    let (status, answer) = api.raw("PUT", &format!("/sandboxes/{id}/files?path=/root/big.bin"), &data)?;
    check(status == 204, || format!("PUT of {bytes} bytes answered {status}: {}", String::from_utf8_lossy(&answer)))?;
    let upload = started.elapsed();
    let size =
        api.expect(200, "POST", &format!("/sandboxes/{id}/exec/run"), &json!({"cmd": "stat -c %s /root/big.bin"}))?;
    check(size["stdout"] == json!(format!("{bytes}\n")), || format!("the sandbox has {size}"))?;

    let started = Instant::now();
    let (status, back) = api.raw("GET", &format!("/sandboxes/{id}/files?path=/root/big.bin"), &[])?;
    let download = started.elapsed();
    check(status == 200, || format!("GET of {bytes} bytes answered {status}"))?;
    check(back.len() == data.len() && back == data, || {
        format!("{} bytes came back for {}; equal: {}", back.len(), data.len(), back == data)
    })?;
    Ok((upload, download))
}

//! The appliance without its data disk: init could not mount it (the reason is in
//! init_handoff::DATA_PROBLEM_FILE), so /data is a directory in RAM and anything written there
//! would vanish at the next reboot. Rather than accept such writes, every route answers 503
//! naming the problem, and so does /api/healthz: a trial boot of an upgrade that cannot reach
//! its data is never committed (init's watchdog reboots it and the boot loader falls back).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use crate::error::AppError;
use crate::http::reply::Reply;

/// Why `data_dir` cannot hold the appliance's data, or None when it is a mounted filesystem.
pub fn data_dir_problem(data_dir: &Path) -> Option<String> {
    let parent = data_dir.parent().unwrap_or(Path::new("/"));
    let mounted = match (std::fs::metadata(data_dir), std::fs::metadata(parent)) {
        // A mount point lives on another device than its parent directory.
        (Ok(dir), Ok(up)) => dir.dev() != up.dev(),
        _ => false,
    };
    if mounted {
        return None;
    }
    let from_init = std::fs::read_to_string(init_handoff::DATA_PROBLEM_FILE)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let why = from_init.unwrap_or_else(|| format!("{} is not a mounted filesystem", data_dir.display()));
    Some(format!(
        "the data disk is not available ({why}); nothing can be stored until it is fixed, see the appliance console"
    ))
}

/// Answers every request with 503 and `reason` until SIGTERM or SIGINT.
pub fn serve_until_terminated(listen: &str, reason: &str) -> Result<(), String> {
    let server = Arc::new(tiny_http::Server::http(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?);
    println!("appliance: DATA DISK MISSING: {reason}; every route answers 503 until it is fixed");
    if let Some(addr) = server.server_addr().to_ip() {
        println!("appliance: listening on http://{addr}");
    }
    let answering = {
        let server = Arc::clone(&server);
        let error = AppError::unavailable(reason);
        std::thread::spawn(move || {
            for request in server.incoming_requests() {
                // A client that hung up cannot be answered; nothing else to do.
                let _ = request.respond(Reply::error(&error).into_response());
            }
        })
    };
    let signal = crate::signals::wait_for_termination();
    println!("appliance: {signal} received; exiting");
    server.unblock();
    let _ = answering.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_not_a_data_disk_but_a_mount_point_is() {
        let dir = std::env::temp_dir().join(format!("oc-degraded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create dir");
        let problem = data_dir_problem(&dir).expect("a plain directory is refused");
        assert!(
            problem.contains("data disk is not available") && problem.contains("see the appliance console"),
            "{problem}"
        );
        let _ = std::fs::remove_dir(&dir);
        // /proc is always its own filesystem.
        assert_eq!(data_dir_problem(Path::new("/proc")), None);
    }
}

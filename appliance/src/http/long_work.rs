//! Requests that may take long (a command run to completion, an attached session, a file
//! transfer, a boot, a memory dump, an upgrade upload) each get a thread of their own, so the
//! fixed pool of request workers only ever serves short work and `/api/healthz` stays fast
//! whatever is in flight. The number of such threads is capped; beyond the cap the request is
//! refused at once with 503 rather than queued behind work of unknown length.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::AppError;

/// Enough for hundreds of concurrent commands; each thread costs little memory while it waits.
pub const MAX_LONG_REQUESTS: usize = 1024;

pub struct LongWork {
    in_flight: Arc<AtomicUsize>,
    limit: usize,
}

/// One admitted long request; frees its place when dropped, however its thread ends.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LongWork {
    pub fn new(limit: usize) -> Self {
        Self { in_flight: Arc::new(AtomicUsize::new(0)), limit }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Takes a place for one long request, or refuses if `limit` are already running.
    pub fn admit(&self) -> Result<Slot, AppError> {
        let taken =
            self.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.limit).then_some(n + 1));
        match taken {
            Ok(_) => Ok(Slot(Arc::clone(&self.in_flight))),
            Err(n) => Err(AppError::unavailable(format!(
                "too many long-running requests in flight ({n} of {}); try again shortly",
                self.limit
            ))),
        }
    }
}

impl Slot {
    /// Runs `work` on a new thread that holds this place until it ends.
    pub fn run(self, name: &str, work: impl FnOnce() + Send + 'static) {
        let started = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            let _slot = self;
            work();
        });
        // If the OS cannot start a thread, the closure (and the request in it) is dropped and
        // tiny_http answers 500 for a request dropped unanswered.
        if let Err(e) = started {
            eprintln!("appliance: cannot start a thread for a long request: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn refuses_beyond_the_limit_and_frees_slots_when_work_ends() {
        let pool = LongWork::new(2);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        for _ in 0..2 {
            let rx = Arc::clone(&release_rx);
            pool.admit().expect("admitted").run("t", move || {
                let _ = rx.lock().map(|r| r.recv());
            });
        }
        let Err(e) = pool.admit() else { panic!("third request admitted") };
        assert_eq!(e.status, 503);
        assert!(e.message.contains("2 of 2"), "{}", e.message);
        release_tx.send(()).expect("send");
        release_tx.send(()).expect("send");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.in_flight() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pool.in_flight(), 0);
        assert!(pool.admit().is_ok());
    }
}

//! Stopping every vCPU outside KVM_RUN, each having saved its own state, and letting them go on.
//!
//! A vCPU thread checks [`Pause::requested`] before every KVM_RUN. One blocked inside KVM_RUN
//! (a halted guest CPU waits there) is kicked out with a signal whose handler does nothing:
//! KVM_RUN then returns EINTR. A kick that lands just before a thread enters KVM_RUN is lost,
//! so the kicks repeat until every thread has parked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::vcpu_state::VcpuState;

/// How often unparked vCPUs are kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

/// The real-time signal that interrupts KVM_RUN (glibc keeps the first two for itself, which
/// `SIGRTMIN()` already skips).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the do-nothing handler (without SA_RESTART, so KVM_RUN is interrupted, not resumed).
pub fn install_kick_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid; the handler
    // is async-signal-safe (it does nothing).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&raw mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &raw const sa, std::ptr::null_mut()) < 0 {
            return Err(format!("cannot install the vCPU kick handler: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

struct Parking {
    /// Each vCPU thread's kernel thread id, once it started.
    tids: Vec<Option<libc::pid_t>>,
    /// What each parked vCPU saved; `None` while it still runs.
    saved: Vec<Option<Result<VcpuState, String>>>,
    /// Bumped by every resume: a parked thread waits for it to change.
    generation: u64,
}

pub struct Pause {
    requested: AtomicBool,
    pid: libc::pid_t,
    parking: Mutex<Parking>,
    changed: Condvar,
}

impl Pause {
    pub fn new(vcpus: usize) -> Pause {
        Pause {
            requested: AtomicBool::new(false),
            // SAFETY: getpid has no preconditions.
            pid: unsafe { libc::getpid() },
            parking: Mutex::new(Parking {
                tids: vec![None; vcpus],
                saved: (0..vcpus).map(|_| None).collect(),
                generation: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// Called on each vCPU thread before it confines itself (gettid is not in its filter).
    pub fn register(&self, id: u8) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if let Ok(mut p) = self.parking.lock() {
            if let Some(slot) = p.tids.get_mut(id as usize) {
                *slot = Some(tid);
            }
        }
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// On a vCPU thread: hands over what it saved and waits until the pause ends.
    pub fn park(&self, id: u8, saved: Result<VcpuState, String>) {
        let Ok(mut p) = self.parking.lock() else { return };
        let generation = p.generation;
        if let Some(slot) = p.saved.get_mut(id as usize) {
            *slot = Some(saved);
        }
        self.changed.notify_all();
        while p.generation == generation {
            p = match self.changed.wait(p) {
                Ok(p) => p,
                Err(_) => return,
            };
        }
    }

    /// Stops every vCPU and returns their states in id order. On failure (a vCPU could not
    /// save its state, or did not stop within `limit`) the vCPUs run on and the error says why.
    pub fn pause_all(&self, limit: Duration) -> Result<Vec<VcpuState>, String> {
        self.requested.store(true, Ordering::Release);
        let deadline = Instant::now() + limit;
        let mut p = self.parking.lock().map_err(|_| "vCPU parking lock poisoned".to_string())?;
        while p.saved.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                let missing = p.saved.iter().filter(|s| s.is_none()).count();
                drop(p);
                self.resume();
                return Err(format!("{missing} vCPU(s) did not stop within {} ms", limit.as_millis()));
            }
            for (tid, saved) in p.tids.iter().zip(&p.saved) {
                if let (Some(tid), None) = (tid, saved) {
                    // SAFETY: tgkill sends a signal to one thread of this very process; an id of
                    // a thread that has ended only makes the call fail (ESRCH).
                    unsafe { libc::syscall(libc::SYS_tgkill, self.pid, *tid, kick_signal()) };
                }
            }
            p = match self.changed.wait_timeout(p, KICK_INTERVAL) {
                Ok((p, _)) => p,
                Err(_) => return Err("vCPU parking lock poisoned".into()),
            };
        }
        // The vCPUs stay parked (waiting for the generation to change) until `resume`.
        let saved: Vec<Result<VcpuState, String>> = p.saved.iter_mut().filter_map(Option::take).collect();
        let mut states = Vec::with_capacity(saved.len());
        let mut error = None;
        for s in saved {
            match s {
                Ok(state) => states.push(state),
                Err(e) => error = error.or(Some(e)),
            }
        }
        drop(p);
        match error {
            Some(e) => {
                self.resume();
                Err(e)
            }
            None => Ok(states),
        }
    }

    /// Lets every parked vCPU run on.
    pub fn resume(&self) {
        self.requested.store(false, Ordering::Release);
        if let Ok(mut p) = self.parking.lock() {
            p.saved.iter_mut().for_each(|s| *s = None);
            p.generation += 1;
        }
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Threads that play vCPUs: spin until asked to pause, then park with a marker error
    /// (building a real VcpuState needs KVM), and count how often they ran on afterwards.
    #[test]
    fn every_thread_parks_and_runs_on_after_resume() {
        install_kick_handler().unwrap();
        let pause = Arc::new(Pause::new(3));
        let laps = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..3u8)
            .map(|id| {
                let (pause, laps, stop) = (pause.clone(), laps.clone(), stop.clone());
                std::thread::spawn(move || {
                    pause.register(id);
                    while !stop.load(Ordering::Acquire) {
                        if pause.requested() {
                            pause.park(id, Err(format!("vcpu {id} parked")));
                            continue;
                        }
                        laps.fetch_add(1, Ordering::Relaxed);
                        // A blocking call like KVM_RUN: a kick interrupts it.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        let err = pause.pause_all(Duration::from_secs(5)).unwrap_err();
        assert!(err.starts_with("vcpu ") && err.ends_with(" parked"), "{err}");
        // pause_all resumed them after the error: they run on.
        let before = laps.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert!(laps.load(Ordering::Relaxed) > before);
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_thread_that_never_parks_times_out_and_the_rest_run_on() {
        let pause = Pause::new(1);
        let err = pause.pause_all(Duration::from_millis(30)).unwrap_err();
        assert_eq!(err, "1 vCPU(s) did not stop within 30 ms");
        assert!(!pause.requested());
    }
}

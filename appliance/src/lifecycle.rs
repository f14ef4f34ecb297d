//! The sandbox side as the control plane holds it: the runtime and the seal publisher it was
//! wired with (or why there is none), and the running sandboxes with their `endAt`, which is
//! the reaper's work list, and what each one was registered with at the sealing proxy
//! (`seal_sync`), and which sandboxes are changing state (a hibernation, a wake, a stop), so
//! that such changes of one sandbox happen one at a time. The operations on sandboxes are in
//! `sandbox_ops` and `hibernation`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::error::AppError;
use crate::runtime::{RuntimeError, SandboxRuntime};
use crate::seal::SealPublisher;
use crate::seal_sync::SealBook;

/// The sandbox side, as wired by the embedding binary.
#[derive(Clone)]
pub struct Backend {
    pub runtime: Arc<dyn SandboxRuntime>,
    pub publisher: Arc<dyn SealPublisher>,
    /// The sealing proxy's egress decisions and traffic, for `/metrics`.
    pub egress: Arc<proxy::egress_log::EgressCounters>,
}

pub struct Lifecycle {
    backend: Option<Backend>,
    unavailable_reason: String,
    /// Running sandboxes and their deadlines, the reaper's work list.
    live: Mutex<HashMap<String, Deadline>>,
    /// Running sandboxes' projects and tokens, to re-publish them when secrets change.
    seals: SealBook,
    transitions: Arc<Transitions>,
}

/// Sandboxes whose state is being changed (hibernated, woken, stopped, restarted).
#[derive(Default)]
struct Transitions {
    held: Mutex<HashSet<String>>,
    released: Condvar,
}

/// The right to change one sandbox's state, until dropped. Owned (no borrow), so the reaper can
/// hand it to the thread that hibernates the sandbox.
pub struct Transition {
    transitions: Arc<Transitions>,
    id: String,
}

impl Drop for Transition {
    fn drop(&mut self) {
        // The set stays consistent whatever panicked while holding its lock (single inserts and
        // removals), so a poisoned lock is still usable.
        self.transitions.held.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
        self.transitions.released.notify_all();
    }
}

/// A running sandbox's deadline and, for an idle timeout, what activity renews it to.
struct Deadline {
    end_at: i64,
    idle_sec: Option<u64>,
    /// Requests using the sandbox right now (a command, a transfer, an attached stream): an idle
    /// timeout does not stop a sandbox while it works for a client.
    busy: u32,
}

/// A request using a sandbox; dropping it ends the use and renews the idle timeout from then.
pub struct InUse<'a> {
    lifecycle: &'a Lifecycle,
    id: String,
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.lifecycle.live.lock() {
            if let Some(d) = m.get_mut(&self.id) {
                d.busy = d.busy.saturating_sub(1);
            }
        }
        self.lifecycle.touch(&self.id, crate::clock::now_unix());
    }
}

pub fn runtime_error(err: RuntimeError) -> AppError {
    match err {
        RuntimeError::NotFound(m) => AppError::not_found(m),
        RuntimeError::Invalid(m) => AppError::bad_request(m),
        RuntimeError::Conflict(m) => AppError::conflict(m),
        RuntimeError::Failed(m) => AppError::internal(format!("sandbox runtime: {m}")),
        // The upstream (the guest) failed, not the appliance.
        RuntimeError::Guest(m) => AppError::bad_gateway(m),
        // 507 Insufficient Storage: the request was fine, the sandbox's disk is not.
        RuntimeError::NoSpace(m) => AppError::new(507, format!("the sandbox's disk is full: {m}")),
    }
}

impl Lifecycle {
    pub fn new(backend: Option<Backend>, unavailable_reason: impl Into<String>) -> Self {
        Self {
            backend,
            unavailable_reason: unavailable_reason.into(),
            live: Mutex::new(HashMap::new()),
            seals: SealBook::new(),
            transitions: Arc::default(),
        }
    }

    /// Waits until no other state change of sandbox `id` is under way, then holds the right to
    /// make one. Bounded by the changes themselves (every runtime call has a deadline).
    pub fn transition(&self, id: &str) -> Transition {
        let t = &self.transitions;
        let mut held = t.held.lock().unwrap_or_else(PoisonError::into_inner);
        while held.contains(id) {
            held = t.released.wait(held).unwrap_or_else(PoisonError::into_inner);
        }
        held.insert(id.to_string());
        Transition { transitions: Arc::clone(t), id: id.to_string() }
    }

    /// Like `transition`, but None at once when a change of `id` is under way.
    pub fn try_transition(&self, id: &str) -> Option<Transition> {
        let t = &self.transitions;
        let mut held = t.held.lock().unwrap_or_else(PoisonError::into_inner);
        if !held.insert(id.to_string()) {
            return None;
        }
        Some(Transition { transitions: Arc::clone(t), id: id.to_string() })
    }

    /// Whether a state change of `id` is under way (a request would wait for it).
    pub fn in_transition(&self, id: &str) -> bool {
        self.transitions.held.lock().unwrap_or_else(PoisonError::into_inner).contains(id)
    }

    pub fn backend(&self) -> Result<&Backend, AppError> {
        self.backend
            .as_ref()
            .ok_or_else(|| AppError::unavailable(format!("sandbox runtime not available: {}", self.unavailable_reason)))
    }

    pub fn seals(&self) -> &SealBook {
        &self.seals
    }

    pub fn running_count(&self) -> usize {
        self.live.lock().map_or(0, |m| m.len())
    }

    /// Tracks a running sandbox until `end_at`, renewed by activity to now + `idle_sec` when
    /// it has an idle timeout.
    pub(crate) fn track(&self, id: &str, end_at: i64, idle_sec: Option<u64>) {
        if let Ok(mut m) = self.live.lock() {
            let busy = m.get(id).map_or(0, |d| d.busy);
            m.insert(id.to_string(), Deadline { end_at, idle_sec: idle_sec.filter(|s| *s > 0), busy });
        }
    }

    /// Sandbox `id` is used by a request until the guard drops: it is not stopped for being idle
    /// meanwhile, and its idle timeout starts again now and when the use ends.
    pub fn in_use(&self, id: &str) -> InUse<'_> {
        let now = crate::clock::now_unix();
        self.touch(id, now);
        if let Ok(mut m) = self.live.lock() {
            if let Some(d) = m.get_mut(id) {
                d.busy = d.busy.saturating_add(1);
            }
        }
        InUse { lifecycle: self, id: id.to_string() }
    }

    /// API activity on sandbox `id`: its idle timeout starts again. In memory only (a write per
    /// request would cost every command a commit); after a restart the adopted sandbox's idle
    /// clock starts again (`sandbox_ops::reconcile_after_start`).
    pub fn touch(&self, id: &str, now: i64) {
        if let Ok(mut m) = self.live.lock() {
            if let Some(d) = m.get_mut(id) {
                if let Some(idle) = d.idle_sec {
                    d.end_at = d.end_at.max(now.saturating_add(i64::try_from(idle).unwrap_or(i64::MAX)));
                }
            }
        }
    }

    /// When a running sandbox will be stopped, as renewed so far.
    pub fn deadline(&self, id: &str) -> Option<i64> {
        self.live.lock().ok().and_then(|m| m.get(id).map(|d| d.end_at))
    }

    pub(crate) fn untrack(&self, id: &str) {
        if let Ok(mut m) = self.live.lock() {
            m.remove(id);
        }
    }

    pub(crate) fn expired(&self, now: i64) -> Vec<String> {
        self.live
            .lock()
            .map(|m| m.iter().filter(|(_, d)| d.end_at <= now && d.busy == 0).map(|(id, _)| id.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether sandbox `id` is tracked, past its deadline and not in use (the reaper's test,
    /// repeated by an idle hibernation once it holds the sandbox's transition).
    pub(crate) fn is_expired(&self, id: &str, now: i64) -> bool {
        self.live.lock().is_ok_and(|m| m.get(id).is_some_and(|d| d.end_at <= now && d.busy == 0))
    }

    pub(crate) fn live_ids(&self) -> Vec<String> {
        self.live.lock().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }
}

pub fn new_id() -> Result<String, AppError> {
    let mut bytes = [0u8; 16];
    crate::crypto::random_bytes(&mut bytes).map_err(|e| AppError::internal(e.to_string()))?;
    Ok(uuid::Builder::from_random_bytes(bytes).into_uuid().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_in_use_is_not_idle_and_its_timeout_starts_again_when_the_use_ends() {
        let lifecycle = Lifecycle::new(None, "test");
        let now = crate::clock::now_unix();
        lifecycle.track("s", now + 60, Some(60));
        let working = lifecycle.in_use("s");
        assert!(lifecycle.expired(now + 3_600).is_empty(), "a command running past the timeout");
        // A timeout set meanwhile keeps the use.
        lifecycle.track("s", now + 10, Some(10));
        assert!(lifecycle.expired(now + 3_600).is_empty());
        drop(working);
        let renewed = lifecycle.deadline("s").expect("tracked");
        assert!(renewed >= now + 10, "{renewed}");
        assert_eq!(lifecycle.expired(now + 3_600), vec!["s".to_string()]);
        // A use of a sandbox that is not tracked (gone, or no deadline) changes nothing.
        drop(lifecycle.in_use("other"));
        assert_eq!(lifecycle.deadline("other"), None);
    }

    #[test]
    fn state_changes_of_one_sandbox_happen_one_at_a_time() {
        let lifecycle = Arc::new(Lifecycle::new(None, "test"));
        let first = lifecycle.transition("s");
        assert!(lifecycle.in_transition("s"));
        assert!(lifecycle.try_transition("s").is_none());
        // Another sandbox is not held up.
        assert!(lifecycle.try_transition("t").is_some());
        let waiter = {
            let lifecycle = Arc::clone(&lifecycle);
            std::thread::spawn(move || drop(lifecycle.transition("s")))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "a second change waits for the first");
        drop(first);
        waiter.join().expect("the waiter ends once the first change is over");
        assert!(!lifecycle.in_transition("s"));
    }
}

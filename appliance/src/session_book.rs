//! What the appliance itself knows about exec sessions, beside what the guest agent lists:
//! when each was started and how many WebSocket clients are attached to it now. Both are
//! observed here rather than asked of the guest, which could claim anything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Sessions remembered per sandbox; the oldest are forgotten beyond it (a sandbox can start
/// sessions without end, the appliance's memory must not follow).
const MAX_PER_SANDBOX: usize = 1024;
/// A session the agent no longer lists is forgotten once it is this old: younger ones may have
/// started after the listing was taken.
const LISTING_GRACE_SEC: i64 = 60;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionFacts {
    /// Unix seconds; None for a session started before this process (e.g. before a restart).
    pub started_at: Option<i64>,
    pub attached_clients: usize,
}

#[derive(Default)]
struct Entry {
    started_at: Option<i64>,
    attached: usize,
}

#[derive(Default)]
pub struct SessionBook {
    sandboxes: Mutex<HashMap<String, HashMap<String, Entry>>>,
}

/// One attached client; dropping it detaches.
pub struct Attached {
    book: Arc<SessionBook>,
    sandbox: String,
    session: String,
}

impl SessionBook {
    pub fn started(&self, sandbox: &str, session: &str, at: i64) {
        let Ok(mut all) = self.sandboxes.lock() else { return };
        let sessions = all.entry(sandbox.to_string()).or_default();
        if sessions.len() >= MAX_PER_SANDBOX && !sessions.contains_key(session) {
            let oldest = sessions
                .iter()
                .filter(|(_, e)| e.attached == 0)
                .min_by_key(|(_, e)| e.started_at.unwrap_or(i64::MIN))
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.entry(session.to_string()).or_default().started_at = Some(at);
    }

    pub fn attach(self: &Arc<Self>, sandbox: &str, session: &str) -> Attached {
        if let Ok(mut all) = self.sandboxes.lock() {
            all.entry(sandbox.to_string()).or_default().entry(session.to_string()).or_default().attached += 1;
        }
        Attached { book: Arc::clone(self), sandbox: sandbox.to_string(), session: session.to_string() }
    }

    /// The facts of each session in `listed` (what the agent lists now); forgets the ones it
    /// no longer lists.
    pub fn facts(&self, sandbox: &str, listed: &[&str], now: i64) -> HashMap<String, SessionFacts> {
        let Ok(mut all) = self.sandboxes.lock() else { return HashMap::new() };
        let Some(sessions) = all.get_mut(sandbox) else { return HashMap::new() };
        sessions.retain(|id, e| {
            listed.contains(&id.as_str()) || e.attached > 0 || e.started_at.is_some_and(|t| now - t < LISTING_GRACE_SEC)
        });
        listed
            .iter()
            .filter_map(|id| {
                sessions
                    .get(*id)
                    .map(|e| (id.to_string(), SessionFacts { started_at: e.started_at, attached_clients: e.attached }))
            })
            .collect()
    }

    /// The sandbox is gone, and its sessions with it.
    pub fn forget_sandbox(&self, sandbox: &str) {
        if let Ok(mut all) = self.sandboxes.lock() {
            all.remove(sandbox);
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let Ok(mut all) = self.book.sandboxes.lock() else { return };
        if let Some(entry) = all.get_mut(&self.sandbox).and_then(|s| s.get_mut(&self.session)) {
            entry.attached = entry.attached.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_attachments_and_forgets_sessions_the_agent_no_longer_lists() {
        let book = Arc::new(SessionBook::default());
        book.started("s", "1", 1_000);
        book.started("s", "2", 1_000);
        let first = book.attach("s", "1");
        let second = book.attach("s", "1");
        let facts = book.facts("s", &["1", "2"], 1_010);
        assert_eq!(facts["1"], SessionFacts { started_at: Some(1_000), attached_clients: 2 });
        assert_eq!(facts["2"].attached_clients, 0);
        drop(first);
        assert_eq!(book.facts("s", &["1"], 1_010)["1"].attached_clients, 1);
        drop(second);
        // Session 2 is no longer listed; young, it is kept a while, then forgotten.
        assert!(book.facts("s", &["2"], 1_010).contains_key("2"));
        book.facts("s", &["1"], 1_000 + LISTING_GRACE_SEC);
        assert!(book.facts("s", &["2"], 1_000 + LISTING_GRACE_SEC).is_empty());
        // One the agent lists but this process never started has no start time.
        let _held = book.attach("s", "9");
        assert_eq!(book.facts("s", &["9"], 2_000)["9"], SessionFacts { started_at: None, attached_clients: 1 });
        book.forget_sandbox("s");
        assert!(book.facts("s", &["1"], 2_000).is_empty());
    }

    #[test]
    fn a_sandbox_that_starts_sessions_without_end_is_remembered_within_a_bound() {
        let book = SessionBook::default();
        for i in 0..(MAX_PER_SANDBOX as i64 + 50) {
            book.started("s", &i.to_string(), i);
        }
        let all: Vec<String> = (0..(MAX_PER_SANDBOX + 50)).map(|i| i.to_string()).collect();
        let listed: Vec<&str> = all.iter().map(String::as_str).collect();
        let facts = book.facts("s", &listed, 0);
        assert_eq!(facts.len(), MAX_PER_SANDBOX);
        assert!(!facts.contains_key("0"), "the oldest is forgotten first");
    }
}

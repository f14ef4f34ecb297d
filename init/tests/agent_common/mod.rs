//! Shared setup for the agent host tests: an in-process agent server on a Unix socket in its own
//! temporary directory, with CA paths and a recording power handler inside that directory.
#![allow(dead_code)]

use agent_protocol::{AgentClient, ClientTimeouts, Power};
use init::sandbox::{Agent, AgentConfig, CaPaths};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const FAKE_SYSTEM_ROOTS: &str = "-----BEGIN CERTIFICATE-----\nUk9PVFM=\n-----END CERTIFICATE-----\n";

pub struct TestAgent {
    pub dir: PathBuf,
    pub home: PathBuf,
    pub socket: PathBuf,
    pub ca: CaPaths,
    pub power_requests: Arc<Mutex<Vec<Power>>>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestAgent {
    pub fn start() -> TestAgent {
        TestAgent::start_with(|_| {})
    }

    /// Starts an agent; `adjust` may change the configuration (timeouts, limits).
    pub fn start_with(adjust: impl FnOnce(&mut AgentConfig)) -> TestAgent {
        let dir = std::env::temp_dir().join(format!(
            "oc-agent-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/roots.crt"), FAKE_SYSTEM_ROOTS).unwrap();
        let ca = CaPaths {
            cert: dir.join("usr/local/share/ca-certificates/opencomputer.crt"),
            system_bundle: dir.join("etc/roots.crt"),
            bundle: dir.join("etc/opencomputer/ca-bundle.crt"),
        };
        let power_requests = Arc::new(Mutex::new(Vec::new()));
        let recorder = Arc::clone(&power_requests);
        let mut config = AgentConfig::new(
            &home,
            ca.clone(),
            Arc::new(move |action| {
                recorder.lock().unwrap().push(action);
                Ok(())
            }),
        );
        config.frame_timeout = Duration::from_secs(5);
        config.write_timeout = Duration::from_secs(5);
        adjust(&mut config);
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let agent = Agent::new(config);
        std::thread::spawn(move || agent.serve(listener));
        TestAgent { dir, home, socket, ca, power_requests }
    }

    pub fn raw(&self) -> UnixStream {
        UnixStream::connect(&self.socket).unwrap()
    }

    pub fn client(&self) -> AgentClient<UnixStream> {
        AgentClient::new(self.raw(), ClientTimeouts::default()).unwrap()
    }

    pub fn client_with(&self, timeouts: ClientTimeouts) -> AgentClient<UnixStream> {
        AgentClient::new(self.raw(), timeouts).unwrap()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deterministic bytes covering every value, for binary round trips.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as u8) ^ (i as u8)
        })
        .collect()
}

//! `appliance serve`: opens the data directory, keys and store, configures auth,
//! runs the VMM self-check, reconciles sandboxes and serves HTTPS (or, where the operator
//! turned it on, HTTP) until SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::api::dispatch;
use crate::api_tls::{ApiTls, TlsChoice};
use crate::app::App;
use crate::auth::configure_admin_key;
use crate::capacity::{Capacity, CapacityConfig, Limits};
use crate::crypto::Keyring;
use crate::http::front::ConnectionLimits;
use crate::http::long_work::{LongWork, MAX_LONG_REQUESTS};
use crate::http::server::HttpServer;
use crate::keyfiles::{read_master_key, DataDirLock};
use crate::lifecycle::{Backend, Lifecycle};
use crate::master_key::{self, live::LiveKeyring, Choice, KeyStore};
use crate::metrics::Metrics;
use crate::selfcheck;
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: String,
    /// The API server's own plain-HTTP listener, on loopback only: the public listener relays
    /// to it, and PID 1 health-checks it (`127.0.0.1:0` picks a free port).
    pub loopback_listen: String,
    pub data_dir: PathBuf,
    pub vmm_bin: PathBuf,
    pub admin_key_file: Option<PathBuf>,
    pub master_key_file: Option<PathBuf>,
    /// Where the master key is kept when no `master_key_file` is given.
    pub master_key_store: Choice,
    pub log_requests: bool,
    /// Stopped sandboxes' records are deleted this long after they ended.
    pub stopped_retention: Duration,
    /// Started by oc-init as the system service: may ask PID 1 to reboot or power off.
    pub power_control: bool,
    /// The data directory must be a mounted filesystem (the appliance's data disk); if it is
    /// not, nothing is stored and every route answers 503 saying why (crate::degraded).
    pub require_data_mount: bool,
    /// Admission control: the machine's capacity for sandboxes (measured where left open).
    pub capacity: CapacityConfig,
    /// Client connections: how many, and how long one may be held without a request.
    pub connections: ConnectionLimits,
    /// HTTPS (with the appliance's own certificate or the operator's) or plain HTTP.
    pub tls: TlsChoice,
    /// Where to write the certificate clients should trust (PEM), for tools on this host.
    pub tls_trust_out: Option<PathBuf>,
    /// Files of Ed25519 public keys (hex lines) trusted to sign upgrade images: the image's own
    /// and the operator's; a missing file adds none.
    pub upgrade_key_files: Vec<PathBuf>,
}

/// Builds the sandbox side once the store and keys are open (it needs both for the CA).
pub type BackendFactory = Box<dyn FnOnce(&Store, &Keyring) -> Result<Backend, String>>;

/// How sandbox routes are served: by a wired runtime, or refused with a reason.
pub enum SandboxSide {
    Wired(Backend),
    Build(BackendFactory),
    Unavailable(String),
}

pub struct Running {
    app: Arc<App>,
    http: HttpServer,
    reaper_stop: Arc<AtomicBool>,
    reaper: Option<JoinHandle<()>>,
    _lock: DataDirLock,
}

/// The master key: the operator's file, or where `--master-key-store` keeps it (with the
/// `KeyStore` for rotations through the API).
fn open_keyring(config: &ServeConfig, store: &Store) -> Result<(Keyring, Option<KeyStore>), String> {
    if let Some(path) = &config.master_key_file {
        let key = read_master_key(path)?;
        println!("appliance: master key {} loaded from {}", key.id_hex(), path.display());
        return Ok((Keyring::new(key), None));
    }
    let keys = KeyStore::choose(&config.master_key_store, &config.data_dir);
    let ring = master_key::load(&keys, &config.data_dir, store)?;
    Ok((ring, Some(keys)))
}

pub fn start(config: &ServeConfig, side: SandboxSide) -> Result<Running, String> {
    let lock = DataDirLock::acquire(&config.data_dir)?;
    let store = Store::open(&config.data_dir)?;
    let (keyring, master_keys) = open_keyring(config, &store)?;
    println!("appliance: store open at {}", store.path().display());
    let auth = configure_admin_key(&store, config.admin_key_file.as_deref())?;
    let kvm = selfcheck::run(&config.vmm_bin, selfcheck::SELFCHECK_TIMEOUT);
    println!("appliance: vmm selfcheck: {kvm}");
    let lifecycle = match side {
        SandboxSide::Wired(backend) => Lifecycle::new(Some(backend), ""),
        SandboxSide::Build(factory) => match factory(&store, &keyring) {
            Ok(backend) => Lifecycle::new(Some(backend), ""),
            Err(reason) => {
                println!("appliance: SANDBOXES UNAVAILABLE: {reason}; sandbox routes will answer 503");
                Lifecycle::new(None, reason)
            }
        },
        SandboxSide::Unavailable(reason) => {
            println!("appliance: sandbox routes will answer 503: sandbox runtime not available: {reason}");
            Lifecycle::new(None, reason)
        }
    };
    let limits = Limits::resolve(&config.capacity)?;
    println!(
        "appliance: capacity: {} MiB memory ({} MiB kept for the appliance, {} MiB for sandboxes), {} vCPUs, creates refused under {} MiB free on the data disk",
        limits.memory_total_mb,
        limits.memory_reserved_mb,
        limits.for_sandboxes_mb(),
        limits.vcpus,
        limits.disk_reserve_mb
    );
    let app = Arc::new(App {
        store,
        keyring: Arc::new(LiveKeyring::new(keyring)),
        master_keys,
        auth,
        lifecycle,
        capacity: Capacity::new(limits, &config.data_dir),
        metrics: Metrics::new(),
        long_work: LongWork::new(MAX_LONG_REQUESTS),
        async_execs: Arc::default(),
        exec_sessions: Arc::default(),
        kvm,
        log_requests: config.log_requests,
        templates: crate::templates::Templates::open(&config.data_dir),
        upgrades: crate::upgrade::Upgrades::new(&config.data_dir, trusted_upgrade_keys(config)?),
        power_control: config.power_control,
        api_scheme: config.tls.scheme(),
    });
    crate::sandbox_ops::reconcile_after_start(&app).map_err(|e| e.message)?;
    crate::checkpoints::reconcile(&app).map_err(|e| e.message)?;
    crate::templates::reconcile(&app).map_err(|e| e.message)?;
    let reaper_stop = Arc::new(AtomicBool::new(false));
    let reaper = crate::sandbox_ops::spawn_reaper(
        Arc::clone(&app),
        Arc::clone(&reaper_stop),
        Duration::from_millis(250),
        config.stopped_retention,
    );
    let tls = crate::api_tls::prepare(&config.tls, &app.store, &app.keyring.snapshot())?;
    if let Some(tls) = &tls {
        announce_tls(tls, config.tls_trust_out.as_deref())?;
    }
    let handler_app = Arc::clone(&app);
    let http = HttpServer::start(
        &config.listen,
        &config.loopback_listen,
        Arc::new(move |request, port| dispatch::handle(&handler_app, request, port)),
        config.connections,
        tls.map(|t| t.server),
    )?;
    println!("appliance: listening on {}://{}", config.tls.scheme(), http.addr());
    Ok(Running { app, http, reaper_stop, reaper, _lock: lock })
}

fn trusted_upgrade_keys(config: &ServeConfig) -> Result<crate::upgrade::signature::TrustedKeys, String> {
    let files: Vec<&Path> = config.upgrade_key_files.iter().map(PathBuf::as_path).collect();
    let keys = crate::upgrade::signature::TrustedKeys::load(&files)?;
    if keys.is_empty() {
        println!("appliance: upgrades: no signing key is trusted; every upgrade image will be refused");
    } else {
        println!("appliance: upgrades: images signed by {} key(s) are accepted ({})", keys.len(), keys.describe());
    }
    Ok(keys)
}

/// Prints what clients trust (the fingerprint goes on the console, where `image run` and the
/// operator read it) and writes it to `trust_out` when asked.
fn announce_tls(tls: &ApiTls, trust_out: Option<&Path>) -> Result<(), String> {
    println!("appliance: API TLS: {} SHA-256 fingerprint {}", tls.describes, tls.fingerprint);
    println!(
        "appliance: API TLS: clients trust that certificate with SSL_CERT_FILE=<its PEM file> (Python SDK) or \
         NODE_EXTRA_CA_CERTS=<its PEM file> (Node SDK); check the file's fingerprint against the one above"
    );
    if let Some(path) = trust_out {
        std::fs::write(path, &tls.trust_pem).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("appliance: API TLS: {} written to {}", tls.describes, path.display());
    }
    Ok(())
}

impl Running {
    pub fn addr(&self) -> SocketAddr {
        self.http.addr()
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stops accepting requests, lets in-flight ones finish (up to `grace`), stops the
    /// reaper and closes the store.
    pub fn shutdown(self, grace: Duration) {
        let Running { app, http, reaper_stop, reaper, _lock: lock } = self;
        http.shutdown(grace);
        reaper_stop.store(true, Ordering::SeqCst);
        if let Some(r) = reaper {
            let _ = r.join();
        }
        match Arc::try_unwrap(app) {
            Ok(app) => app.store.close(),
            Err(shared) => {
                // A WebSocket stream still holds the app; every commit is already
                // durable, so only the committer needs to drain.
                eprintln!("appliance: store still in use by a stream at shutdown; flushing writes only");
                drop(shared);
            }
        }
        drop(lock);
    }
}

/// The `serve` subcommand: runs until SIGTERM/SIGINT, then shuts down cleanly.
pub fn run(config: &ServeConfig, side: SandboxSide) -> Result<(), String> {
    crate::signals::block_termination_signals()?;
    if config.require_data_mount {
        if let Some(reason) = crate::degraded::data_dir_problem(&config.data_dir) {
            return crate::degraded::serve_until_terminated(&config.listen, &reason);
        }
    }
    let running = start(config, side)?;
    let signal = crate::signals::wait_for_termination();
    println!("appliance: {signal} received; finishing in-flight requests");
    running.shutdown(Duration::from_secs(5));
    println!("appliance: store closed; exiting");
    Ok(())
}

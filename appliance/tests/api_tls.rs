//! HTTPS on the real `appliance` binary: the certificate it generates (the CA clients trust is
//! the one whose fingerprint the console prints, and stays the same across restarts), the
//! operator's certificate, plain HTTP sent to the TLS port, and bad TLS flags.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use appliance::api_tls::fingerprint;
use appliance::client::HttpClient;
use common::{files_under, temp_dir, write_key_file, ADMIN_KEY};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

const BIN: &str = env!("CARGO_BIN_EXE_appliance");

/// A running server; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `appliance serve` with `args`; returns once it says where it listens.
fn serve(dir: &Path, args: &[&OsStr]) -> Server {
    static STARTS: AtomicUsize = AtomicUsize::new(0);
    let log_path = dir.join(format!("serve-{}.log", STARTS.fetch_add(1, Ordering::SeqCst)));
    let log = fs::File::create(&log_path).expect("log");
    let key = write_key_file(dir);
    let data = dir.join("data");
    let child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--vmm-bin", "/nonexistent/vmm", "--admin-key-file"])
        .arg(&key)
        .arg("--data-dir")
        .arg(&data)
        .args(args)
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn appliance");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut server = Server { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), log: String::new() };
    loop {
        server.log = fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(at) =
            server.log.lines().find_map(|l| l.split_once("appliance: listening on ").map(|(_, a)| a.to_string()))
        {
            let addr = at.split_once("://").map_or(at.as_str(), |(_, a)| a);
            server.addr = addr.parse().expect("socket address");
            assert!(at.starts_with("https://"), "{}", server.log);
            return server;
        }
        assert!(Instant::now() < deadline, "appliance did not start:\n{}", server.log);
        assert!(server.child.try_wait().expect("wait").is_none(), "appliance exited:\n{}", server.log);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fingerprint the console line names.
fn printed_fingerprint(log: &str) -> String {
    let line = log.lines().find(|l| l.contains("SHA-256 fingerprint ")).expect("a fingerprint line");
    line.rsplit(' ').next().expect("fingerprint").to_string()
}

/// The chain the server presents, as a client learns it before it trusts anything (the same
/// code `image run` and the end-to-end harness use).
fn presented_chain(addr: SocketAddr) -> Vec<CertificateDer<'static>> {
    image::api_trust::presented_chain(addr.port()).expect("TLS handshake")
}

fn get_projects(addr: SocketAddr, trust_pem: &str, name: &str) -> std::io::Result<u16> {
    let tls = HttpClient::tls_trusting(trust_pem)?;
    let mut client = HttpClient::connect_tls(addr, Some(ADMIN_KEY.to_string()), tls, name)?;
    Ok(client.request("GET", "/api/projects", b"")?.status)
}

#[test]
fn the_generated_ca_is_the_printed_one_and_survives_a_restart() {
    let dir = temp_dir("tls-generated");
    let trust = dir.join("api-ca.pem");
    let server = serve(&dir, &[OsStr::new("--tls-trust-out"), trust.as_os_str()]);
    let printed = printed_fingerprint(&server.log);
    assert!(server.log.contains("SSL_CERT_FILE") && server.log.contains("NODE_EXTRA_CA_CERTS"), "{}", server.log);

    // The client's out-of-band check: the chain's CA is the certificate the console named.
    let chain = presented_chain(server.addr);
    assert_eq!(chain.len(), 2, "server certificate and the API CA");
    assert_eq!(fingerprint(chain[1].as_ref()), printed);
    let trust_pem = fs::read_to_string(&trust).expect("trust file");
    let written = CertificateDer::from_pem_slice(trust_pem.as_bytes()).expect("PEM");
    assert_eq!(fingerprint(written.as_ref()), printed);

    // Trusting it, HTTPS works by name and by address; trusting something else, it does not.
    for name in ["localhost", "127.0.0.1"] {
        assert_eq!(get_projects(server.addr, &trust_pem, name).expect("HTTPS request"), 200, "as {name}");
    }
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("other cert");
    assert!(get_projects(server.addr, &other.cert.pem(), "localhost").is_err(), "a foreign CA must not verify");
    assert!(get_projects(server.addr, &trust_pem, "not-the-appliance.example").is_err(), "unnamed host");

    // Plain HTTP to the TLS port gets a plain answer saying what to do.
    let mut plain = HttpClient::connect(server.addr, Some(ADMIN_KEY.to_string())).expect("connect");
    let answer = plain.request("GET", "/api/projects", b"").expect("plain answer");
    assert_eq!(answer.status, 400);
    let v: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON");
    assert!(v["error"].as_str().expect("error").contains("https://"), "{v}");
    drop(server);

    // The CA is kept (its key sealed): the same fingerprint after a restart, and no private key
    // in PEM anywhere in the data directory.
    let server = serve(&dir, &[]);
    assert_eq!(printed_fingerprint(&server.log), printed);
    assert_eq!(get_projects(server.addr, &trust_pem, "localhost").expect("HTTPS request"), 200);
    drop(server);
    for entry in files_under(&dir.join("data")) {
        let bytes = fs::read(&entry).expect("read");
        assert!(!bytes.windows(11).any(|w| w == b"PRIVATE KEY"), "a PEM private key in {}", entry.display());
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn the_operators_certificate_is_served_when_given() {
    let dir = temp_dir("tls-operator");
    // The operator's own CA and a server certificate it signed.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params").signed_by(&leaf_key, &issuer);
    let leaf = leaf.expect("leaf");
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    fs::write(&cert_file, leaf.pem()).expect("write");
    fs::write(&key_file, leaf_key.serialize_pem()).expect("write");

    let server =
        serve(&dir, &[OsStr::new("--tls-cert"), cert_file.as_os_str(), OsStr::new("--tls-key"), key_file.as_os_str()]);
    assert_eq!(printed_fingerprint(&server.log), fingerprint(leaf.der()));
    assert_eq!(get_projects(server.addr, &ca_cert.pem(), "localhost").expect("HTTPS request"), 200);
    assert!(!server.log.contains("generated the API CA"), "{}", server.log);
    drop(server);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bad_tls_flags_are_refused_naming_the_problem() {
    let dir = temp_dir("tls-flags");
    let missing = dir.join("missing.pem");
    let cases: [(&[&OsStr], &str); 3] = [
        (&[OsStr::new("--tls-cert"), missing.as_os_str()], "--tls-cert and --tls-key must be given together"),
        (&[OsStr::new("--plain-http"), OsStr::new("--tls-settings"), missing.as_os_str()], "choose one of"),
        (&[OsStr::new("--tls-cert"), missing.as_os_str(), OsStr::new("--tls-key"), missing.as_os_str()], "cannot read"),
    ];
    for (args, want) in cases {
        let out = Command::new(BIN).arg("serve").args(args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    // A key file that is not a key: the server does not start, and says why without quoting it.
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    fs::write(&cert_file, cert.cert.pem()).expect("write");
    fs::write(&key_file, "not-a-key-0123456789").expect("write");
    let key = write_key_file(&dir);
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--vmm-bin", "/nonexistent/vmm", "--admin-key-file"])
        .arg(&key)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--tls-cert")
        .arg(&cert_file)
        .arg("--tls-key")
        .arg(&key_file)
        .output()
        .expect("run");
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("holds no PEM private key"), "{all}");
    assert!(!all.contains("not-a-key-0123456789"), "{all}");
    let _ = fs::remove_dir_all(&dir);
}

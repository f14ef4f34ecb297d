//! Sealing the master key to a real (software) TPM: swtpm, one fresh instance per test.
//! Without swtpm on PATH these tests skip, unless OC_REQUIRE_SWTPM=1 makes that a failure.

mod common;

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::swtpm::{self, Swtpm};
use common::temp_dir;

use appliance::master_key::tpm::{SocketTransport, Tpm, TpmError, Transport};

const SECRET: [u8; 32] = *b"master-key-0123456789abcdef-TPM!";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Counts the commands sent, to report what a seal and an unseal cost.
struct Counting<T> {
    inner: T,
    commands: Rc<Cell<u32>>,
}

impl<T: Transport> Transport for Counting<T> {
    fn transact(&mut self, command: &[u8]) -> io::Result<Vec<u8>> {
        self.commands.set(self.commands.get() + 1);
        self.inner.transact(command)
    }
}

#[test]
fn seal_then_unseal_returns_the_secret() {
    if !swtpm::available() {
        return;
    }
    let dir = temp_dir("roundtrip");
    let swtpm = Swtpm::start(&dir);
    let commands = Rc::new(Cell::new(0));
    let mut tpm = Tpm::new(Counting {
        inner: SocketTransport::connect(&swtpm.socket).expect("connect"),
        commands: commands.clone(),
    });

    let started = Instant::now();
    let blob = tpm.seal(&SECRET).expect("seal");
    let seal_time = started.elapsed();
    let seal_commands = commands.take();
    assert!(!contains(&blob, &SECRET), "the blob must not hold the plaintext");

    let started = Instant::now();
    let secret = tpm.unseal(&blob).expect("unseal");
    let unseal_time = started.elapsed();
    let unseal_commands = commands.take();
    assert_eq!(secret.as_slice(), SECRET);
    println!(
        "swtpm: seal {seal_commands} commands in {seal_time:?}, unseal {unseal_commands} commands in {unseal_time:?}, \
         blob {} bytes",
        blob.len()
    );

    // Nothing stays loaded: many rounds fit in a TPM with only a few object slots.
    let rounds = 20;
    let (mut sealing, mut unsealing) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let started = Instant::now();
        let blob = tpm.seal(&SECRET).expect("seal again");
        sealing += started.elapsed();
        let started = Instant::now();
        assert_eq!(tpm.unseal(&blob).expect("unseal again").as_slice(), SECRET);
        unsealing += started.elapsed();
    }
    println!("swtpm: mean over {rounds} rounds: seal {:?}, unseal {:?}", sealing / rounds, unsealing / rounds);
    drop(tpm);
    drop(swtpm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn another_tpm_cannot_unseal() {
    if !swtpm::available() {
        return;
    }
    let first_dir = temp_dir("first");
    let second_dir = temp_dir("second");
    let first = Swtpm::start(&first_dir);
    let second = Swtpm::start(&second_dir);
    let blob = first.tpm().seal(&SECRET).expect("seal");

    let err = second.tpm().unseal(&blob).expect_err("another TPM must not unseal");
    let text = err.to_string();
    assert!(matches!(err, TpmError::Tpm { command: "TPM2_Load", .. }), "{text}");
    assert!(text.contains("another TPM"), "{text}");
    println!("another TPM's blob: {text}");
    assert!(!contains(text.as_bytes(), &SECRET));
    // The first TPM still can, and the failure left nothing loaded in the second.
    assert_eq!(first.tpm().unseal(&blob).expect("unseal").as_slice(), SECRET);
    let own = second.tpm().seal(&SECRET).expect("seal on the second");
    assert_eq!(second.tpm().unseal(&own).expect("unseal on the second").as_slice(), SECRET);
    drop((first, second));
    let _ = std::fs::remove_dir_all(&first_dir);
    let _ = std::fs::remove_dir_all(&second_dir);
}

#[test]
fn unseal_survives_a_restart() {
    if !swtpm::available() {
        return;
    }
    let dir = temp_dir("restart");
    let blob = {
        let swtpm = Swtpm::start(&dir);
        let blob = swtpm.tpm().seal(&SECRET).expect("seal");
        drop(swtpm);
        blob
    };
    // A new process over the same state: the primary is re-derived from the persistent seed.
    let swtpm = Swtpm::start(&dir);
    assert_eq!(swtpm.tpm().unseal(&blob).expect("unseal after restart").as_slice(), SECRET);
    drop(swtpm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tampered_blob_is_refused() {
    if !swtpm::available() {
        return;
    }
    let dir = temp_dir("tamper");
    let swtpm = Swtpm::start(&dir);
    let blob = swtpm.tpm().seal(&SECRET).expect("seal");

    // The last byte lies in the encrypted sensitive area of TPM2B_PRIVATE.
    let mut tampered = blob.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let err = swtpm.tpm().unseal(&tampered).expect_err("tampered");
    assert!(matches!(err, TpmError::Tpm { command: "TPM2_Load", .. }), "{err}");
    println!("tampered blob: {err}");

    // A cut-short blob never reaches the TPM.
    let err = swtpm.tpm().unseal(&blob[..blob.len() - 3]).expect_err("truncated");
    assert!(matches!(err, TpmError::BadBlob(_)), "{err}");

    assert_eq!(swtpm.tpm().unseal(&blob).expect("the original still unseals").as_slice(), SECRET);
    drop(swtpm);
    let _ = std::fs::remove_dir_all(&dir);
}

//! Sealing the master key to a TPM 2.0.
//!
//! The key is sealed as a KEYEDHASH data object under a storage primary key of the owner
//! hierarchy. The primary is never made persistent: it is re-derived with TPM2_CreatePrimary
//! from a fixed template each time, which yields the same key for as long as the TPM's owner
//! seed is unchanged (a TPM2_Clear changes it, and every blob sealed before becomes useless).
//! Nothing is written to the TPM's NV memory, so there is nothing to provision or clean up.
//!
//! The blob is our own small framing around what TPM2_Create returns: the sealed object's
//! TPM2B_PUBLIC and TPM2B_PRIVATE. The private part is encrypted and integrity-protected by
//! the TPM under the primary, so only the TPM that sealed it can load it.
//!
//! Every transient handle created here is flushed before a call returns, on error paths too:
//! a TPM has only a few object slots, and swtpm's socket (used by the tests) has no resource
//! manager to flush them when the connection closes.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tpm2_protocol::basic::{Tpm2b, TpmHandle, TpmUint16};
use tpm2_protocol::constant::{MAX_SENSITIVE_DATA, TPM_MAX_COMMAND_SIZE};
use tpm2_protocol::data::{
    Tpm2bData, Tpm2bDigest, Tpm2bPrivate, Tpm2bPublic, Tpm2bSensitiveCreate, TpmAlgId, TpmCc, TpmEccCurve, TpmRc,
    TpmRh, TpmSt, TpmaObject, TpmaSession, TpmlPcrSelection, TpmsAuthCommand, TpmsEccParms, TpmsEccPoint,
    TpmsKeyedhashParms, TpmtEccScheme, TpmtKdfScheme, TpmtKeyedhashScheme, TpmtPublic, TpmtSymDef, TpmuKeyedhashScheme,
    TpmuPublicId, TpmuPublicParms, TpmuSymKeyBits, TpmuSymMode,
};
use tpm2_protocol::frame::{
    tpm_marshal_command, TpmCreateCommand, TpmCreatePrimaryCommand, TpmCreateResponse, TpmFlushContextCommand,
    TpmFrame, TpmLoadCommand, TpmResponse, TpmUnsealCommand,
};
use tpm2_protocol::{TpmMarshal, TpmUnmarshal, TpmWriter};
use zeroize::Zeroizing;

/// The kernel's resource-managed TPM device: it flushes what a closed file left loaded and
/// lets several users share the TPM.
pub const DEFAULT_DEVICE: &str = "/dev/tpmrm0";

/// The most a sealed data object may hold (MAX_SYM_DATA in the TPM 2.0 specification).
pub const MAX_SECRET: usize = 128;

/// Whether this machine has a TPM 2.0 the kernel exposes.
pub fn present() -> bool {
    Path::new(DEFAULT_DEVICE).exists()
}

/// Where TPM commands go: the kernel's device, or for tests a swtpm unix socket.
pub trait Transport {
    /// Sends one complete command and returns the complete response.
    fn transact(&mut self, command: &[u8]) -> io::Result<Vec<u8>>;
}

const HEADER: usize = 10;
/// libtpms and hardware TPMs alike answer within 4 KiB (TPM_MAX_COMMAND_SIZE).
const MAX_RESPONSE: usize = TPM_MAX_COMMAND_SIZE;

/// A TPM character device (/dev/tpmrm0): the kernel takes one command per write() and hands
/// back the whole response in one read().
pub struct DeviceTransport {
    file: File,
}

impl DeviceTransport {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Self { file })
    }
}

impl Transport for DeviceTransport {
    fn transact(&mut self, command: &[u8]) -> io::Result<Vec<u8>> {
        let written = retry_interrupted(|| self.file.write(command))?;
        if written != command.len() {
            return Err(io::Error::other(format!("TPM device took {written} of {} command bytes", command.len())));
        }
        let mut response = vec![0; MAX_RESPONSE];
        let read = retry_interrupted(|| self.file.read(&mut response))?;
        response.truncate(read);
        Ok(response)
    }
}

fn retry_interrupted(mut f: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// swtpm's data socket (`swtpm socket --server type=unixio,...`): raw TPM commands and
/// responses on a stream, so the response's length comes from its header.
pub struct SocketTransport {
    stream: UnixStream,
}

impl SocketTransport {
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        // A wedged emulator must not hang the caller forever.
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_write_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self { stream })
    }
}

impl Transport for SocketTransport {
    fn transact(&mut self, command: &[u8]) -> io::Result<Vec<u8>> {
        self.stream.write_all(command)?;
        let mut header = [0u8; HEADER];
        self.stream.read_exact(&mut header)?;
        let size = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
        if !(HEADER..=MAX_RESPONSE).contains(&size) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TPM response size field {size}")));
        }
        // Allocated once at its final size: a response may carry the secret, and a growing
        // Vec would leave copies behind in freed memory.
        let mut response = vec![0; size];
        response[..HEADER].copy_from_slice(&header);
        self.stream.read_exact(&mut response[HEADER..])?;
        Ok(response)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpmError {
    /// The transport failed (device or socket).
    Io(String),
    /// The TPM's answer was malformed, or a command could not be built.
    Protocol(String),
    /// The TPM refused a command with this response code.
    Tpm { command: &'static str, code: u32 },
    /// The sealed blob is not one of ours, or is truncated or damaged.
    BadBlob(String),
}

impl fmt::Display for TpmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TpmError::Io(e) => write!(f, "TPM I/O failed: {e}"),
            TpmError::Protocol(e) => write!(f, "TPM protocol error: {e}"),
            TpmError::Tpm { command, code } => {
                let name =
                    TpmRc::try_from(*code).map_or_else(|_| "unknown response code".to_string(), |rc| rc.to_string());
                write!(f, "{command} failed: TPM_RC {code:#010x} ({name})")?;
                if *command == "TPM2_Load" {
                    // The usual cause is worth naming: the TPM checks the blob's integrity
                    // under its own primary key.
                    write!(f, "; the sealed blob was made by another TPM (or before a TPM clear), or is damaged")?;
                }
                Ok(())
            }
            TpmError::BadBlob(e) => write!(f, "sealed master key blob is unusable: {e}"),
        }
    }
}

impl std::error::Error for TpmError {}

impl From<io::Error> for TpmError {
    fn from(e: io::Error) -> Self {
        TpmError::Io(e.to_string())
    }
}

fn protocol(context: &str, e: tpm2_protocol::TpmError) -> TpmError {
    TpmError::Protocol(format!("{context}: {e:?}"))
}

/// A TPM session: seals and unseals through a transport.
pub struct Tpm<T: Transport> {
    transport: T,
}

impl<T: Transport> Tpm<T> {
    pub fn new(transport: T) -> Self {
        Self { transport }
    }

    /// Seals `secret` (at most 128 bytes) under the owner hierarchy's storage primary key and
    /// returns an opaque blob that only this TPM can unseal. The blob holds no plaintext.
    pub fn seal(&mut self, secret: &[u8]) -> Result<Vec<u8>, TpmError> {
        if secret.len() > MAX_SECRET {
            return Err(TpmError::Protocol(format!(
                "a secret of {} bytes cannot be sealed (at most {MAX_SECRET})",
                secret.len()
            )));
        }
        let primary = self.create_primary()?;
        self.flushing(primary, |tpm| tpm.create_sealed(primary, secret))
    }

    /// Loads a blob made by [`Tpm::seal`] under the re-derived primary and returns the secret.
    pub fn unseal(&mut self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let (public, private) = decode_blob(blob)?;
        let primary = self.create_primary()?;
        self.flushing(primary, |tpm| {
            let load = TpmLoadCommand { handles: [TpmHandle::new(primary)], in_private: private, in_public: public };
            let object = tpm.load(&load)?;
            tpm.flushing(object, |tpm| tpm.unseal_object(object))
        })
    }

    /// Runs `f`, then flushes `handle` whatever `f` returned. An error from `f` wins over a
    /// failed flush; a failed flush after success is still an error, as it leaks a TPM slot.
    fn flushing<R>(&mut self, handle: u32, f: impl FnOnce(&mut Self) -> Result<R, TpmError>) -> Result<R, TpmError> {
        let result = f(self);
        let flushed = self.flush(handle);
        let value = result?;
        flushed?;
        Ok(value)
    }

    fn create_primary(&mut self) -> Result<u32, TpmError> {
        let command = TpmCreatePrimaryCommand {
            handles: [TpmHandle::new(TpmRh::Owner.value())],
            in_sensitive: Tpm2bSensitiveCreate::default(),
            in_public: Tpm2bPublic::from(primary_template()),
            outside_info: Tpm2bData::default(),
            creation_pcr: TpmlPcrSelection::default(),
        };
        let response = self.call("TPM2_CreatePrimary", &command, true)?;
        self.loaded_handle("TPM2_CreatePrimary", TpmCc::CreatePrimary, &response)
    }

    fn create_sealed(&mut self, parent: u32, secret: &[u8]) -> Result<Vec<u8>, TpmError> {
        let mut command = TpmCreateCommand {
            handles: [TpmHandle::new(parent)],
            in_sensitive: Tpm2bSensitiveCreate::default(),
            in_public: Tpm2bPublic::from(sealed_template()),
            outside_info: Tpm2bData::default(),
            creation_pcr: TpmlPcrSelection::default(),
        };
        // Filled in place, so the secret is not moved around the stack inside a temporary.
        let filled = command.in_sensitive.inner.data.try_extend_from_slice(secret);
        let marshaled = filled.map_err(|e| protocol("TPM2_Create", e)).and_then(|()| marshal(&command, true));
        wipe_sensitive(&mut command.in_sensitive);
        let response = self.transact("TPM2_Create", &marshaled?)?;
        let created = TpmResponse::cast(&response)
            .and_then(TpmResponse::unmarshal::<TpmCreateResponse>)
            .map_err(|e| protocol("TPM2_Create response", e))?;
        encode_blob(&created.out_public, &created.out_private)
    }

    fn load(&mut self, command: &TpmLoadCommand) -> Result<u32, TpmError> {
        let response = self.call("TPM2_Load", command, true)?;
        self.loaded_handle("TPM2_Load", TpmCc::Load, &response)
    }

    fn unseal_object(&mut self, object: u32) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let command = TpmUnsealCommand { handles: [TpmHandle::new(object)] };
        let response = self.call("TPM2_Unseal", &command, true)?;
        // Read through a borrowed view rather than the crate's owned response struct, so the
        // secret's only copies are in buffers that are wiped on drop.
        let frame = TpmResponse::cast(&response).map_err(|e| protocol("TPM2_Unseal response", e))?;
        frame.validate(TpmCc::Unseal).map_err(|e| protocol("TPM2_Unseal response", e))?;
        let parameters = response_parameters(frame.body(), 0)
            .ok_or_else(|| TpmError::Protocol("TPM2_Unseal response: parameter area out of bounds".into()))?;
        let data = Tpm2b::<MAX_SENSITIVE_DATA>::cast(parameters).map_err(|e| protocol("TPM2_Unseal response", e))?;
        Ok(Zeroizing::new(data.data().to_vec()))
    }

    fn flush(&mut self, handle: u32) -> Result<(), TpmError> {
        let command = TpmFlushContextCommand { handles: [], flush_handle: TpmHandle::new(handle) };
        self.call("TPM2_FlushContext", &command, false).map(drop)
    }

    /// The transient handle a successful CreatePrimary or Load returned. Once the TPM has
    /// answered with one, it is flushed even if the rest of the response turns out malformed.
    fn loaded_handle(&mut self, name: &'static str, cc: TpmCc, response: &[u8]) -> Result<u32, TpmError> {
        let handle = match response.get(HEADER..HEADER + 4) {
            Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            None => return Err(TpmError::Protocol(format!("{name} response has no handle"))),
        };
        // Only a transient object handle may be flushed on the TPM's say-so.
        if handle >> 24 != 0x80 {
            return Err(TpmError::Protocol(format!("{name} returned handle {handle:#010x}, not a transient object")));
        }
        let valid = TpmResponse::cast(response).and_then(|frame| frame.validate(cc));
        if let Err(e) = valid {
            let _ = self.flush(handle);
            return Err(protocol(name, e));
        }
        Ok(handle)
    }

    /// Marshals and sends a command (with one empty-password session if `authorized`) and
    /// returns a response that passed [`check_response`].
    fn call<C: TpmFrame>(
        &mut self,
        name: &'static str,
        command: &C,
        authorized: bool,
    ) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let bytes = marshal(command, authorized)?;
        self.transact(name, &bytes)
    }

    fn transact(&mut self, name: &'static str, command: &[u8]) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let response = Zeroizing::new(self.transport.transact(command)?);
        check_response(name, &response)?;
        Ok(response)
    }
}

/// The storage primary key: ECC P-256 (generated in milliseconds, where RSA takes seconds),
/// AES-128-CFB for the children's private parts. The template is fixed, so the same key comes
/// back every time from the owner seed.
fn primary_template() -> TpmtPublic {
    TpmtPublic {
        object_type: TpmAlgId::Ecc,
        name_alg: TpmAlgId::Sha256,
        object_attributes: TpmaObject::RESTRICTED
            | TpmaObject::DECRYPT
            | TpmaObject::FIXED_TPM
            | TpmaObject::FIXED_PARENT
            | TpmaObject::SENSITIVE_DATA_ORIGIN
            | TpmaObject::USER_WITH_AUTH
            | TpmaObject::NO_DA,
        auth_policy: Tpm2bDigest::default(),
        parameters: TpmuPublicParms::Ecc(TpmsEccParms {
            symmetric: TpmtSymDef {
                algorithm: TpmAlgId::Aes,
                key_bits: TpmuSymKeyBits::Aes(TpmUint16::new(128)),
                mode: TpmuSymMode::Aes(TpmAlgId::Cfb),
            },
            scheme: TpmtEccScheme::default(),
            curve_id: TpmEccCurve::NistP256,
            kdf: TpmtKdfScheme::default(),
        }),
        unique: TpmuPublicId::Ecc(TpmsEccPoint::default()),
    }
}

/// The sealed data object: no sensitiveDataOrigin (we supply the data), empty auth value, and
/// never duplicable to another TPM or parent.
fn sealed_template() -> TpmtPublic {
    TpmtPublic {
        object_type: TpmAlgId::KeyedHash,
        name_alg: TpmAlgId::Sha256,
        object_attributes: TpmaObject::FIXED_TPM
            | TpmaObject::FIXED_PARENT
            | TpmaObject::USER_WITH_AUTH
            | TpmaObject::NO_DA,
        auth_policy: Tpm2bDigest::default(),
        parameters: TpmuPublicParms::KeyedHash(TpmsKeyedhashParms {
            scheme: TpmtKeyedhashScheme { scheme: TpmAlgId::Null, details: TpmuKeyedhashScheme::Null },
        }),
        unique: TpmuPublicId::KeyedHash(Tpm2bDigest::default()),
    }
}

/// The owner hierarchy and our objects have empty auth values: a password session
/// (TPM_RS_PW) with an empty password authorizes them.
fn password_session() -> TpmsAuthCommand {
    TpmsAuthCommand {
        session_handle: TpmHandle::new(TpmRh::Pw.value()),
        nonce: tpm2_protocol::data::Tpm2bNonce::default(),
        session_attributes: TpmaSession::empty(),
        hmac: tpm2_protocol::data::Tpm2bAuth::default(),
    }
}

fn marshal<C: TpmFrame>(command: &C, authorized: bool) -> Result<Zeroizing<Vec<u8>>, TpmError> {
    let mut buffer = Zeroizing::new(vec![0; TPM_MAX_COMMAND_SIZE]);
    let session = [password_session()];
    let (tag, sessions): (TpmSt, &[TpmsAuthCommand]) =
        if authorized { (TpmSt::Sessions, &session) } else { (TpmSt::NoSessions, &[]) };
    let mut writer = TpmWriter::new(&mut buffer);
    tpm_marshal_command(command, tag, sessions, &mut writer).map_err(|e| protocol("building a TPM command", e))?;
    let len = writer.len();
    buffer.truncate(len);
    Ok(buffer)
}

/// Best-effort wipe of the secret's copy inside a marshaled-from command struct.
fn wipe_sensitive(sensitive: &mut Tpm2bSensitiveCreate) {
    // SAFETY: the pointer comes from a live `&mut`, so it is valid and aligned for the whole
    // value. TPM2B_SENSITIVE_CREATE is two TPM2B buffers, each a u16 length and an array of
    // MaybeUninit<u8>, holding no pointers or enums, so all-zero bytes are a valid value: two
    // empty buffers.
    unsafe { zeroize::zeroize_flat_type(std::ptr::from_mut(sensitive)) }
}

/// Checks a response's header: long enough, size field equal to the bytes received, a known
/// tag, and success. Anything else is an error; nothing here can panic on hostile bytes.
fn check_response(name: &'static str, response: &[u8]) -> Result<(), TpmError> {
    let Some(header) = response.get(..HEADER) else {
        return Err(TpmError::Protocol(format!("{name}: a response of {} bytes has no TPM header", response.len())));
    };
    let tag = u16::from_be_bytes([header[0], header[1]]);
    let size = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    let code = u32::from_be_bytes([header[6], header[7], header[8], header[9]]);
    if size as usize != response.len() {
        return Err(TpmError::Protocol(format!(
            "{name}: response size field says {size} bytes, {} arrived",
            response.len()
        )));
    }
    if tag != TpmSt::NoSessions.value() && tag != TpmSt::Sessions.value() {
        return Err(TpmError::Protocol(format!("{name}: response tag {tag:#06x}")));
    }
    if code != 0 {
        return Err(TpmError::Tpm { command: name, code });
    }
    Ok(())
}

/// The parameter area of a response body with `handles` response handles, for a response
/// with sessions (a u32 parameter size follows the handles) or without (all the rest).
fn response_parameters(body: &[u8], handles: usize) -> Option<&[u8]> {
    let after_handles = body.get(handles * 4..)?;
    // The TPM answers with sessions exactly when the command had them; ours (Unseal) did.
    let size = after_handles.get(..4)?;
    let size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize;
    after_handles.get(4..4usize.checked_add(size)?)
}

const BLOB_MAGIC: &[u8; 4] = b"OCTS";
const BLOB_VERSION: u8 = 1;

/// magic "OCTS" | version 1 | TPM2B_PUBLIC | TPM2B_PRIVATE (each with its own u16 size).
fn encode_blob(public: &Tpm2bPublic, private: &Tpm2bPrivate) -> Result<Vec<u8>, TpmError> {
    let mut buffer = vec![0; 2 * TPM_MAX_COMMAND_SIZE];
    let mut writer = TpmWriter::new(&mut buffer);
    let written = writer
        .write_bytes(BLOB_MAGIC)
        .and_then(|()| writer.write_bytes(&[BLOB_VERSION]))
        .and_then(|()| public.marshal(&mut writer))
        .and_then(|()| private.marshal(&mut writer));
    written.map_err(|e| protocol("encoding the sealed blob", e))?;
    let len = writer.len();
    buffer.truncate(len);
    Ok(buffer)
}

fn decode_blob(blob: &[u8]) -> Result<(Tpm2bPublic, Tpm2bPrivate), TpmError> {
    let bad = |what: &str, e: tpm2_protocol::TpmError| TpmError::BadBlob(format!("{what}: {e:?}"));
    let Some(rest) = blob.strip_prefix(BLOB_MAGIC.as_slice()) else {
        return Err(TpmError::BadBlob("not a TPM-sealed key (wrong magic)".into()));
    };
    let Some((&version, rest)) = rest.split_first() else {
        return Err(TpmError::BadBlob("truncated after the magic".into()));
    };
    if version != BLOB_VERSION {
        return Err(TpmError::BadBlob(format!("version {version}, this build reads {BLOB_VERSION}")));
    }
    let (public, rest) = Tpm2bPublic::unmarshal(rest).map_err(|e| bad("public area", e))?;
    let (private, rest) = Tpm2bPrivate::unmarshal(rest).map_err(|e| bad("private area", e))?;
    if !rest.is_empty() {
        return Err(TpmError::BadBlob(format!("{} bytes of trailing data", rest.len())));
    }
    if public.inner.object_type != TpmAlgId::KeyedHash {
        return Err(TpmError::BadBlob("the public area is not a sealed data object".into()));
    }
    Ok((public, private))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_blob() -> (Tpm2bPublic, Tpm2bPrivate, Vec<u8>) {
        let public = Tpm2bPublic::from(sealed_template());
        let private = Tpm2bPrivate::try_from(&[7u8; 90][..]).expect("private");
        let blob = encode_blob(&public, &private).expect("encode");
        (public, private, blob)
    }

    #[test]
    fn blob_round_trips() {
        let (public, private, blob) = sample_blob();
        assert_eq!(&blob[..5], b"OCTS\x01");
        let (p, q) = decode_blob(&blob).expect("decode");
        assert_eq!(p, public);
        assert_eq!(q, private);
    }

    #[test]
    fn truncated_or_garbage_blob_is_bad_blob() {
        let (_, _, blob) = sample_blob();
        for len in 0..blob.len() {
            let err = decode_blob(&blob[..len]).expect_err("truncated");
            assert!(matches!(err, TpmError::BadBlob(_)), "{len}: {err}");
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(decode_blob(&long), Err(TpmError::BadBlob(_))));
        let mut version = blob.clone();
        version[4] = 2;
        assert!(matches!(decode_blob(&version), Err(TpmError::BadBlob(_))));
        // Deterministic pseudo-random garbage, with and without a valid prefix.
        let mut x: u32 = 0x1234_5678;
        for round in 0..2000 {
            let len = (round % 300) as usize;
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if round % 2 == 0 && bytes.len() >= 5 {
                bytes[..5].copy_from_slice(b"OCTS\x01");
            }
            assert!(matches!(decode_blob(&bytes), Err(TpmError::BadBlob(_))));
        }
    }

    #[test]
    fn error_response_gives_its_code() {
        let response = [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x09, 0x8e];
        let err = check_response("TPM2_Unseal", &response).expect_err("error rc");
        assert_eq!(err, TpmError::Tpm { command: "TPM2_Unseal", code: 0x98e });
        let text = err.to_string();
        assert!(text.starts_with("TPM2_Unseal failed: TPM_RC 0x0000098e ("), "{text}");
        // An rc the crate does not know is still reported, not a panic.
        let unknown = [0x80, 0x01, 0, 0, 0, 10, 0xde, 0xad, 0xbe, 0xef];
        let err = check_response("TPM2_Load", &unknown).expect_err("error rc");
        assert!(err.to_string().contains("0xdeadbeef"), "{err}");
    }

    #[test]
    fn malformed_headers_are_protocol_errors() {
        for response in [
            &[][..],
            &[0x80, 0x01, 0, 0, 0][..],
            &[0x80, 0x01, 0, 0, 0, 11, 0, 0, 0, 0][..],
            &[0x12, 0x34, 0, 0, 0, 10, 0, 0, 0, 0][..],
            &[0x80, 0x01, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0][..],
        ] {
            assert!(matches!(check_response("TPM2_Load", response), Err(TpmError::Protocol(_))), "{response:?}");
        }
    }

    /// Answers each command code from a script and records the command codes sent.
    struct Scripted {
        sent: Vec<u32>,
        answer: fn(u32) -> Vec<u8>,
    }

    impl Transport for Scripted {
        fn transact(&mut self, command: &[u8]) -> io::Result<Vec<u8>> {
            let cc = u32::from_be_bytes([command[6], command[7], command[8], command[9]]);
            self.sent.push(cc);
            Ok((self.answer)(cc))
        }
    }

    fn frame(tag: u16, rc: u32, body: &[u8]) -> Vec<u8> {
        let mut out = tag.to_be_bytes().to_vec();
        out.extend_from_slice(&((HEADER + body.len()) as u32).to_be_bytes());
        out.extend_from_slice(&rc.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    const CREATE_PRIMARY: u32 = 0x131;
    const CREATE: u32 = 0x153;
    const LOAD: u32 = 0x157;
    const FLUSH: u32 = 0x165;

    #[test]
    fn a_failing_create_still_flushes_the_primary() {
        let mut tpm = Tpm::new(Scripted {
            sent: Vec::new(),
            answer: |cc| match cc {
                CREATE_PRIMARY => frame(0x8001, 0, &0x8000_0000u32.to_be_bytes()),
                FLUSH => frame(0x8001, 0, &[]),
                _ => frame(0x8001, 0x0902, &[]),
            },
        });
        let err = tpm.seal(&[1; 32]).expect_err("create fails");
        assert_eq!(err, TpmError::Tpm { command: "TPM2_Create", code: 0x902 });
        assert_eq!(tpm.transport.sent, [CREATE_PRIMARY, CREATE, FLUSH]);
    }

    #[test]
    fn garbage_answers_are_errors_and_handles_are_flushed() {
        let (_, _, blob) = sample_blob();
        let mut tpm = Tpm::new(Scripted {
            sent: Vec::new(),
            answer: |cc| match cc {
                CREATE_PRIMARY => frame(0x8001, 0, &0x8000_0000u32.to_be_bytes()),
                // A success with a transient handle but a truncated session area.
                LOAD => frame(0x8002, 0, &[0x80, 0, 0, 1, 0, 0, 0, 9, 1]),
                FLUSH => frame(0x8001, 0, &[]),
                _ => vec![0xff; 3],
            },
        });
        let err = tpm.unseal(&blob).expect_err("bad load response");
        assert!(matches!(err, TpmError::Protocol(_)), "{err}");
        assert_eq!(tpm.transport.sent, [CREATE_PRIMARY, LOAD, FLUSH, FLUSH]);

        let mut tpm = Tpm::new(Scripted {
            sent: Vec::new(),
            answer: |cc| match cc {
                // A "handle" that is not transient must not be flushed on the TPM's say-so.
                CREATE_PRIMARY => frame(0x8001, 0, &0x4000_0001u32.to_be_bytes()),
                _ => frame(0x8001, 0, &[]),
            },
        });
        assert!(matches!(tpm.seal(&[1; 32]), Err(TpmError::Protocol(_))));
        assert_eq!(tpm.transport.sent, [CREATE_PRIMARY]);
    }

    #[test]
    fn oversized_secret_is_refused_before_talking_to_the_tpm() {
        let mut tpm = Tpm::new(Scripted { sent: Vec::new(), answer: |_| Vec::new() });
        assert!(tpm.seal(&[0; MAX_SECRET + 1]).is_err());
        assert!(tpm.transport.sent.is_empty());
    }
}

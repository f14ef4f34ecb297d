//! How an agent operation fails: an answer for the client (`OpError`, sent as an error frame),
//! or a broken connection (`Failure::Transport`, nothing more can be sent).

use agent_protocol::ErrorCode;
use std::io;

/// A refused or failed operation, reported to the client with a code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> OpError {
        OpError { code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> OpError {
        OpError::new(ErrorCode::BadRequest, message)
    }

    /// An OS error about `what` (usually a path), with the code its kind maps to.
    pub fn io(what: impl std::fmt::Display, err: &io::Error) -> OpError {
        let code = match err.kind() {
            io::ErrorKind::NotFound => ErrorCode::NotFound,
            io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
            io::ErrorKind::AlreadyExists => ErrorCode::AlreadyExists,
            io::ErrorKind::NotADirectory => ErrorCode::NotADirectory,
            io::ErrorKind::IsADirectory => ErrorCode::IsADirectory,
            io::ErrorKind::DirectoryNotEmpty => ErrorCode::DirectoryNotEmpty,
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidFilename => ErrorCode::BadRequest,
            // ENOSPC, EDQUOT, EFBIG: the client is told the disk is full, not that I/O failed.
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
                ErrorCode::NoSpace
            }
            _ => ErrorCode::Io,
        };
        OpError { code, message: format!("{what}: {err}") }
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Why a handler stopped.
#[derive(Debug)]
pub enum Failure {
    /// Reported to the client; the connection continues.
    Op(OpError),
    /// The connection is gone or out of step; the handler closes it.
    Transport(io::Error),
}

impl From<OpError> for Failure {
    fn from(e: OpError) -> Failure {
        Failure::Op(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_protocol_codes() {
        let not_found = io::Error::from_raw_os_error(libc::ENOENT);
        let e = OpError::io("/nope", &not_found);
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.starts_with("/nope: "), "{}", e.message);
        assert_eq!(OpError::io("x", &io::Error::from_raw_os_error(libc::ENOTEMPTY)).code, ErrorCode::DirectoryNotEmpty);
        assert_eq!(OpError::io("x", &io::Error::from_raw_os_error(libc::EIO)).code, ErrorCode::Io);
        for full in [libc::ENOSPC, libc::EDQUOT, libc::EFBIG] {
            assert_eq!(OpError::io("x", &io::Error::from_raw_os_error(full)).code, ErrorCode::NoSpace);
        }
    }
}

//! An upload read from the request body as its consumer (a sandbox's agent) takes it, in
//! pieces, never whole. The body must announce its length with `Content-Length`: tiny_http's
//! chunked decoder reports a connection cut in the middle of a chunk as the end of the body,
//! which would commit part of a file as all of it, so chunked uploads are refused (411). A
//! body that ends before its announced length is a failure, never a shorter file.

use std::io::{self, Read};

use tiny_http::Request;

use crate::error::AppError;
use crate::http::request::header;

/// Buffer for throwing away what a client still sends after a failure.
const DISCARD_BUF: usize = 64 << 10;

pub struct UploadBody<'a> {
    inner: &'a mut dyn Read,
    expected: u64,
    received: u64,
    /// What went wrong on the client's side, if anything.
    problem: Option<AppError>,
}

impl<'a> UploadBody<'a> {
    /// The body of `request`, refused before anything is read when it is chunked (411) or
    /// announces more than `cap` bytes (413). Without `Content-Length` and `Transfer-Encoding`
    /// a body is empty (RFC 9112 section 6.3).
    pub fn open(request: &'a mut Request, cap: u64) -> Result<UploadBody<'a>, AppError> {
        if header(request, "Transfer-Encoding").is_some() {
            return Err(AppError::new(
                411,
                "file uploads need a Content-Length: a chunked body is refused, because a connection cut in \
                 the middle of a chunk could not be told from the end of the file",
            ));
        }
        let expected = request.body_length().map_or(0, |n| n as u64);
        if expected > cap {
            return Err(AppError::too_large(format!(
                "the file is {expected} bytes; uploads are limited to {cap} bytes"
            )));
        }
        Ok(UploadBody { inner: request.as_reader(), expected, received: 0, problem: None })
    }

    /// The body's length, as its Content-Length announced it.
    pub fn expected(&self) -> u64 {
        self.expected
    }

    /// Why reading the body failed, if it did: a write that failed because of it is the
    /// client's doing, whatever the consumer reports.
    pub fn problem(&mut self) -> Option<AppError> {
        self.problem.take()
    }

    /// Reads and drops what the client still sends, so that it gets to read the answer, and
    /// tiny_http has nothing left to drain (it would allocate the rest's length at once).
    pub fn discard_rest(&mut self) {
        if self.problem.is_some() {
            return;
        }
        let mut buf = vec![0u8; DISCARD_BUF];
        while self.received < self.expected {
            match self.read(&mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

impl Read for UploadBody<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.received >= self.expected || buf.is_empty() {
            return Ok(0);
        }
        let left = usize::try_from(self.expected - self.received).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        match self.inner.read(&mut buf[..want]) {
            Ok(0) => {
                let message = format!(
                    "the request body ended after {} of the {} bytes its Content-Length announced",
                    self.received, self.expected
                );
                self.problem = Some(AppError::bad_request(message.clone()));
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, message))
            }
            Ok(n) => {
                self.received += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.problem = Some(AppError::bad_request(format!("cannot read the request body: {e}")));
                Err(e)
            }
        }
    }
}

//! The kernel's hostname: set by the sandbox PID 1 at boot (from the command line) and by the
//! agent when the appliance names a sandbox resumed from another one's snapshot.

/// Sets the hostname; refuses anything but 1-64 letters, digits, '-' and '.'.
pub fn set(name: &str) -> std::io::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a valid hostname"));
    }
    // SAFETY: the pointer and length describe the live bytes of `name`; sethostname copies them.
    let ret = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    super::check(ret, || format!("sethostname {name}")).map(|_| ())
}

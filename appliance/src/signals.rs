//! SIGTERM/SIGINT handling without async signal handlers: the signals are blocked in
//! every thread (the mask is inherited, so this must run before threads start) and
//! the main thread collects them with `sigwait`.

use std::mem::MaybeUninit;

fn termination_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; sigaddset then adds valid
    // signal numbers to that initialised set.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        set.assume_init()
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread and all threads it starts later.
pub fn block_termination_signals() -> Result<(), String> {
    let set = termination_set();
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("pthread_sigmask failed: error {rc}"))
    }
}

/// Waits for SIGTERM or SIGINT and returns its name.
pub fn wait_for_termination() -> &'static str {
    let set = termination_set();
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
        let rc = unsafe { libc::sigwait(&raw const set, &raw mut sig) };
        if rc == 0 {
            return if sig == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
        }
    }
}

//! Foreground commands: run to completion with output streamed back as it comes, bounded per
//! stream, and a timeout that kills the command's whole process group.

use super::child::{self, Waited};
use super::env::EnvStore;
use super::error::{Failure, OpError};
use super::{paths, users};
use agent_protocol::{OutputStream, RunExit, RunSpec};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// Output returned per stream never exceeds this, whatever the request asks.
pub const MAX_OUTPUT_CEILING: u64 = 256 << 20;

/// Counts output against the per-stream limit; what is over the limit is dropped and flagged.
struct OutputLimit {
    limit: u64,
    sent: [u64; 2],
    truncated: [bool; 2],
}

impl OutputLimit {
    fn pass(
        &mut self,
        stream: OutputStream,
        data: &[u8],
        send: &mut dyn FnMut(OutputStream, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let i = match stream {
            OutputStream::Stdout => 0,
            OutputStream::Stderr => 1,
        };
        let room = self.limit - self.sent[i];
        let take = (data.len() as u64).min(room) as usize;
        if take < data.len() {
            self.truncated[i] = true;
        }
        if take == 0 {
            return Ok(());
        }
        self.sent[i] += take as u64;
        send(stream, &data[..take])
    }
}

/// Runs `spec`; `send` delivers output to the client. A `send` failure means the client is
/// gone: the command is killed and the failure returned.
pub fn run(
    spec: &RunSpec,
    env: &EnvStore,
    home: &Path,
    send: &mut dyn FnMut(OutputStream, &[u8]) -> io::Result<()>,
) -> Result<RunExit, Failure> {
    let run_as = users::run_as(spec.user.as_deref(), home)?;
    let home = run_as.home.as_path();
    let cwd = match &spec.cwd {
        Some(dir) => paths::resolve(dir, home)?,
        None => home.to_path_buf(),
    };
    let vars = env.for_command(home, &spec.env.0)?;
    let started = Instant::now();
    let mut process = child::spawn(&spec.command, &vars, &cwd, false, run_as.identity.as_ref())?;
    let deadline = (spec.timeout_ms > 0).then(|| started + Duration::from_millis(spec.timeout_ms));

    let mut limit = OutputLimit { limit: spec.max_output.min(MAX_OUTPUT_CEILING), sent: [0; 2], truncated: [false; 2] };
    let mut sink = |stream: OutputStream, data: &[u8]| limit.pass(stream, data, send);
    let waited = match process.follow(deadline, &mut sink) {
        Ok(waited) => waited,
        Err(e) => {
            let _ = process.kill_and_reap();
            return Err(Failure::Transport(e));
        }
    };
    let timed_out = waited == Waited::DeadlinePassed;
    let status = if timed_out { process.kill_and_reap() } else { process.reap() }
        .map_err(|e| Failure::Op(OpError::io("waiting for the command", &e)))?;
    process.drain(&mut sink).map_err(Failure::Transport)?;
    Ok(RunExit {
        status,
        timed_out,
        stdout_truncated: limit.truncated[0],
        stderr_truncated: limit.truncated[1],
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_protocol::{Command, EnvVars, ExitStatus};

    fn spec(line: &str, timeout_ms: u64, max_output: u64) -> RunSpec {
        RunSpec {
            command: Command::Shell(line.into()),
            env: EnvVars::default(),
            cwd: Some("/".into()),
            timeout_ms,
            max_output,
            user: None,
        }
    }

    #[test]
    fn output_over_the_limit_is_cut_and_flagged() {
        let mut out = Vec::new();
        let exit = run(
            &spec("printf 0123456789; printf ab >&2", 10_000, 4),
            &EnvStore::default(),
            Path::new("/"),
            &mut |s, d| {
                if s == OutputStream::Stdout {
                    out.extend_from_slice(d);
                }
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(out, b"0123");
        assert!(exit.stdout_truncated);
        assert!(!exit.stderr_truncated);
        assert_eq!(exit.status, ExitStatus::Code(0));
    }

    #[test]
    fn a_vanished_client_kills_the_command() {
        let result =
            run(&spec("while :; do echo spam; done", 0, 1 << 20), &EnvStore::default(), Path::new("/"), &mut |_, _| {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            });
        assert!(matches!(result, Err(Failure::Transport(_))));
    }
}

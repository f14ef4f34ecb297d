//! Interactive terminals through the real client and server: a shell on a pseudo-terminal sees
//! a terminal (`tty`, `stty size`, `test -t`), echoes what is typed, follows resizes, and ends
//! with all its jobs when killed.

mod agent_common;

use agent_common::TestAgent;
use agent_protocol::client::AttachReader;
use agent_protocol::{
    AgentError, AttachEvent, Command, EnvVars, ErrorCode, ExitStatus, PtySpec, SessionSpec, WindowSize,
};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn terminal(command: Option<&[&str]>, cols: u16, rows: u16) -> PtySpec {
    PtySpec {
        command: command.map(|argv| Command::Argv(argv.iter().map(|a| (*a).to_string()).collect())),
        env: EnvVars::default(),
        cwd: None,
        size: WindowSize { cols, rows },
        user: None,
    }
}

/// What a terminal printed, read as it arrives.
struct Screen {
    reader: AttachReader<UnixStream>,
    text: String,
    /// Where the unread part of `text` starts.
    mark: usize,
}

impl Screen {
    /// Everything printed since the last call, up to and including `needle`.
    fn until(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(at) = self.text[self.mark..].find(needle) {
                let end = self.mark + at + needle.len();
                let seen = self.text[self.mark..end].to_string();
                self.mark = end;
                return seen;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {needle:?} within 15 s; the terminal printed {:?}", &self.text[self.mark..]);
            match self.reader.next_event(Some(left)) {
                Ok(AttachEvent::Output { data, .. }) => self.text.push_str(&String::from_utf8_lossy(&data)),
                Ok(AttachEvent::ReplayEnd) => {}
                other => panic!("waiting for {needle:?}: {other:?}; printed {:?}", &self.text[self.mark..]),
            }
        }
    }

    /// The next event after the output, which must be the end.
    fn ended(&mut self) -> ExitStatus {
        loop {
            match self.reader.next_event(Some(Duration::from_secs(10))) {
                Ok(AttachEvent::Output { .. } | AttachEvent::ReplayEnd) => {}
                Ok(AttachEvent::Ended(status)) => return status,
                other => panic!("expected the end of the session, got {other:?}"),
            }
        }
    }
}

fn remote_code<T: std::fmt::Debug>(result: Result<T, AgentError>) -> ErrorCode {
    match result {
        Err(AgentError::Remote { code, .. }) => code,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[test]
fn a_login_shell_sees_a_terminal_of_the_requested_size_and_follows_a_resize() {
    let agent = TestAgent::start();
    let mut control = agent.client();
    let (id, pid) = control.pty_start(&terminal(None, 80, 24)).unwrap();
    assert!(pid > 0);
    let (mut keys, reader) = agent.client().attach(id).unwrap();
    let mut screen = Screen { reader, text: String::new(), mark: 0 };

    // Arithmetic makes each answer differ from the echo of the line that asks for it.
    keys.stdin(b"tty; echo A-$((1+1))\n").unwrap();
    let out = screen.until("A-2");
    assert!(out.contains("/dev/pts/"), "tty names a pseudo-terminal: {out:?}");
    assert!(!out.contains("not a tty"), "{out:?}");

    keys.stdin(b"stty size; echo B-$((2+2))\n").unwrap();
    let out = screen.until("B-4");
    assert!(out.contains("24 80\r\n"), "stty size is rows then columns: {out:?}");

    keys.stdin(b"test -t 0 && echo yes$((7*6)) || echo no$((7*6)); echo C-$((3+3))\n").unwrap();
    let out = screen.until("C-6");
    assert!(out.contains("yes42") && !out.contains("no42"), "stdin is a terminal: {out:?}");

    keys.stdin(b"echo $TERM T-$((4+4))\n").unwrap();
    let out = screen.until("T-8");
    assert!(out.contains("xterm-256color T-8"), "{out:?}");

    control.session_resize(id, WindowSize { cols: 120, rows: 40 }).unwrap();
    keys.stdin(b"stty size; echo D-$((5+5))\n").unwrap();
    let out = screen.until("D-10");
    assert!(out.contains("40 120\r\n"), "the resize reached the terminal: {out:?}");

    control.session_kill(id, libc::SIGKILL).unwrap();
    assert_eq!(screen.ended(), ExitStatus::Signal(libc::SIGKILL));
    let listed = control.session_list().unwrap();
    let me = listed.iter().find(|s| s.id == id).unwrap();
    assert_eq!(me.exit, Some(ExitStatus::Signal(libc::SIGKILL)));
    assert_eq!(remote_code(control.session_resize(id, WindowSize { cols: 80, rows: 24 })), ErrorCode::Conflict);
}

#[test]
fn typed_input_is_echoed_and_exit_ends_the_session() {
    let agent = TestAgent::start();
    let (id, _) = agent.client().pty_start(&terminal(Some(&["/bin/sh"]), 80, 24)).unwrap();
    let (mut keys, reader) = agent.client().attach(id).unwrap();
    let mut screen = Screen { reader, text: String::new(), mark: 0 };
    keys.stdin(b"echo hel''lo\n").unwrap();
    // The terminal echoes the line as typed (with the quotes), then the shell prints the word.
    let out = screen.until("hello\r\n");
    assert!(out.contains("echo hel''lo\r\n"), "{out:?}");
    keys.stdin(b"exit 3\n").unwrap();
    assert_eq!(screen.ended(), ExitStatus::Code(3));
}

#[test]
fn killing_a_terminal_ends_its_jobs_in_other_process_groups() {
    let agent = TestAgent::start();
    let mut control = agent.client();
    let (id, shell_pid) = control.pty_start(&terminal(None, 80, 24)).unwrap();
    let (mut keys, reader) = agent.client().attach(id).unwrap();
    let mut screen = Screen { reader, text: String::new(), mark: 0 };
    let pidfile = agent.dir.join("job.pid");
    keys.stdin(format!("sleep 300 & echo $! > {}; echo J-$((9+9))\n", pidfile.display()).as_bytes()).unwrap();
    screen.until("J-18");
    let job: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    // SAFETY: getpgid takes a pid by value.
    let job_group = unsafe { libc::getpgid(job) };
    assert_ne!(job_group, shell_pid as i32, "job control puts the job in a group of its own");

    control.session_kill(id, libc::SIGKILL).unwrap();
    assert_eq!(screen.ended(), ExitStatus::Signal(libc::SIGKILL));
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_alive(job) {
        assert!(Instant::now() < deadline, "the terminal's background job {job} outlived the kill");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Running or stopped, not a zombie waiting for its parent.
fn is_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
    state != Some("Z") && state != Some("X")
}

#[test]
fn bad_sizes_and_sessions_without_a_terminal_are_refused() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    for (cols, rows) in [(0, 24), (80, 0), (1001, 24), (80, u16::MAX)] {
        assert_eq!(remote_code(client.pty_start(&terminal(None, cols, rows))), ErrorCode::BadRequest, "{cols}x{rows}");
    }
    let (id, _) = client
        .session_start(&SessionSpec {
            command: Command::Shell("sleep 30".into()),
            env: EnvVars::default(),
            cwd: None,
            user: None,
        })
        .unwrap();
    assert_eq!(remote_code(client.session_resize(id, WindowSize { cols: 80, rows: 24 })), ErrorCode::Conflict);
    client.session_kill(id, libc::SIGKILL).unwrap();
    assert_eq!(remote_code(client.session_resize(4242, WindowSize { cols: 80, rows: 24 })), ErrorCode::NotFound);
    let (id, _) = client.pty_start(&terminal(Some(&["/bin/sh"]), 80, 24)).unwrap();
    assert_eq!(remote_code(client.session_resize(id, WindowSize { cols: 0, rows: 24 })), ErrorCode::BadRequest);
    client.session_kill(id, libc::SIGKILL).unwrap();
}

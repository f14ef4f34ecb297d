//! Commands, sessions, environment, CA trust and power requests through the real client and
//! server over a Unix socket.

mod agent_common;

use agent_common::{pattern, TestAgent, FAKE_SYSTEM_ROOTS};
use agent_protocol::{
    AgentError, AttachEvent, Command, EnvVars, ErrorCode, ExitStatus, OutputStream, Power, RunSpec, SessionSpec,
    WriteSpec,
};
use std::time::{Duration, Instant};

fn shell(line: &str) -> RunSpec {
    RunSpec::shell(line)
}

fn remote_code<T: std::fmt::Debug>(result: Result<T, AgentError>) -> (ErrorCode, String) {
    match result {
        Err(AgentError::Remote { code, message }) => (code, message),
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[test]
fn ping_reports_the_protocol_and_version() {
    let agent = TestAgent::start();
    let info = agent.client().ping().unwrap();
    assert_eq!(info.protocol, 1);
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
}

#[test]
fn echo_runs_and_its_output_comes_back() {
    let agent = TestAgent::start();
    let out = agent.client().run(&shell("echo hi")).unwrap();
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"");
    assert_eq!(out.exit.status, ExitStatus::Code(0));
    assert!(!out.exit.timed_out && !out.exit.stdout_truncated && !out.exit.stderr_truncated);
}

#[test]
fn a_failing_command_keeps_its_exit_code_and_stderr() {
    let agent = TestAgent::start();
    let out = agent.client().run(&shell("echo oops >&2; exit 3")).unwrap();
    assert_eq!(out.exit.status, ExitStatus::Code(3));
    assert_eq!(out.stderr, b"oops\n");
    let out = agent.client().run(&shell("kill -TERM $$")).unwrap();
    assert_eq!(out.exit.status, ExitStatus::Signal(libc::SIGTERM));
    assert_eq!(out.exit.status.shell_code(), 143);
}

#[test]
fn argv_commands_take_arguments_verbatim() {
    let agent = TestAgent::start();
    let mut spec = shell("");
    spec.command = Command::Argv(vec!["printf".into(), "%s|".into(), "a b".into(), "$HOME".into(), String::new()]);
    let out = agent.client().run(&spec).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "a b|$HOME||");

    spec.command = Command::Argv(vec!["/definitely/not/here".into()]);
    let (code, message) = remote_code(agent.client().run(&spec));
    assert_eq!(code, ErrorCode::NotFound);
    assert!(message.contains("/definitely/not/here"), "{message}");
}

#[test]
fn the_working_directory_defaults_to_home_and_resolves_relative_paths() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    let out = client.run(&shell("pwd")).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), agent.home.to_str().unwrap());

    std::fs::create_dir_all(agent.home.join("proj/src")).unwrap();
    let mut spec = shell("pwd");
    spec.cwd = Some("proj/./src".into());
    let out = client.run(&spec).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), agent.home.join("proj/src").to_str().unwrap());

    spec.cwd = Some("/no/such/dir".into());
    let (code, message) = remote_code(client.run(&spec));
    assert_eq!(code, ErrorCode::NotFound);
    assert!(message.contains("/no/such/dir"), "{message}");
}

#[test]
fn a_command_runs_as_its_user_with_that_users_home_and_an_unknown_user_is_refused() {
    // SAFETY: geteuid only reads this process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: running a command as another user needs root");
        return;
    }
    let agent = TestAgent::start();
    let mut client = agent.client();
    // `nobody` (65534) is in every Debian /etc/passwd, with a home that does not exist.
    let mut spec = shell("id -u; id -g; echo $HOME; pwd");
    spec.user = Some("nobody".into());
    let out = client.run(&spec).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "65534\n65534\n/\n/\n");
    spec.user = Some("4242:4343".into());
    let out = client.run(&spec).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "4242\n4343\n/\n/\n", "numeric ids need no entry");
    spec.user = Some("no-such-user-here".into());
    let (code, message) = remote_code(client.run(&spec));
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("not in the sandbox's /etc/passwd"), "{message}");
    // Without a user: root, as before.
    let out = client.run(&shell("id -u")).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "0\n");
}

#[test]
fn environment_layers_apply_to_later_commands() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    client
        .set_env(&[("API_TOKEN".into(), "osb_sealed_00112233".into()), ("MODE".into(), "stored".into())], &[])
        .unwrap();
    let mut spec = shell("echo $API_TOKEN $MODE $EXTRA; echo $PATH");
    spec.env = EnvVars(vec![("MODE".into(), "request".into()), ("EXTRA".into(), "x y".into())]);
    let out = client.run(&spec).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("osb_sealed_00112233 request x y"));
    assert!(lines.next().unwrap().contains("/usr/bin"));

    // Another connection sees the same stored variables; unset removes one.
    let mut other = agent.client();
    other.set_env(&[], &["MODE".into()]).unwrap();
    let out = other.run(&shell("echo \"[$API_TOKEN][$MODE]\"")).unwrap();
    assert_eq!(out.stdout, b"[osb_sealed_00112233][]\n");

    // Commands do not inherit the agent's own environment.
    std::env::set_var("AGENT_PROCESS_ONLY", "leak");
    let out = other.run(&shell("echo \"[$AGENT_PROCESS_ONLY]\"")).unwrap();
    assert_eq!(out.stdout, b"[]\n");

    let (code, _) = remote_code(other.set_env(&[("BAD=NAME".into(), "v".into())], &[]));
    assert_eq!(code, ErrorCode::BadRequest);
}

#[test]
fn a_command_past_its_timeout_is_killed_with_its_children_and_reported() {
    let agent = TestAgent::start();
    let pidfile = agent.dir.join("child.pid");
    let mut spec = shell(&format!("sleep 30 & echo $! > {}; echo started; sleep 30", pidfile.display()));
    spec.timeout_ms = 500;
    let started = Instant::now();
    let out = agent.client().run(&spec).unwrap();
    let elapsed = started.elapsed();
    assert!(out.exit.timed_out);
    assert_eq!(out.exit.status, ExitStatus::Signal(libc::SIGKILL));
    assert_eq!(out.stdout, b"started\n", "output before the timeout is kept");
    assert!(elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(out.exit.duration_ms >= 500);

    // The background child was in the same process group: it must be gone (or a zombie
    // awaiting its new parent), not sleeping.
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().and_then(|rest| rest.split_whitespace().next().map(String::from)));
        match state.as_deref() {
            None | Some("Z" | "X") => break,
            Some(other) if Instant::now() > deadline => panic!("child {pid} still alive in state {other}"),
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn a_command_within_its_timeout_is_not_flagged() {
    let agent = TestAgent::start();
    let mut spec = shell("sleep 0.2; echo done");
    spec.timeout_ms = 5000;
    let out = agent.client().run(&spec).unwrap();
    assert!(!out.exit.timed_out);
    assert_eq!(out.stdout, b"done\n");
}

#[test]
fn one_mebibyte_of_output_arrives_intact_on_both_streams() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    let data = pattern(1 << 20);
    client.write_file(&WriteSpec::new("blob.bin"), &data).unwrap();
    let out = client.run(&shell("cat blob.bin; cat blob.bin >&2")).unwrap();
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "stdout differs");
    assert!(out.stderr == data, "stderr differs");
    assert!(!out.exit.stdout_truncated && !out.exit.stderr_truncated);
}

#[test]
fn output_beyond_the_limit_is_truncated_and_flagged() {
    let agent = TestAgent::start();
    let mut spec = shell("head -c 3000000 /dev/zero; echo small >&2");
    spec.max_output = 1 << 20;
    let out = agent.client().run(&spec).unwrap();
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(out.exit.stdout_truncated);
    assert_eq!(out.stderr, b"small\n");
    assert!(!out.exit.stderr_truncated);
    assert_eq!(out.exit.status, ExitStatus::Code(0), "the command ran to the end");
}

#[test]
fn output_is_streamed_while_the_command_runs() {
    let agent = TestAgent::start();
    let started = Instant::now();
    let mut first_at = None;
    let mut seen = Vec::new();
    let exit = agent
        .client()
        .run_streaming(&shell("echo first; sleep 1; echo second"), |stream, data| {
            assert_eq!(stream, OutputStream::Stdout);
            first_at.get_or_insert(started.elapsed());
            seen.extend_from_slice(data);
        })
        .unwrap();
    assert_eq!(seen, b"first\nsecond\n");
    assert!(first_at.unwrap() < Duration::from_millis(800), "first output came at {first_at:?}");
    assert_eq!(exit.status, ExitStatus::Code(0));
}

#[test]
fn commands_on_separate_connections_run_concurrently() {
    let agent = TestAgent::start();
    let started = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let mut client = agent.client();
            std::thread::spawn(move || client.run(&shell(&format!("sleep 0.5; echo {i}"))).unwrap())
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap().stdout, format!("{i}\n").as_bytes());
    }
    assert!(started.elapsed() < Duration::from_millis(1800), "{:?}", started.elapsed());
}

#[test]
fn background_command_output_after_exit_does_not_hold_the_reply() {
    let agent = TestAgent::start();
    let started = Instant::now();
    let out = agent.client().run(&shell("(sleep 5; echo late) & echo now")).unwrap();
    assert_eq!(out.stdout, b"now\n");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

fn signal(pid: i32, sig: i32) -> i32 {
    // SAFETY: kill(2) with plain integers (signal 0 only checks that the process exists).
    unsafe { libc::kill(pid, sig) }
}

fn session(line: &str) -> SessionSpec {
    SessionSpec { command: Command::Shell(line.into()), env: EnvVars::default(), cwd: None, user: None }
}

#[test]
fn a_session_takes_stdin_and_streams_output_until_it_exits() {
    let agent = TestAgent::start();
    let (id, pid) = agent.client().session_start(&session("cat; echo bye >&2")).unwrap();
    assert!(pid > 0);
    let (mut writer, mut reader) = agent.client().attach(id).unwrap();
    // Nothing to replay yet: the replay ends at once.
    assert_eq!(reader.next_event(Some(Duration::from_secs(5))).unwrap(), AttachEvent::ReplayEnd);
    writer.stdin(b"hello\n").unwrap();
    match reader.next_event(Some(Duration::from_secs(5))).unwrap() {
        AttachEvent::Output { stream: OutputStream::Stdout, data } => assert_eq!(data, b"hello\n"),
        other => panic!("expected echoed stdin, got {other:?}"),
    }
    writer.close_stdin().unwrap();
    let mut stderr = Vec::new();
    loop {
        match reader.next_event(Some(Duration::from_secs(5))).unwrap() {
            AttachEvent::Output { stream: OutputStream::Stderr, data } => stderr.extend(data),
            AttachEvent::Ended(status) => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stderr, b"bye\n");
    let listed = agent.client().session_list().unwrap();
    let me = listed.iter().find(|s| s.id == id).unwrap();
    assert_eq!(me.exit, Some(ExitStatus::Code(0)));
    assert_eq!(me.command, "cat; echo bye >&2");
}

#[test]
fn sessions_are_listed_killed_and_replayed_to_late_attachers() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    let (id, pid) = client.session_start(&session("echo started; sleep 30")).unwrap();
    let listed = client.session_list().unwrap();
    let me = listed.iter().find(|s| s.id == id).unwrap();
    assert_eq!((me.pid, me.exit), (pid, None));

    // Wait until the output exists, then kill the whole group.
    std::thread::sleep(Duration::from_millis(300));
    client.session_kill(id, libc::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let exit = loop {
        let s = client.session_list().unwrap().into_iter().find(|s| s.id == id).unwrap();
        if let Some(exit) = s.exit {
            break exit;
        }
        assert!(Instant::now() < deadline, "session did not end after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit, ExitStatus::Signal(libc::SIGTERM));

    // Attaching afterwards replays the output and the end.
    let (_writer, mut reader) = agent.client().attach(id).unwrap();
    assert_eq!(
        reader.next_event(Some(Duration::from_secs(5))).unwrap(),
        AttachEvent::Output { stream: OutputStream::Stdout, data: b"started\n".to_vec() }
    );
    assert_eq!(reader.next_event(Some(Duration::from_secs(5))).unwrap(), AttachEvent::ReplayEnd);
    assert_eq!(reader.next_event(Some(Duration::from_secs(5))).unwrap(), AttachEvent::Ended(exit));

    let (code, _) = remote_code(client.session_kill(id, libc::SIGTERM));
    assert_eq!(code, ErrorCode::Conflict);
    let (code, _) = remote_code(client.session_kill(9999, libc::SIGTERM));
    assert_eq!(code, ErrorCode::NotFound);
    let (code, _) = remote_code(client.session_kill(id, 0));
    assert_eq!(code, ErrorCode::BadRequest);
    let (code, _) = remote_code(client.session_stdin(id, b"late"));
    assert_eq!(code, ErrorCode::Conflict);
}

#[test]
fn session_output_streams_live_to_an_attached_client() {
    let agent = TestAgent::start();
    let (id, _) = agent.client().session_start(&session("for i in 1 2 3; do echo $i; sleep 0.3; done")).unwrap();
    let (_writer, mut reader) = agent.client().attach(id).unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let mut arrivals = Vec::new();
    loop {
        match reader.next_event(Some(Duration::from_secs(5))).unwrap() {
            AttachEvent::Output { data, .. } => {
                arrivals.push(started.elapsed());
                out.extend(data);
            }
            AttachEvent::Ended(status) => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
            AttachEvent::ReplayEnd => {}
            other @ AttachEvent::Notice { .. } => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(out, b"1\n2\n3\n");
    assert!(arrivals.len() >= 2, "output arrived in one piece: {arrivals:?}");
    assert!(arrivals[0] < Duration::from_millis(500), "{arrivals:?}");
}

#[test]
fn session_stdin_without_attaching_and_killing_children_with_the_group() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    let pidfile = agent.dir.join("grandchild.pid");
    let (id, _) = client
        .session_start(&session(&format!("sleep 30 & echo $! > {}; read line; echo got:$line", pidfile.display())))
        .unwrap();
    client.session_stdin(id, b"abc\n").unwrap();
    let (_w, mut reader) = agent.client().attach(id).unwrap();
    let mut out = Vec::new();
    loop {
        match reader.next_event(Some(Duration::from_secs(5))).unwrap() {
            AttachEvent::Output { data, .. } => out.extend(data),
            AttachEvent::Ended(status) => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
            AttachEvent::ReplayEnd => {}
            other @ AttachEvent::Notice { .. } => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(out, b"got:abc\n");
    // The session's leader exited; its background child is still in the group.
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert_eq!(signal(pid, 0), 0, "background child should still run");
    signal(pid, libc::SIGKILL);
}

#[test]
fn stdin_to_a_process_that_closed_it_is_reported_during_the_attachment() {
    let agent = TestAgent::start();
    let (id, _) = agent.client().session_start(&session("exec 0<&-; sleep 1; echo end")).unwrap();
    let (mut writer, mut reader) = agent.client().attach(id).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    writer.stdin(b"nobody reads this").unwrap();
    let mut notice = None;
    loop {
        match reader.next_event(Some(Duration::from_secs(5))).unwrap() {
            AttachEvent::Notice { code, message } => notice = Some((code, message)),
            AttachEvent::Output { .. } | AttachEvent::ReplayEnd => {}
            AttachEvent::Ended(_) => break,
        }
    }
    let (code, message) = notice.expect("a notice about the closed stdin");
    assert_eq!(code, ErrorCode::Conflict, "{message}");
}

#[test]
fn attaching_to_an_unknown_session_is_an_error() {
    let agent = TestAgent::start();
    match agent.client().attach(424242) {
        Err(AgentError::Remote { code, .. }) => assert_eq!(code, ErrorCode::NotFound),
        Err(other) => panic!("expected NotFound, got {other:?}"),
        Ok(_) => panic!("attached to a session that does not exist"),
    }
}

#[test]
fn the_ca_is_installed_with_a_full_bundle_and_trust_variables() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    let pem = "-----BEGIN CERTIFICATE-----\nQVBQTElBTkNF\n-----END CERTIFICATE-----\n";
    let bundle = client.install_ca(pem.as_bytes()).unwrap();
    assert_eq!(bundle, agent.ca.bundle.to_str().unwrap());
    assert_eq!(std::fs::read_to_string(&agent.ca.cert).unwrap(), pem);
    assert_eq!(std::fs::read_to_string(&agent.ca.bundle).unwrap(), format!("{FAKE_SYSTEM_ROOTS}{pem}"));

    let out = client
        .run(&shell("echo $SSL_CERT_FILE; echo $REQUESTS_CA_BUNDLE; echo $NODE_EXTRA_CA_CERTS; echo $CURL_CA_BUNDLE; echo $GIT_SSL_CAINFO"))
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 5);
    assert!(text.lines().all(|l| l == bundle), "{text}");

    let (code, _) = remote_code(client.install_ca(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"));
    assert_eq!(code, ErrorCode::BadRequest);
}

#[test]
fn a_power_request_is_acknowledged_then_handed_to_the_handler() {
    let agent = TestAgent::start();
    agent.client().power(Power::Off).unwrap();
    wait_for_power_requests(&agent, 1);
    agent.client().power(Power::Reboot).unwrap();
    wait_for_power_requests(&agent, 2);
    assert_eq!(agent.power_requests.lock().unwrap().clone(), vec![Power::Off, Power::Reboot]);
}

/// The agent answers before it acts (the sandbox may go down right after), so wait a little.
fn wait_for_power_requests(agent: &TestAgent, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.power_requests.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "the power handler was not called");
        std::thread::sleep(Duration::from_millis(10));
    }
}

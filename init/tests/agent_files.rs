//! File operations through the real client and server: binary round trips, atomic replacement,
//! listing, stat, mkdir -p, removal and path handling.

mod agent_common;

use agent_common::{pattern, TestAgent};
use agent_protocol::frame;
use agent_protocol::message::{Reply, Request};
use agent_protocol::{AgentError, ErrorCode, WriteSpec};
use std::io::Write;
use std::time::{Duration, Instant};

fn remote_code<T: std::fmt::Debug>(result: Result<T, AgentError>) -> ErrorCode {
    match result {
        Err(AgentError::Remote { code, .. }) => code,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

/// Names in `dir` that look like leftover temporary files.
fn leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".oc-tmp"))
        .collect()
}

#[test]
fn binary_content_round_trips_exactly() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    // Several chunks, an odd size, every byte value.
    let data = pattern(3 * (1 << 20) + 7);
    assert!((0..=255u8).all(|b| data.contains(&b)));
    let path = agent.home.join("bin/blob");
    let size = client.write_file(&WriteSpec::new(path.to_str().unwrap()), &data).unwrap();
    assert_eq!(size, data.len() as u64);
    let back = client.read_file(path.to_str().unwrap(), 0).unwrap();
    assert!(back == data, "content differs");
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(client.stat(path.to_str().unwrap()).unwrap().size, data.len() as u64);

    // Empty files too.
    client.write_file(&WriteSpec::new("empty"), b"").unwrap();
    assert_eq!(client.read_file("empty", 0).unwrap(), b"");
}

#[test]
fn a_write_replaces_the_file_atomically_and_leaves_nothing_behind() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    client.write_file(&WriteSpec::new("conf.txt"), b"version 1\n").unwrap();
    client.write_file(&WriteSpec::new("conf.txt"), b"v2\n").unwrap();
    assert_eq!(std::fs::read(agent.home.join("conf.txt")).unwrap(), b"v2\n");
    assert!(leftovers(&agent.home).is_empty());
}

#[test]
fn an_interrupted_write_leaves_the_old_file_untouched() {
    let agent = TestAgent::start();
    std::fs::write(agent.home.join("keep.txt"), b"original").unwrap();
    let mut s = agent.raw();
    s.write_all(&Request::FileWrite(WriteSpec::new("keep.txt")).to_frame().unwrap()).unwrap();
    let ok = frame::read_frame(&mut s, Some(Duration::from_secs(5)), Duration::from_secs(5)).unwrap();
    assert_eq!(Reply::decode(ok.kind, &ok.payload).unwrap(), Reply::Ok);
    s.write_all(&Request::Data(b"partial new content".to_vec()).to_frame().unwrap()).unwrap();
    drop(s);
    // The agent notices the closed connection and discards the temporary file.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !leftovers(&agent.home).is_empty() {
        assert!(Instant::now() < deadline, "temporary file left behind: {:?}", leftovers(&agent.home));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(agent.home.join("keep.txt")).unwrap(), b"original");
}

#[test]
fn a_wrong_frame_inside_a_write_aborts_it_with_an_error() {
    let agent = TestAgent::start();
    let mut s = agent.raw();
    s.write_all(&Request::FileWrite(WriteSpec::new("x.txt")).to_frame().unwrap()).unwrap();
    s.write_all(&Request::Data(b"abc".to_vec()).to_frame().unwrap()).unwrap();
    s.write_all(&Request::Ping.to_frame().unwrap()).unwrap();
    let mut replies = Vec::new();
    for _ in 0..2 {
        let f = frame::read_frame(&mut s, Some(Duration::from_secs(5)), Duration::from_secs(5)).unwrap();
        replies.push(Reply::decode(f.kind, &f.payload).unwrap());
    }
    assert_eq!(replies[0], Reply::Ok);
    assert!(matches!(&replies[1], Reply::Error { code: ErrorCode::BadRequest, message } if message.contains("ping")));
    assert!(!agent.home.join("x.txt").exists());
}

#[test]
fn write_modes_parents_and_targets_are_checked() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    let spec = WriteSpec { path: "bin/tool.sh".into(), mode: Some(0o755), create_parents: true };
    client.write_file(&spec, b"#!/bin/sh\necho tool\n").unwrap();
    assert_eq!(client.stat("bin/tool.sh").unwrap().mode, 0o755);
    assert_eq!(client.run(&agent_protocol::RunSpec::shell("./bin/tool.sh")).unwrap().stdout, b"tool\n");

    let no_parents = WriteSpec { path: "missing/dir/f".into(), mode: None, create_parents: false };
    assert_eq!(remote_code(client.write_file(&no_parents, b"x")), ErrorCode::NotFound);
    assert_eq!(remote_code(client.write_file(&WriteSpec::new("bin"), b"x")), ErrorCode::IsADirectory);
    assert_eq!(remote_code(client.write_file(&WriteSpec::new("/"), b"x")), ErrorCode::IsADirectory);
    // The connection stays usable after refused writes.
    client.ping().unwrap();
}

#[test]
fn reads_report_missing_files_directories_and_limits() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    assert_eq!(remote_code(client.read_file("nope.txt", 0)), ErrorCode::NotFound);
    assert_eq!(remote_code(client.read_file(".", 0)), ErrorCode::IsADirectory);
    client.write_file(&WriteSpec::new("ten.txt"), b"0123456789").unwrap();
    assert_eq!(remote_code(client.read_file("ten.txt", 9)), ErrorCode::TooLarge);
    assert_eq!(client.read_file("ten.txt", 10).unwrap(), b"0123456789");
    client.ping().unwrap();
}

#[test]
fn listing_gives_name_kind_path_and_size() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    client.mkdir("proj/src").unwrap();
    client.write_file(&WriteSpec::new("proj/README"), b"hello").unwrap();
    client.write_file(&WriteSpec::new("proj/src/main.py"), b"print(1)\n").unwrap();
    std::os::unix::fs::symlink(agent.home.join("proj/src"), agent.home.join("proj/link")).unwrap();
    let entries = client.list_dir("proj").unwrap();
    let summary: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.is_dir, e.size)).collect();
    assert_eq!(summary, vec![("README", false, 5), ("link", true, 0), ("src", true, 0)]);
    assert_eq!(entries[0].path, agent.home.join("proj/README").to_str().unwrap());

    assert_eq!(remote_code(client.list_dir("proj/README")), ErrorCode::NotADirectory);
    assert_eq!(remote_code(client.list_dir("nothing-here")), ErrorCode::NotFound);
    assert!(client.list_dir("proj/src/../src").unwrap().iter().any(|e| e.name == "main.py"));
}

#[test]
fn large_listings_arrive_complete_across_several_batches() {
    let agent = TestAgent::start();
    let dir = agent.home.join("many");
    std::fs::create_dir(&dir).unwrap();
    let count = 3000;
    for i in 0..count {
        std::fs::write(dir.join(format!("{i:05}-{}", "n".repeat(120))), b"").unwrap();
    }
    let entries = agent.client().list_dir("many").unwrap();
    assert_eq!(entries.len(), count);
    assert!(entries.windows(2).all(|w| w[0].name < w[1].name));
    assert!(entries[0].name.starts_with("00000-"));
}

#[test]
fn stat_describes_files_directories_and_links() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    client.write_file(&WriteSpec::new("f.txt"), b"12345").unwrap();
    std::os::unix::fs::symlink("f.txt", agent.home.join("l")).unwrap();
    let st = client.stat("f.txt").unwrap();
    assert_eq!((st.name.as_str(), st.is_dir, st.is_symlink, st.size, st.mode), ("f.txt", false, false, 5, 0o644));
    assert!(st.modified_ms > 1_600_000_000_000, "{}", st.modified_ms);
    let link = client.stat("l").unwrap();
    assert!(link.is_symlink && !link.is_dir);
    assert_eq!(link.size, 5);
    assert!(client.stat(".").unwrap().is_dir);
    assert_eq!(remote_code(client.stat("missing")), ErrorCode::NotFound);
}

#[test]
fn mkdir_creates_parents_and_is_idempotent() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    client.mkdir("a/b/c/d").unwrap();
    client.mkdir("a/b/c/d").unwrap();
    assert!(agent.home.join("a/b/c/d").is_dir());
    client.write_file(&WriteSpec::new("a/file"), b"x").unwrap();
    assert_eq!(remote_code(client.mkdir("a/file")), ErrorCode::AlreadyExists);
    assert_eq!(remote_code(client.mkdir("a/file/sub")), ErrorCode::NotADirectory);
}

#[test]
fn remove_handles_files_links_and_directories() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    client.write_file(&WriteSpec::new("d/inner/f"), b"x").unwrap();
    client.write_file(&WriteSpec::new("target"), b"keep").unwrap();
    std::os::unix::fs::symlink(agent.home.join("target"), agent.home.join("link")).unwrap();

    client.remove("link", false).unwrap();
    assert!(!agent.home.join("link").exists());
    assert_eq!(std::fs::read(agent.home.join("target")).unwrap(), b"keep", "the link's target stays");

    assert_eq!(remote_code(client.remove("d", false)), ErrorCode::DirectoryNotEmpty);
    client.remove("d", true).unwrap();
    assert!(!agent.home.join("d").exists());
    client.remove("target", false).unwrap();
    assert_eq!(remote_code(client.remove("target", false)), ErrorCode::NotFound);
    assert_eq!(remote_code(client.remove("/", true)), ErrorCode::BadRequest);
    assert_eq!(remote_code(client.remove("/..", true)), ErrorCode::BadRequest);
}

#[test]
fn rename_moves_files_and_directories_and_refuses_the_root() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    client.write_file(&WriteSpec::new("a.txt"), b"content").unwrap();
    client.write_file(&WriteSpec::new("old.txt"), b"replaced").unwrap();
    client.rename("a.txt", "old.txt").unwrap();
    assert!(!agent.home.join("a.txt").exists());
    assert_eq!(std::fs::read(agent.home.join("old.txt")).unwrap(), b"content", "a file at `to` is replaced");

    client.write_file(&WriteSpec::new("dir/inner"), b"x").unwrap();
    client.rename("dir", "moved").unwrap();
    assert_eq!(std::fs::read(agent.home.join("moved/inner")).unwrap(), b"x");

    assert_eq!(remote_code(client.rename("missing", "x")), ErrorCode::NotFound);
    assert_eq!(remote_code(client.rename("moved", "no/such/parent")), ErrorCode::NotFound);
    assert_eq!(remote_code(client.rename("/", "x")), ErrorCode::BadRequest);
    assert_eq!(remote_code(client.rename("old.txt", "/..")), ErrorCode::BadRequest);
    assert!(agent.home.join("old.txt").exists());
}

#[test]
fn paths_are_resolved_against_home_and_normalised() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    client.write_file(&WriteSpec::new("sub/../plain.txt"), b"p").unwrap();
    assert_eq!(std::fs::read(agent.home.join("plain.txt")).unwrap(), b"p");
    assert_eq!(client.read_file("./plain.txt", 0).unwrap(), b"p");
    let abs = agent.home.join("plain.txt");
    assert_eq!(client.read_file(&format!("{}/x/../plain.txt", agent.home.display()), 0).unwrap(), b"p");
    let st = client.stat(&format!("{}//plain.txt", agent.home.display())).unwrap();
    assert_eq!(st.path, abs.to_str().unwrap());
    // `..` climbs lexically from home.
    let up = format!("{}{}/plain.txt", "../".repeat(10), agent.home.strip_prefix("/").unwrap().display());
    assert_eq!(client.read_file(&up, 0).unwrap(), b"p");

    assert_eq!(remote_code(client.read_file("", 0)), ErrorCode::BadRequest);
    assert_eq!(remote_code(client.read_file("bad\0name", 0)), ErrorCode::BadRequest);
    assert_eq!(remote_code(client.stat(&"x/".repeat(3000))), ErrorCode::BadRequest);
    client.ping().unwrap();
}

//! Writes the seed inputs under `seeds/<target>/`: one or a few valid examples per target, built
//! with the product's own encoders where there are some, so the fuzzer starts past the magic
//! numbers and checksums. Run from init/fuzz: `cargo run --example make_seeds`.

use agent_protocol::message::{Reply, Request};
use agent_protocol::{
    Command, DirEntry, EnvVars, ErrorCode, ExitStatus, FileStat, OutputStream, PtySpec, RunExit, RunSpec, SessionInfo,
    WindowSize, WriteSpec,
};
use boot_disk::gpt::{Gpt, Guid, Partition, ESP_TYPE, LINUX_FS_TYPE};
use init::sys::net::dhcp::frame::{broadcast_datagram, CLIENT_PORT, SERVER_PORT};
use std::fs;
use std::path::Path;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

/// Frame kind followed by payload: the input of `agent_request` and `agent_reply`.
fn kind_and_payload(frame: &[u8]) -> Vec<u8> {
    let mut out = vec![frame[3]];
    out.extend_from_slice(&frame[8..]);
    out
}

fn agent() {
    let requests = [
        Request::Ping,
        Request::Run(RunSpec {
            command: Command::Shell("echo hi".into()),
            env: EnvVars(vec![("A".into(), "b".into())]),
            cwd: Some("/tmp".into()),
            timeout_ms: 1000,
            max_output: 4096,
        }),
        Request::Run(RunSpec {
            command: Command::Argv(vec!["ls".into(), "-l".into()]),
            env: EnvVars::default(),
            cwd: None,
            timeout_ms: 0,
            max_output: 0,
        }),
        Request::FileWrite(WriteSpec { path: "/a".into(), mode: Some(0o600), create_parents: true }),
        Request::SetEnv { set: EnvVars(vec![("K".into(), "v".into())]), unset: vec!["OLD".into()] },
        Request::SessionStdin { id: 1, data: b"x\n".to_vec() },
        Request::PtyStart(PtySpec {
            command: None,
            env: EnvVars(vec![("TERM".into(), "vt100".into())]),
            cwd: Some("/tmp".into()),
            size: WindowSize { cols: 80, rows: 24 },
        }),
        Request::SessionResize { id: 1, size: WindowSize { cols: 120, rows: 40 } },
    ];
    let replies = [
        Reply::error(ErrorCode::NotFound, "no such file"),
        Reply::Pong { protocol: 1, agent_version: "0.1.0".into() },
        Reply::Output { stream: OutputStream::Stdout, data: b"out".to_vec() },
        Reply::Exited(RunExit {
            status: ExitStatus::Signal(9),
            timed_out: true,
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 5,
        }),
        Reply::Sessions(vec![SessionInfo {
            id: 1,
            pid: 2,
            command: "sleep 9".into(),
            exit: Some(ExitStatus::Code(0)),
        }]),
        Reply::DirEntries {
            entries: vec![DirEntry { name: "a".into(), is_dir: true, path: "/a".into(), size: 0 }],
            more: true,
        },
        Reply::Stat(FileStat {
            path: "/a".into(),
            name: "a".into(),
            is_dir: false,
            is_symlink: false,
            size: 1,
            mode: 0o644,
            modified_ms: 1,
        }),
    ];
    let mut stream = vec![3, 1, 0, 5];
    for (i, r) in requests.iter().enumerate() {
        let frame = r.to_frame().expect("frame");
        write("agent_request", &format!("seed-{i}"), &kind_and_payload(&frame));
        stream.extend_from_slice(&frame);
    }
    for (i, r) in replies.iter().enumerate() {
        let frame = r.to_frame().expect("frame");
        write("agent_reply", &format!("seed-{i}"), &kind_and_payload(&frame));
        stream.extend_from_slice(&frame);
    }
    write("agent_frames", "seed-0", &stream);
}

/// A DHCP reply as a server sends it (the UDP payload).
fn dhcp_reply(kind: u8, options: &[(u8, &[u8])]) -> Vec<u8> {
    let mut p = vec![0u8; 240];
    p[0] = 2;
    p[1] = 1;
    p[2] = 6;
    p[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    p[16..20].copy_from_slice(&[10, 0, 2, 15]);
    p[28..34].copy_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    p[236..240].copy_from_slice(&[99, 130, 83, 99]);
    p.extend_from_slice(&[53, 1, kind]);
    for (code, value) in options {
        p.push(*code);
        p.push(value.len() as u8);
        p.extend_from_slice(value);
    }
    p.push(255);
    p
}

fn dhcp() {
    let server: &[u8] = &[10, 0, 2, 2];
    let offer = dhcp_reply(2, &[(54, server), (51, &[0, 0, 0x0e, 0x10])]);
    let ack = dhcp_reply(
        5,
        &[
            (1, &[255, 255, 255, 0]),
            (3, server),
            (6, &[10, 0, 2, 3, 9, 9, 9, 9]),
            (51, &[0, 0, 0x0e, 0x10]),
            (58, &[0, 0, 0x07, 0x08]),
            (59, &[0, 0, 0x0c, 0x4e]),
            (54, server),
        ],
    );
    let nak = dhcp_reply(6, &[(54, server), (56, b"wrong network")]);
    let mut overloaded = dhcp_reply(5, &[(52, &[3]), (54, server)]);
    overloaded[108..115].copy_from_slice(&[51, 4, 0, 0, 0, 60, 255]);
    overloaded[44..51].copy_from_slice(&[6, 4, 10, 0, 2, 3, 255]);
    for (i, m) in [&offer, &ack, &nak, &overloaded].into_iter().enumerate() {
        write("dhcp_message", &format!("seed-{i}"), m);
    }

    // As a packet from the server: the client's own framing with the ports swapped.
    let mut packet = broadcast_datagram(&ack).expect("datagram");
    packet[20..22].copy_from_slice(&SERVER_PORT.to_be_bytes());
    packet[22..24].copy_from_slice(&CLIENT_PORT.to_be_bytes());
    let mut input = vec![1];
    input.extend_from_slice(&packet);
    write("dhcp_frame", "seed-0", &input);

    let script = |mode: u8, replies: &[&[u8]]| {
        let mut out = vec![mode];
        for r in replies {
            out.extend_from_slice(&(r.len() as u16).to_be_bytes());
            out.push(3);
            out.extend_from_slice(r);
        }
        out
    };
    write("dhcp_client", "seed-0", &script(0, &[&offer, &ack]));
    write("dhcp_client", "seed-1", &script(0, &[&offer, &nak, &offer, &ack]));
    write("dhcp_client", "seed-2", &script(1, &[&ack]));
}

fn gpt() {
    // A disk of the minimum size the target builds (69 sectors) with two one-sector partitions.
    let sectors = 69;
    let mut table = Gpt::new(Guid::from_random([1; 16]));
    let part = |type_guid, name: &str, lba| Partition {
        type_guid,
        guid: Guid::from_random([lba as u8; 16]),
        first_lba: lba,
        last_lba: lba,
        attributes: 0,
        name: name.into(),
    };
    table.add(part(ESP_TYPE, "oc-esp", 34)).expect("slot");
    table.add(part(LINUX_FS_TYPE, "oc-system-a", 35)).expect("slot");
    let (primary, _, _) = table.encode(sectors).expect("encode");
    // Flags: fix both CRCs; no extra sectors; the header sector and the two used entries.
    let mut input = vec![4 | 8, 0];
    input.extend_from_slice(&primary[512..1024 + 2 * 128]);
    write("gpt", "seed-0", &input);
}

/// A tiny FAT32 filesystem: 512-byte sectors, one sector per cluster, one FAT of one sector.
/// Root (cluster 2): EFI/ and opencomputer.conf; EFI (3): Linux/ (4) holding
/// opencomputer-1-a.efi (clusters 5-6).
fn fat() {
    const SECTORS: usize = 12;
    let mut img = vec![0u8; SECTORS * 512];
    let bpb = &mut img[..512];
    bpb[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
    bpb[3..11].copy_from_slice(b"mkseeds ");
    bpb[11..13].copy_from_slice(&512u16.to_le_bytes());
    bpb[13] = 1; // sectors per cluster
    bpb[14..16].copy_from_slice(&1u16.to_le_bytes()); // reserved sectors
    bpb[16] = 1; // FATs
    bpb[32..36].copy_from_slice(&(SECTORS as u32).to_le_bytes());
    bpb[36..40].copy_from_slice(&1u32.to_le_bytes()); // sectors per FAT
    bpb[44..48].copy_from_slice(&2u32.to_le_bytes()); // root cluster
    bpb[510] = 0x55;
    bpb[511] = 0xAA;
    let fat_table: [u32; 8] =
        [0x0FFF_FFF8, 0x0FFF_FFFF, 0x0FFF_FFFF, 0x0FFF_FFFF, 0x0FFF_FFFF, 6, 0x0FFF_FFFF, 0x0FFF_FFFF];
    for (i, v) in fat_table.iter().enumerate() {
        img[512 + 4 * i..516 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    let cluster = |n: usize| (2 + n - 2) * 512;
    let mut root = Vec::new();
    short_entry(&mut root, b"EFI        ", 0x10, 3, 0);
    long_entries(&mut root, "opencomputer.conf");
    short_entry(&mut root, b"OPENCO~1CON", 0x20, 7, 10);
    let mut efi = Vec::new();
    short_entry(&mut efi, b".          ", 0x10, 3, 0);
    short_entry(&mut efi, b"..         ", 0x10, 0, 0);
    short_entry(&mut efi, b"LINUX      ", 0x10, 4, 0);
    let mut linux = Vec::new();
    long_entries(&mut linux, "opencomputer-1-a.efi");
    short_entry(&mut linux, b"OPENCO~1EFI", 0x20, 5, 600);
    for (n, dir) in [(2, root), (3, efi), (4, linux)] {
        img[cluster(n)..cluster(n) + dir.len()].copy_from_slice(&dir);
    }
    for (i, b) in img[cluster(5)..cluster(5) + 600].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    img[cluster(7)..cluster(7) + 10].copy_from_slice(b"key=value\n");
    write("fat", "seed-0", &img);
    // The regression of a looping directory chain: the root's chain points back at itself and
    // the boot sector claims 2^32 sectors (fat::tests::a_directory_chain_that_loops_...).
    img[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    img[512 + 8..512 + 12].copy_from_slice(&2u32.to_le_bytes());
    write("fat", "loop", &img);
}

fn short_entry(dir: &mut Vec<u8>, name: &[u8; 11], attr: u8, cluster: u32, size: u32) {
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    dir.extend_from_slice(&e);
}

/// Long-name entries for `name`, last part first as on disk.
fn long_entries(dir: &mut Vec<u8>, name: &str) {
    let mut units: Vec<u16> = name.encode_utf16().collect();
    units.push(0);
    let parts: Vec<Vec<u16>> = units.chunks(13).map(|c| c.to_vec()).collect();
    for (i, part) in parts.iter().enumerate().rev() {
        let mut e = [0u8; 32];
        e[0] = (i as u8 + 1) | if i == parts.len() - 1 { 0x40 } else { 0 };
        e[11] = 0x0F;
        let mut padded = part.clone();
        padded.resize(13, 0xFFFF);
        let slots = (1..11).step_by(2).chain((14..26).step_by(2)).chain((28..32).step_by(2));
        for (at, unit) in slots.zip(padded) {
            e[at..at + 2].copy_from_slice(&unit.to_le_bytes());
        }
        dir.extend_from_slice(&e);
    }
}

/// A minimal PE32+ with the sections a unified kernel image must carry, packed back to back.
fn uki() {
    let parts: [(&str, &[u8]); 4] = [
        (".osrel", b"ID=opencomputer\nOPENCOMPUTER_VERSION=\"1.2\"\n"),
        (".cmdline", b"console=ttyS0 oc.slot=a oc.boot=disk"),
        (".linux", b"kernel"),
        (".initrd", b"initrd"),
    ];
    let coff = 0x40;
    let optional_size = 112;
    let table = coff + 24 + optional_size;
    let mut pe = vec![0u8; table + 40 * parts.len()];
    pe[..2].copy_from_slice(b"MZ");
    pe[0x3C..0x40].copy_from_slice(&(coff as u32).to_le_bytes());
    pe[coff..coff + 4].copy_from_slice(b"PE\0\0");
    pe[coff + 6..coff + 8].copy_from_slice(&(parts.len() as u16).to_le_bytes());
    pe[coff + 20..coff + 22].copy_from_slice(&(optional_size as u16).to_le_bytes());
    pe[coff + 24..coff + 26].copy_from_slice(&0x20Bu16.to_le_bytes());
    for (i, (name, data)) in parts.iter().enumerate() {
        let s = table + 40 * i;
        let offset = pe.len() as u32;
        pe[s..s + name.len()].copy_from_slice(name.as_bytes());
        pe[s + 8..s + 12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        pe[s + 16..s + 20].copy_from_slice(&(data.len() as u32).to_le_bytes());
        pe[s + 20..s + 24].copy_from_slice(&offset.to_le_bytes());
        pe.extend_from_slice(data);
    }
    write("uki", "seed-0", &pe);
}

fn boot_entry() {
    write(
        "boot_entry",
        "seed-0",
        b"opencomputer-1-a.efi\nopencomputer-2-b+3.efi\nOPENCOMPUTER-12-A+0-3.EFI\nBOOTX64.EFI\nconsole=ttyS0 oc.slot=b",
    );
}

fn main() {
    agent();
    dhcp();
    gpt();
    fat();
    uki();
    boot_entry();
    println!("seeds written under seeds/");
}

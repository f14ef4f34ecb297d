//! Real network bring-up against a real DHCP server, inside network namespaces this test
//! creates: `busybox udhcpd` on one end of a veth pair, our client on the other. The host's
//! interfaces, routes and /etc/resolv.conf are never touched: the client thread enters the
//! client namespace with setns(2) and a private mount namespace with its own /etc.
//!
//! Needs root, `ip` (iproute2) and busybox with udhcpd (Debian: busybox-static). Without them
//! the tests print SKIPPED and pass, unless OC_REQUIRE_NETNS_TESTS=1 makes that a failure.

use init::sys::net::{self, NetConfig};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn prerequisites_met(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip =
        Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    let udhcpd =
        Command::new("busybox").args(["udhcpd", "--help"]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if root && ip && udhcpd {
        return true;
    }
    let why = format!("{test}: needs root ({root}), ip ({ip}) and busybox udhcpd ({udhcpd})");
    assert!(std::env::var("OC_REQUIRE_NETNS_TESTS").as_deref() != Ok("1"), "{why}");
    eprintln!("SKIPPED {why}");
    false
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A scratch directory for the DHCP server's files, removed on drop.
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Moves the calling thread into network namespace `name` and gives it a private mount
/// namespace with an empty tmpfs on /etc, so whatever it writes there stays in the test.
fn enter_isolated(name: &str) {
    let ns = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: `ns` is an open namespace file; setns affects only the calling thread.
    assert_eq!(
        unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: unshare with a constant flag; only this thread's mount namespace changes.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNS) }, 0, "unshare: {}", std::io::Error::last_os_error());
    let root = c"/";
    let etc = c"/etc";
    let tmpfs = c"tmpfs";
    // SAFETY: all strings are NUL-terminated literals; null data/fstype are allowed here.
    unsafe {
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0
        );
        assert_eq!(libc::mount(tmpfs.as_ptr(), etc.as_ptr(), tmpfs.as_ptr(), 0, std::ptr::null()), 0);
    }
}

/// Runs `f` on a fresh thread inside the isolated client namespace; the calling thread stays
/// in the host namespaces so its cleanup (`ip netns del`) acts on the real mounts.
fn in_namespace<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let name = name.to_string();
    std::thread::spawn(move || {
        enter_isolated(&name);
        f()
    })
    .join()
    .unwrap_or_else(|_| panic!("client thread panicked"))
}

static RENEWAL_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record(line: &str) {
    eprintln!("renewal: {line}");
    RENEWAL_LOG.lock().unwrap().push(line.to_string());
}

fn wait_for_log(needle: &str, after: usize, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if RENEWAL_LOG.lock().unwrap().iter().skip(after).any(|l| l.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn start_udhcpd(dir: &std::path::Path, srv: &str, iface: &str, lease_secs: u32) -> Server {
    let conf = dir.join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.199.0.100\nend 10.199.0.110\ninterface {iface}\nlease_file {leases}\npidfile {pid}\n\
             option subnet 255.255.255.0\noption router 10.199.0.1\noption dns 10.199.0.53 10.199.0.54\n\
             option lease {lease_secs}\n",
            leases = dir.join("leases").display(),
            pid = dir.join("udhcpd.pid").display(),
        ),
    )
    .unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", srv, "busybox", "udhcpd", "-f", "-a", "200"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Server(child)
}

/// A server namespace and a client namespace joined by a veth pair (server end 10.199.0.1/24),
/// plus a scratch directory for the server's files. `tag` keeps parallel tests apart.
fn dhcp_pair(tag: &str) -> (Netns, Netns, String, String, ScratchDir) {
    let pid = std::process::id();
    let srv = Netns::new(format!("ocnet-{tag}srv-{pid}"));
    let cli = Netns::new(format!("ocnet-{tag}cli-{pid}"));
    let (vs, vc) = (format!("o{tag}s{pid}"), format!("o{tag}c{pid}"));
    run(&["ip", "-n", &srv.0, "link", "add", &vs, "type", "veth", "peer", "name", &vc, "netns", &cli.0]);
    run(&["ip", "-n", &srv.0, "addr", "add", "10.199.0.1/24", "dev", &vs]);
    run(&["ip", "-n", &srv.0, "link", "set", &vs, "up"]);
    let dir = std::env::temp_dir().join(format!("ocnet-udhcpd-{tag}-{pid}"));
    std::fs::create_dir_all(&dir).unwrap();
    (srv, cli, vs, vc, ScratchDir(dir))
}

#[test]
fn dhcp_configures_the_interface_and_renews_the_lease() {
    if !prerequisites_met("dhcp_configures_the_interface_and_renews_the_lease") {
        return;
    }
    let host_resolv_before = std::fs::read("/etc/resolv.conf").ok();
    let (srv, cli, vs, vc, dir) = dhcp_pair("d");
    let server = start_udhcpd(&dir.0, &srv.0, &vs, 6);

    let iface = vc.clone();
    let (status, checks) = in_namespace(&cli.0, move || {
        run(&["ip", "link", "set", "lo", "down"]);
        net::bring_up_loopback().unwrap();
        let lo = run(&["ip", "-4", "-o", "addr", "show", "dev", "lo"]);

        let cfg = NetConfig::from_cmdline("console=ttyS0 oc.net=dhcp").unwrap();
        let started = Instant::now();
        let status = net::configure(&cfg, &iface).unwrap();
        let took = started.elapsed();
        let addr = run(&["ip", "-4", "-o", "addr", "show", "dev", &iface]);
        let route = run(&["ip", "-4", "route", "show", "default"]);
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap();
        net::spawn_dhcp_renewal(&status, record);
        (status, (lo, took, addr, route, resolv))
    });
    let (lo, took, addr, route, resolv) = checks;
    eprintln!("DHCP took {took:?}: {status:?}");

    assert!(lo.contains("inet 127.0.0.1/8"), "loopback: {lo}");
    assert_eq!(status.source, "dhcp");
    assert_eq!(status.interface, vc);
    let octets = status.address.octets();
    assert!(octets[..3] == [10, 199, 0] && (100..=110).contains(&octets[3]), "address {}", status.address);
    assert_eq!(status.prefix_len, 24);
    assert_eq!(status.gateway, Some(Ipv4Addr::new(10, 199, 0, 1)));
    assert_eq!(status.dns, vec![Ipv4Addr::new(10, 199, 0, 53), Ipv4Addr::new(10, 199, 0, 54)]);
    assert_eq!(status.lease_secs, Some(6));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(addr.contains(&format!("inet {}/24", status.address)), "ip addr: {addr}");
    assert!(route.contains(&format!("default via 10.199.0.1 dev {vc}")), "ip route: {route}");
    assert!(resolv.contains("nameserver 10.199.0.53\nnameserver 10.199.0.54\n"), "resolv.conf: {resolv}");

    // T1 is 3 s into the 6 s lease: two renewals must succeed with the address unchanged.
    assert!(
        wait_for_log("renewed for 6 s", 0, Duration::from_secs(10)),
        "no renewal: {:?}",
        RENEWAL_LOG.lock().unwrap()
    );
    let seen = RENEWAL_LOG.lock().unwrap().len();
    assert!(wait_for_log("renewed for 6 s", seen, Duration::from_secs(10)), "no second renewal");
    let addr_after = in_namespace(&cli.0, {
        let vc = vc.clone();
        move || run(&["ip", "-4", "-o", "addr", "show", "dev", &vc])
    });
    assert!(addr_after.contains(&format!("inet {}/24", status.address)), "after renewal: {addr_after}");

    // Server gone: renewal and rebinding fail, the lease expires and the address is removed.
    drop(server);
    let seen = RENEWAL_LOG.lock().unwrap().len();
    assert!(wait_for_log("expired", seen, Duration::from_secs(12)), "no expiry: {:?}", RENEWAL_LOG.lock().unwrap());
    assert!(wait_for_log("removed", seen, Duration::from_secs(2)));
    let addr_gone = in_namespace(&cli.0, {
        let vc = vc.clone();
        move || run(&["ip", "-4", "-o", "addr", "show", "dev", &vc])
    });
    assert!(!addr_gone.contains("inet "), "address still there after expiry: {addr_gone}");

    // Server back: the thread finds it again and configures a new lease.
    let _server = start_udhcpd(&dir.0, &srv.0, &vs, 6);
    let seen = RENEWAL_LOG.lock().unwrap().len();
    assert!(
        wait_for_log("new lease: 10.199.0.", seen, Duration::from_secs(40)),
        "no new lease: {:?}",
        RENEWAL_LOG.lock().unwrap()
    );
    let route_back = in_namespace(&cli.0, || run(&["ip", "-4", "route", "show", "default"]));
    assert!(route_back.contains("default via 10.199.0.1"), "route after new lease: {route_back}");

    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), host_resolv_before, "host resolv.conf changed");
}

#[test]
fn static_configuration_sets_address_routes_and_dns() {
    if !prerequisites_met("static_configuration_sets_address_routes_and_dns") {
        return;
    }
    let host_resolv_before = std::fs::read("/etc/resolv.conf").ok();
    let pid = std::process::id();
    let ns = Netns::new(format!("ocnet-static-{pid}"));
    let (dev, peer) = (format!("ocd{pid}"), format!("ocp{pid}"));
    run(&["ip", "-n", &ns.0, "link", "add", &dev, "type", "veth", "peer", "name", &peer]);

    let iface = dev.clone();
    let (status, addr, routes, resolv, off_link) = in_namespace(&ns.0, move || {
        let cmdline = format!("oc.net=static oc.ip=10.198.0.7/24 oc.gw=10.198.0.1 oc.dns=10.198.0.53 oc.iface={iface}");
        let cfg = NetConfig::from_cmdline(&cmdline).unwrap();
        let status = net::configure(&cfg, &iface).unwrap();
        let addr = run(&["ip", "-4", "-o", "addr", "show", "dev", &iface]);
        let routes = run(&["ip", "-4", "route", "show"]);
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap();

        // A /32 with a gateway outside it (as some clouds hand out): reached via a host route.
        let cfg = NetConfig::from_cmdline("oc.net=static oc.ip=10.197.5.5/32 oc.gw=10.197.0.1").unwrap();
        net::configure(&cfg, &iface).unwrap();
        let off_link = run(&["ip", "-4", "route", "show"]);
        (status, addr, routes, resolv, off_link)
    });
    assert_eq!(status.source, "static");
    assert_eq!((status.address, status.prefix_len), (Ipv4Addr::new(10, 198, 0, 7), 24));
    assert_eq!(status.lease_secs, None);
    assert!(addr.contains("inet 10.198.0.7/24"), "{addr}");
    assert!(routes.contains(&format!("default via 10.198.0.1 dev {dev}")), "{routes}");
    assert!(routes.contains(&format!("10.198.0.0/24 dev {dev}")), "{routes}");
    assert!(resolv.ends_with("nameserver 10.198.0.53\n"), "{resolv}");
    assert!(off_link.contains(&format!("default via 10.197.0.1 dev {dev}")), "{off_link}");
    assert!(off_link.contains(&format!("10.197.0.1 dev {dev}")), "{off_link}");
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), host_resolv_before, "host resolv.conf changed");
}

/// The fallback transport for kernels without packet sockets: a UDP socket on an interface
/// that has no address yet, which works because the server broadcasts its replies.
#[test]
fn udp_fallback_obtains_a_lease_without_an_address() {
    use init::sys::net::dhcp::transport::UdpTransport;
    use init::sys::net::dhcp::{Backoff, Client};
    if !prerequisites_met("udp_fallback_obtains_a_lease_without_an_address") {
        return;
    }
    let (srv, cli, vs, vc, dir) = dhcp_pair("u");
    let _server = start_udhcpd(&dir.0, &srv.0, &vs, 60);
    let lease = in_namespace(&cli.0, move || {
        run(&["ip", "link", "set", &vc, "up"]);
        let link = run(&["ip", "-o", "link", "show", "dev", &vc]);
        let mac_text = link.split("link/ether ").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap();
        let mac: Vec<u8> = mac_text.split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
        let mut socket = UdpTransport::open(&vc).unwrap();
        Client::new(&mut socket, mac.try_into().unwrap(), Backoff::BOOT)
            .obtain(Instant::now() + Duration::from_secs(10))
    })
    .unwrap();
    assert!(
        lease.address.octets()[..3] == [10, 199, 0] && (100..=110).contains(&lease.address.octets()[3]),
        "{lease:?}"
    );
    assert_eq!((lease.server, lease.lease_secs, lease.prefix_len), (Ipv4Addr::new(10, 199, 0, 1), 60, 24));
}

//! `proxy` command line: for now only `bench`, which measures the sealing proxy
//! against a direct connection to the same loopback TLS upstream, in one run.
//! It must never talk to anything but loopback, and never print a secret value.

mod bench;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") if args.len() == 1 => {
            if let Err(e) = bench::run() {
                eprintln!("proxy bench failed: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("usage: proxy bench");
            std::process::exit(2);
        }
    }
}

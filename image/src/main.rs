//! `image` CLI: `build` the boot artifacts, or `run` the appliance in QEMU.

use image::disk_image;
use image::pipeline::{self, Variant};
use image::run::{self, RunOptions};
use std::process::ExitCode;

const USAGE: &str = "usage:
  image build [--variant product|test|bench] [--disk]
                                           build kernel, guest kernel and initramfs (cached);
                                           --disk: also the bootable UEFI disk image and its manifest
  image run [--disk] [--port N] [--cpus N] [--memory MiB] [--data-disk PATH] [--data-disk-gib N] [--proxy-config JSON]
            [--plain-http] [--no-tpm]
                                           build what is missing, boot the appliance in QEMU,
                                           print its API address (HTTPS) and the CA file to trust;
                                           Ctrl-C shuts it down cleanly.
                                           --disk: boot the disk image under UEFI (--data-disk is then
                                           the persistent copy of it, grown to --data-disk-gib)
                                           --plain-http: serve the API over plain HTTP instead
                                           --no-tpm: no software TPM (swtpm) attached; the appliance then
                                           keeps its master key on the boot disk (ESP) or data disk";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => parse_build(&args[1..]).and_then(|(v, disk)| build(v, disk).map_err(|e| e.to_string())),
        Some("run") => parse_run(&args[1..]).and_then(|o| run::run(o).map_err(|e| e.to_string())),
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}\n{USAGE}")),
        None => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("image: {message}");
            ExitCode::FAILURE
        }
    }
}

fn build(variant: Variant, disk: bool) -> image::Result<()> {
    if disk {
        let (a, d) = disk_image::build_disk(variant)?;
        println!("kernel: {}\ninitramfs: {}\ncmdline: {}", a.kernel.display(), a.initramfs.display(), a.cmdline);
        println!("disk image: {}\nsha256: {}\nmanifest: {}", d.path.display(), d.sha256, d.manifest.display());
    } else {
        let a = pipeline::build(variant)?;
        println!("kernel: {}\ninitramfs: {}\ncmdline: {}", a.kernel.display(), a.initramfs.display(), a.cmdline);
    }
    Ok(())
}

fn parse_build(args: &[String]) -> Result<(Variant, bool), String> {
    let disk = args.iter().any(|a| a == "--disk");
    let rest: Vec<&String> = args.iter().filter(|a| *a != "--disk").collect();
    let variant = match rest.as_slice() {
        [] => Variant::Product,
        [flag, value] if *flag == "--variant" => match value.as_str() {
            "product" => Variant::Product,
            "test" => Variant::Test,
            "bench" => Variant::Bench,
            other => return Err(format!("--variant {other:?}: expected product, test or bench")),
        },
        _ => return Err(format!("bad arguments {args:?}\n{USAGE}")),
    };
    Ok((variant, disk))
}

fn parse_run(args: &[String]) -> Result<RunOptions, String> {
    let mut opts = RunOptions::default();
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        if flag == "--disk" {
            opts.disk = true;
            continue;
        }
        if flag == "--plain-http" {
            opts.plain_http = true;
            continue;
        }
        if flag == "--no-tpm" {
            opts.tpm = false;
            continue;
        }
        let value = iter.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |what: &str| value.parse::<u64>().map_err(|_| format!("{flag} {value:?}: {what} expected"));
        match flag.as_str() {
            "--port" => {
                opts.port = u16::try_from(number("a port")?).map_err(|_| format!("--port {value}: out of range"))?;
            }
            "--cpus" => {
                opts.cpus =
                    Some(u32::try_from(number("a CPU count")?).map_err(|_| format!("--cpus {value}: out of range"))?);
            }
            "--memory" => {
                opts.memory_mib =
                    u32::try_from(number("MiB")?).map_err(|_| format!("--memory {value}: out of range"))?;
            }
            "--data-disk" => opts.data_disk = Some(value.into()),
            "--data-disk-gib" => opts.data_disk_gib = number("GiB")?,
            "--proxy-config" => {
                let path = std::path::PathBuf::from(value);
                if !path.is_file() {
                    return Err(format!("--proxy-config {value}: no such file"));
                }
                opts.proxy_config = Some(path);
            }
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    if opts.cpus == Some(0) || opts.memory_mib < 1024 {
        return Err("the appliance needs at least 1 CPU and 1024 MiB".into());
    }
    Ok(opts)
}

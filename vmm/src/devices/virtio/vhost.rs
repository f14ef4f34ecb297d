//! The kernel's vhost-vsock device (/dev/vhost-vsock): the ioctls that hand it the guest's
//! memory map and vrings, so the host kernel moves vsock packets without the VMM.
//! Request numbers and structure layouts are from <linux/vhost.h> and <linux/vhost_types.h>.

use std::fs::File;
use std::os::unix::io::{AsRawFd, RawFd};

const VHOST_TYPE: u64 = 0xaf;

const fn io(nr: u64) -> u64 {
    (VHOST_TYPE << 8) | nr
}
const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (VHOST_TYPE << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (VHOST_TYPE << 8) | nr
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct VringState {
    index: u32,
    num: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct VringFile {
    index: u32,
    fd: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct VringAddr {
    index: u32,
    flags: u32,
    desc_user_addr: u64,
    used_user_addr: u64,
    avail_user_addr: u64,
    log_guest_addr: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct MemoryRegion {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub flags_padding: u64,
}

/// `struct vhost_memory` header; the regions follow it in the same buffer.
#[repr(C)]
struct MemoryHeader {
    nregions: u32,
    padding: u32,
}

pub const GET_FEATURES: u64 = ior(0x00, 8);
pub const SET_FEATURES: u64 = iow(0x00, 8);
pub const SET_OWNER: u64 = io(0x01);
pub const SET_MEM_TABLE: u64 = iow(0x03, std::mem::size_of::<MemoryHeader>());
pub const SET_VRING_NUM: u64 = iow(0x10, std::mem::size_of::<VringState>());
pub const SET_VRING_ADDR: u64 = iow(0x11, std::mem::size_of::<VringAddr>());
pub const SET_VRING_BASE: u64 = iow(0x12, std::mem::size_of::<VringState>());
pub const SET_VRING_KICK: u64 = iow(0x20, std::mem::size_of::<VringFile>());
pub const SET_VRING_CALL: u64 = iow(0x21, std::mem::size_of::<VringFile>());
pub const VSOCK_SET_GUEST_CID: u64 = iow(0x60, 8);
pub const VSOCK_SET_RUNNING: u64 = iow(0x61, std::mem::size_of::<i32>());

/// The ioctls a running VM may still issue (device activation and reset happen on vCPU
/// threads when the guest driver writes the status register); the seccomp filter allows them.
pub const RUNTIME_IOCTLS: [u64; 8] = [
    SET_FEATURES,
    SET_MEM_TABLE,
    SET_VRING_NUM,
    SET_VRING_ADDR,
    SET_VRING_BASE,
    SET_VRING_KICK,
    SET_VRING_CALL,
    VSOCK_SET_RUNNING,
];

pub struct VhostVsock {
    file: File,
}

impl VhostVsock {
    /// Takes ownership of an opened /dev/vhost-vsock and claims guest CID `cid`.
    /// The CID is claimed here, at start, so a CID already in use fails the VMM early.
    pub fn new(file: File, cid: u64) -> Result<Self, String> {
        let v = VhostVsock { file };
        v.ioctl_none(SET_OWNER).map_err(|e| format!("VHOST_SET_OWNER failed: {e}"))?;
        v.ioctl_ptr(VSOCK_SET_GUEST_CID, &cid).map_err(|e| match e.raw_os_error() {
            Some(libc::EADDRINUSE) => format!("vsock CID {cid} is already used by another VM"),
            _ => format!("cannot set vsock CID {cid}: {e}"),
        })?;
        Ok(v)
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn ioctl_none(&self, req: u64) -> std::io::Result<()> {
        // SAFETY: a request without an argument on a file descriptor we own.
        let r = unsafe { libc::ioctl(self.fd(), req as libc::c_ulong, 0) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn ioctl_ptr<T>(&self, req: u64, arg: &T) -> std::io::Result<()> {
        // SAFETY: every request passed here takes a pointer to exactly a `T` (the request
        // number encodes its size), which lives across the call; the kernel only reads it.
        let r = unsafe { libc::ioctl(self.fd(), req as libc::c_ulong, arg as *const T) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn features(&self) -> std::io::Result<u64> {
        let mut f = 0u64;
        // SAFETY: GET_FEATURES writes one u64 to the pointer we pass, which is valid.
        let r = unsafe { libc::ioctl(self.fd(), GET_FEATURES as libc::c_ulong, &mut f as *mut u64) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(f)
        }
    }

    pub fn set_features(&self, f: u64) -> std::io::Result<()> {
        self.ioctl_ptr(SET_FEATURES, &f)
    }

    pub fn set_mem_table(&self, regions: &[MemoryRegion]) -> std::io::Result<()> {
        let header = std::mem::size_of::<MemoryHeader>();
        let region = std::mem::size_of::<MemoryRegion>();
        // u64 storage keeps the buffer 8-byte aligned for the kernel's struct layout.
        let mut buf = vec![0u64; (header + std::mem::size_of_val(regions)) / 8];
        buf[0] = regions.len() as u64; // nregions (low half), padding (high half)
        for (i, r) in regions.iter().enumerate() {
            let at = (header + i * region) / 8;
            buf[at..at + 4].copy_from_slice(&[r.guest_phys_addr, r.memory_size, r.userspace_addr, 0]);
        }
        // SAFETY: `buf` holds a complete `struct vhost_memory` with `nregions` regions and
        // lives across the call; the kernel copies it.
        let r = unsafe { libc::ioctl(self.fd(), SET_MEM_TABLE as libc::c_ulong, buf.as_ptr()) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn set_vring_num(&self, index: u32, num: u16) -> std::io::Result<()> {
        self.ioctl_ptr(SET_VRING_NUM, &VringState { index, num: num as u32 })
    }

    pub fn set_vring_base(&self, index: u32, base: u16) -> std::io::Result<()> {
        self.ioctl_ptr(SET_VRING_BASE, &VringState { index, num: base as u32 })
    }

    pub fn set_vring_addr(&self, index: u32, desc: u64, avail: u64, used: u64) -> std::io::Result<()> {
        let a = VringAddr {
            index,
            flags: 0,
            desc_user_addr: desc,
            used_user_addr: used,
            avail_user_addr: avail,
            log_guest_addr: 0,
        };
        self.ioctl_ptr(SET_VRING_ADDR, &a)
    }

    pub fn set_vring_kick(&self, index: u32, fd: RawFd) -> std::io::Result<()> {
        self.ioctl_ptr(SET_VRING_KICK, &VringFile { index, fd })
    }

    pub fn set_vring_call(&self, index: u32, fd: RawFd) -> std::io::Result<()> {
        self.ioctl_ptr(SET_VRING_CALL, &VringFile { index, fd })
    }

    pub fn set_running(&self, running: bool) -> std::io::Result<()> {
        self.ioctl_ptr(VSOCK_SET_RUNNING, &(running as i32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        // Values as the C macros in <linux/vhost.h> expand on x86-64.
        assert_eq!(GET_FEATURES, 0x8008_af00);
        assert_eq!(SET_FEATURES, 0x4008_af00);
        assert_eq!(SET_OWNER, 0xaf01);
        assert_eq!(SET_MEM_TABLE, 0x4008_af03);
        assert_eq!(SET_VRING_NUM, 0x4008_af10);
        assert_eq!(SET_VRING_ADDR, 0x4028_af11);
        assert_eq!(SET_VRING_BASE, 0x4008_af12);
        assert_eq!(SET_VRING_KICK, 0x4008_af20);
        assert_eq!(SET_VRING_CALL, 0x4008_af21);
        assert_eq!(VSOCK_SET_GUEST_CID, 0x4008_af60);
        assert_eq!(VSOCK_SET_RUNNING, 0x4004_af61);
    }
}

//! The kernel's vhost-vsock device (/dev/vhost-vsock): the ioctls that hand it the guest's
//! memory map and vrings, so the host kernel moves vsock packets without the VMM.
//! Request numbers and structure layouts are from <linux/vhost.h> and <linux/vhost_types.h>.

use std::fs::File;
use std::os::raw::{c_int, c_uint, c_ulong};
use std::os::unix::io::RawFd;

use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// The ioctl "type" byte of every vhost request (`VHOST_VIRTIO` in <linux/vhost.h>).
const VHOST_VIRTIO: c_uint = 0xaf;

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

// Each line reads like its <linux/vhost.h> definition: direction, number, argument type.
ioctl_ior_nr!(VHOST_GET_FEATURES, VHOST_VIRTIO, 0x00, u64);
ioctl_iow_nr!(VHOST_SET_FEATURES, VHOST_VIRTIO, 0x00, u64);
ioctl_io_nr!(VHOST_SET_OWNER, VHOST_VIRTIO, 0x01);
ioctl_iow_nr!(VHOST_SET_MEM_TABLE, VHOST_VIRTIO, 0x03, MemoryHeader);
ioctl_iow_nr!(VHOST_SET_VRING_NUM, VHOST_VIRTIO, 0x10, VringState);
ioctl_iow_nr!(VHOST_SET_VRING_ADDR, VHOST_VIRTIO, 0x11, VringAddr);
ioctl_iow_nr!(VHOST_SET_VRING_BASE, VHOST_VIRTIO, 0x12, VringState);
ioctl_iowr_nr!(VHOST_GET_VRING_BASE, VHOST_VIRTIO, 0x12, VringState);
ioctl_iow_nr!(VHOST_SET_VRING_KICK, VHOST_VIRTIO, 0x20, VringFile);
ioctl_iow_nr!(VHOST_SET_VRING_CALL, VHOST_VIRTIO, 0x21, VringFile);
ioctl_iow_nr!(VHOST_VSOCK_SET_GUEST_CID, VHOST_VIRTIO, 0x60, u64);
ioctl_iow_nr!(VHOST_VSOCK_SET_RUNNING, VHOST_VIRTIO, 0x61, c_int);

/// The ioctls a running VM may still issue (device activation and reset happen on vCPU
/// threads when the guest driver writes the status register); the seccomp filter allows them.
pub fn runtime_ioctls() -> [c_ulong; 8] {
    [
        VHOST_SET_FEATURES(),
        VHOST_SET_MEM_TABLE(),
        VHOST_SET_VRING_NUM(),
        VHOST_SET_VRING_ADDR(),
        VHOST_SET_VRING_BASE(),
        VHOST_SET_VRING_KICK(),
        VHOST_SET_VRING_CALL(),
        VHOST_VSOCK_SET_RUNNING(),
    ]
}

pub struct VhostVsock {
    file: File,
}

impl VhostVsock {
    /// Takes ownership of an opened /dev/vhost-vsock and claims guest CID `cid`.
    /// The CID is claimed here, at start, so a CID already in use fails the VMM early.
    pub fn new(file: File, cid: u64) -> Result<Self, String> {
        let v = VhostVsock { file };
        // SAFETY: VHOST_SET_OWNER takes no argument; the fd is the vhost device we own.
        check(unsafe { ioctl(&v.file, VHOST_SET_OWNER()) }).map_err(|e| format!("VHOST_SET_OWNER failed: {e}"))?;
        v.write_arg(VHOST_VSOCK_SET_GUEST_CID(), &cid).map_err(|e| match e.raw_os_error() {
            Some(libc::EADDRINUSE) => format!("vsock CID {cid} is already used by another VM"),
            _ => format!("cannot set vsock CID {cid}: {e}"),
        })?;
        Ok(v)
    }

    /// Issues a request whose argument is a pointer to one `T` that the kernel reads.
    /// Every caller pairs a request with the `T` its ioctl_iow_nr! line names.
    fn write_arg<T>(&self, req: c_ulong, arg: &T) -> std::io::Result<()> {
        // SAFETY: the request's argument is a `T` (its number encodes size_of::<T>), `arg`
        // lives across the call and the kernel only reads it.
        check(unsafe { ioctl_with_ref(&self.file, req, arg) })
    }

    pub fn features(&self) -> std::io::Result<u64> {
        let mut f = 0u64;
        // SAFETY: VHOST_GET_FEATURES writes one u64 through the pointer, which is valid.
        check(unsafe { ioctl_with_mut_ref(&self.file, VHOST_GET_FEATURES(), &mut f) })?;
        Ok(f)
    }

    pub fn set_features(&self, f: u64) -> std::io::Result<()> {
        self.write_arg(VHOST_SET_FEATURES(), &f)
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
        // SAFETY: `buf` holds a complete `struct vhost_memory` with `nregions` regions (more
        // than the header size the request number names) and lives across the call; the
        // kernel copies it.
        check(unsafe { ioctl_with_ptr(&self.file, VHOST_SET_MEM_TABLE(), buf.as_ptr()) })
    }

    pub fn set_vring_num(&self, index: u32, num: u16) -> std::io::Result<()> {
        self.write_arg(VHOST_SET_VRING_NUM(), &VringState { index, num: u32::from(num) })
    }

    pub fn set_vring_base(&self, index: u32, base: u16) -> std::io::Result<()> {
        self.write_arg(VHOST_SET_VRING_BASE(), &VringState { index, num: u32::from(base) })
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
        self.write_arg(VHOST_SET_VRING_ADDR(), &a)
    }

    pub fn set_vring_kick(&self, index: u32, fd: RawFd) -> std::io::Result<()> {
        self.write_arg(VHOST_SET_VRING_KICK(), &VringFile { index, fd })
    }

    pub fn set_vring_call(&self, index: u32, fd: RawFd) -> std::io::Result<()> {
        self.write_arg(VHOST_SET_VRING_CALL(), &VringFile { index, fd })
    }

    pub fn set_running(&self, running: bool) -> std::io::Result<()> {
        self.write_arg(VHOST_VSOCK_SET_RUNNING(), &c_int::from(running))
    }

    /// The next available-ring entry the backend will take from queue `index`.
    pub fn vring_base(&self, index: u32) -> std::io::Result<u16> {
        let mut state = VringState { index, num: 0 };
        // SAFETY: the kernel fills in one vhost_vring_state, which `state` is.
        check(unsafe { ioctl_with_mut_ref(&self.file, VHOST_GET_VRING_BASE(), &mut state) })?;
        Ok(state.num as u16)
    }
}

/// The requests a snapshot makes from the main thread: stop the backend, read its positions,
/// start it again.
pub fn snapshot_ioctls() -> [c_ulong; 2] {
    [VHOST_GET_VRING_BASE(), VHOST_VSOCK_SET_RUNNING()]
}

/// An ioctl's return value as a Result (negative means errno is set).
fn check(ret: c_int) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        // Values as the C macros in <linux/vhost.h> expand on x86-64.
        assert_eq!(VHOST_GET_FEATURES(), 0x8008_af00);
        assert_eq!(VHOST_SET_FEATURES(), 0x4008_af00);
        assert_eq!(VHOST_SET_OWNER(), 0xaf01);
        assert_eq!(VHOST_SET_MEM_TABLE(), 0x4008_af03);
        assert_eq!(VHOST_SET_VRING_NUM(), 0x4008_af10);
        assert_eq!(VHOST_SET_VRING_ADDR(), 0x4028_af11);
        assert_eq!(VHOST_SET_VRING_BASE(), 0x4008_af12);
        assert_eq!(VHOST_GET_VRING_BASE(), 0xc008_af12);
        assert_eq!(VHOST_SET_VRING_KICK(), 0x4008_af20);
        assert_eq!(VHOST_SET_VRING_CALL(), 0x4008_af21);
        assert_eq!(VHOST_VSOCK_SET_GUEST_CID(), 0x4008_af60);
        assert_eq!(VHOST_VSOCK_SET_RUNNING(), 0x4004_af61);
    }
}

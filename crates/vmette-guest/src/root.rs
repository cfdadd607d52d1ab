//! Mounts: the early ones in the initramfs, then the root the host asked for.
//!
//! The root is assembled under [`NEW_ROOT`] and then moved over `/`, with
//! the agent `chroot`ing into it. The agent keeps running from memory, so
//! every command it starts afterwards sees only the new root.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot, sethostname};
use vmette_proto::{BootEnvelope, OverlayUpper, RootSource};

const LOWER: &str = "/vmette/lower";
const UPPER: &str = "/vmette/upper";
const NEW_ROOT: &str = "/vmette/root";

/// How long to wait for a block device with a given serial to show up.
const DEVICE_WAIT: Duration = Duration::from_secs(5);

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    fs::create_dir_all(target)?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| io::Error::other(format!("mounting {fstype} {source} on {target}: {e}")))
}

fn move_mount(from: &str, to: &str) -> io::Result<()> {
    fs::create_dir_all(to)?;
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| io::Error::other(format!("moving {from} to {to}: {e}")))
}

/// Phase 1: the pseudo file systems every later phase needs. The cloud
/// kernel does not mount devtmpfs by itself.
pub fn mount_early() -> io::Result<()> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)
}

/// Phase 4: builds the root described by `envelope` and switches into it.
pub fn assemble(envelope: &BootEnvelope) -> io::Result<()> {
    let root_dir = match &envelope.root {
        RootSource::Block { serial, fstype } => {
            let device = find_disk(serial)?;
            mount_fs(
                &device.to_string_lossy(),
                LOWER,
                fstype,
                MsFlags::MS_RDONLY,
                None,
            )?;
            overlay(&envelope.overlay)?
        }
        RootSource::VirtioFs { tag, writable } => {
            if *writable {
                mount_fs(tag, NEW_ROOT, "virtiofs", MsFlags::empty(), None)?;
                NEW_ROOT
            } else {
                mount_fs(tag, LOWER, "virtiofs", MsFlags::MS_RDONLY, None)?;
                overlay(&envelope.overlay)?
            }
        }
    };
    let root = Path::new(root_dir);

    for share in &envelope.shares {
        let target = root.join(share.guest_path.trim_start_matches('/'));
        let flags = if share.read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        mount_fs(
            &share.tag,
            &target.to_string_lossy(),
            "virtiofs",
            flags,
            None,
        )?;
    }

    for serial in &envelope.disks {
        let device = find_disk(serial)?;
        let by_id = Path::new("/dev/disk/by-id");
        fs::create_dir_all(by_id)?;
        symlink(&device, by_id.join(format!("virtio-{serial}")))?;
    }

    for dir in ["dev", "proc", "sys"] {
        move_mount(&format!("/{dir}"), &format!("{root_dir}/{dir}"))?;
    }
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs(
        "devpts",
        &format!("{root_dir}/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_fs(
        "shm",
        &format!("{root_dir}/dev/shm"),
        "tmpfs",
        nodev,
        Some("mode=1777"),
    )?;
    mount_fs(
        "run",
        &format!("{root_dir}/run"),
        "tmpfs",
        nodev,
        Some("mode=0755"),
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let link = root.join("dev").join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(target, link)?;
        }
    }

    chdir(root_dir).map_err(io::Error::from)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| io::Error::other(format!("moving the new root over /: {e}")))?;
    chroot(".").map_err(io::Error::from)?;
    chdir("/").map_err(io::Error::from)?;

    sethostname(&envelope.hostname).map_err(io::Error::from)?;
    crate::network::bring_up_loopback();
    Ok(())
}

/// Mounts the writable upper layer and the overlay; returns the new root.
fn overlay(upper: &OverlayUpper) -> io::Result<&'static str> {
    match upper {
        OverlayUpper::Tmpfs => {
            mount_fs("upper", UPPER, "tmpfs", MsFlags::empty(), Some("mode=0755"))?
        }
        OverlayUpper::Disk { serial } => {
            let device = find_disk(serial)?;
            mount_fs(
                &device.to_string_lossy(),
                UPPER,
                "ext4",
                MsFlags::empty(),
                None,
            )?;
        }
    }
    fs::create_dir_all(format!("{UPPER}/data"))?;
    fs::create_dir_all(format!("{UPPER}/work"))?;
    let options = format!("lowerdir={LOWER},upperdir={UPPER}/data,workdir={UPPER}/work");
    mount_fs(
        "overlay",
        NEW_ROOT,
        "overlay",
        MsFlags::empty(),
        Some(&options),
    )?;
    Ok(NEW_ROOT)
}

/// Finds the virtio-blk device whose serial is `serial`. The order in which
/// virtio-mmio devices are probed is not the order they were given, so
/// serials, not names, identify disks.
fn find_disk(serial: &str) -> io::Result<PathBuf> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        for entry in fs::read_dir("/sys/block")?.flatten() {
            let found = fs::read_to_string(entry.path().join("serial"))
                .map(|s| s.trim_end() == serial)
                .unwrap_or(false);
            if found {
                return Ok(Path::new("/dev").join(entry.file_name()));
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no disk with serial {serial}"),
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Flushes file systems and powers the VM off. Never returns in a VM; the
/// exit code only matters when the agent was started outside one.
pub fn power_off() -> ExitCode {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("vmette-guest: power off failed: {e}");
    ExitCode::FAILURE
}

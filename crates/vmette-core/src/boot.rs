//! From a [`Config`] to the machine and the guest's boot envelope: resolves
//! the kernel, initramfs and root image, creates the scratch disk, and
//! assigns every disk a serial and every share a tag.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use vmette_assets::{guest_agent, image, initramfs, kernel, Cache, Progress};
use vmette_proto::{BootEnvelope, OverlayUpper, RootSource, ShareMount};

use crate::engine::{DiskSpec, ShareSpec, VmSpec};
use crate::network::NetworkAttachment;
use crate::{Config, Error, Rootfs};

const ROOT_SERIAL: &str = "vmette-root";
const SCRATCH_SERIAL: &str = "vmette-scratch";
const ROOT_TAG: &str = "vmette-root";

/// The files a VM boots from, resolved for one config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs with the guest agent.
    pub initramfs: PathBuf,
    /// The default root image, when the config uses it.
    pub default_image: Option<PathBuf>,
}

/// Resolves (fetching or building on first use) the files the VM boots;
/// the initramfs carries `engine_modules` too.
pub fn prepare(
    config: &Config,
    engine_modules: &[&str],
    progress: &dyn Progress,
) -> Result<BootFiles, Error> {
    let cache = Cache::locate().map_err(Error::Assets)?;
    let kernel = match &config.kernel {
        Some(image) => kernel::for_image(&cache, image),
        None => kernel::ensure(&cache, progress),
    }
    .map_err(Error::Assets)?;
    let initramfs = match &config.initramfs {
        Some(path) => path.clone(),
        None => {
            let agent = guest_agent::locate().map_err(Error::Assets)?;
            initramfs::ensure(&cache, &kernel, &agent, engine_modules).map_err(Error::Assets)?
        }
    };
    let default_image = match config.rootfs {
        Rootfs::Default => Some(image::ensure_default(&cache, progress).map_err(Error::Assets)?),
        _ => None,
    };
    Ok(BootFiles {
        kernel: kernel.image,
        initramfs,
        default_image,
    })
}

/// Builds the machine spec and the boot envelope for a validated config,
/// with the network device of `network` when the guest has one. Creates
/// the scratch disk in `run_dir` when the config asks for one.
///
/// Refuses a writable share or root directory that contains the kernel,
/// the initramfs or a read-only image: a guest must not be able to change
/// what it, or the next VM, boots from.
pub fn layout(
    config: &Config,
    files: &BootFiles,
    network: Option<&dyn NetworkAttachment>,
    run_dir: &Path,
) -> Result<(VmSpec, BootEnvelope), Error> {
    let mut disks = Vec::new();
    let mut shares = Vec::new();

    let root = match (&config.rootfs, &files.default_image) {
        (Rootfs::Directory { path, writable }, _) => {
            shares.push(ShareSpec {
                tag: ROOT_TAG.into(),
                path: path.clone(),
                read_only: !writable,
            });
            RootSource::VirtioFs {
                tag: ROOT_TAG.into(),
                writable: *writable,
            }
        }
        (Rootfs::Image(path), _) | (Rootfs::Default, Some(path)) => {
            let fstype = detect_fstype(path)?;
            disks.push(DiskSpec {
                serial: ROOT_SERIAL.into(),
                path: path.clone(),
                read_only: true,
            });
            RootSource::Block {
                serial: ROOT_SERIAL.into(),
                fstype: fstype.into(),
            }
        }
        (Rootfs::Named(name), _) => {
            return Err(Error::InvalidConfig {
                field: "rootfs",
                reason: format!("the image {name:?} is not resolved yet"),
            })
        }
        (Rootfs::Default, None) => {
            return Err(Error::InvalidConfig {
                field: "rootfs",
                reason: "no default image was prepared".into(),
            })
        }
    };

    let overlay = match config.scratch_mib {
        Some(mib) => {
            let path = run_dir.join("scratch.ext4");
            create_scratch(&path, mib)?;
            disks.push(DiskSpec {
                serial: SCRATCH_SERIAL.into(),
                path,
                read_only: false,
            });
            OverlayUpper::Disk {
                serial: SCRATCH_SERIAL.into(),
            }
        }
        None => OverlayUpper::Tmpfs,
    };

    let mut mounts = Vec::new();
    for (index, share) in config.shares.iter().enumerate() {
        let tag = format!("vmette-share{index}");
        shares.push(ShareSpec {
            tag: tag.clone(),
            path: share.host_path.clone(),
            read_only: !share.writable,
        });
        mounts.push(ShareMount {
            tag,
            guest_path: share.guest_path.clone(),
            read_only: !share.writable,
        });
    }

    let mut disk_serials = Vec::new();
    for (index, disk) in config.disks.iter().enumerate() {
        let serial = format!("vmette-disk{index}");
        disks.push(DiskSpec {
            serial: serial.clone(),
            path: disk.path.clone(),
            read_only: disk.read_only,
        });
        disk_serials.push(serial);
    }

    let boot_files = [files.kernel.as_path(), files.initramfs.as_path()]
        .into_iter()
        .chain(
            disks
                .iter()
                .filter(|d| d.read_only)
                .map(|d| d.path.as_path()),
        );
    guard_boot_files(&shares, boot_files)?;

    let spec = VmSpec {
        kernel: files.kernel.clone(),
        initramfs: files.initramfs.clone(),
        cmdline_extra: config.cmdline_extra.clone().unwrap_or_default(),
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        disks,
        shares,
        nic: network.map(|n| n.nic()),
        accel: config.accel,
        run_dir: run_dir.to_path_buf(),
    };
    let envelope = BootEnvelope {
        root,
        overlay,
        shares: mounts,
        disks: disk_serials,
        hostname: "vmette".into(),
        network: network.map(|n| n.guest()),
    };
    Ok((spec, envelope))
}

fn guard_boot_files<'a>(
    shares: &[ShareSpec],
    files: impl Iterator<Item = &'a Path>,
) -> Result<(), Error> {
    let files: Vec<PathBuf> = files.filter_map(|file| file.canonicalize().ok()).collect();
    for share in shares.iter().filter(|s| !s.read_only) {
        let Ok(dir) = share.path.canonicalize() else {
            continue;
        };
        if let Some(file) = files.iter().find(|file| file.starts_with(&dir)) {
            return Err(Error::InvalidConfig {
                field: "share",
                reason: format!(
                    "{} would let the guest write {}, which VMs boot from; share it read-only or share a narrower directory",
                    share.path.display(),
                    file.display()
                ),
            });
        }
    }
    Ok(())
}

/// Names the file system in an image by its magic number.
fn detect_fstype(path: &Path) -> Result<&'static str, Error> {
    let mut head = vec![0u8; 2048];
    let read = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(Error::io(format!(
            "cannot read the image {}",
            path.display()
        )))?;
    head.truncate(read);
    fstype_of(&head).ok_or_else(|| Error::InvalidConfig {
        field: "rootfs",
        reason: format!("{} is not an erofs, squashfs or ext4 image", path.display()),
    })
}

fn fstype_of(head: &[u8]) -> Option<&'static str> {
    if head.get(0..4) == Some(b"hsqs") {
        return Some("squashfs");
    }
    if head.get(1024..1028) == Some(&0xE0F5_E1E2u32.to_le_bytes()) {
        return Some("erofs");
    }
    if head.get(1024 + 56..1024 + 58) == Some(&0xEF53u16.to_le_bytes()) {
        return Some("ext4");
    }
    None
}

/// Creates a sparse file of `mib` MiB and formats it ext4 without a
/// journal: it lives for one run, so crash consistency buys nothing.
fn create_scratch(path: &Path, mib: u64) -> Result<(), Error> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::io("cannot create the scratch disk"))?;
    let bytes = mib
        .checked_mul(1024 * 1024)
        .ok_or_else(|| Error::InvalidConfig {
            field: "scratch",
            reason: format!("{mib} MiB is too large"),
        })?;
    file.set_len(bytes)
        .map_err(Error::io("cannot size the scratch disk"))?;
    drop(file);
    let mkfs = vmette_assets::host_tool::locate("mkfs.ext4").ok_or_else(|| Error::Io {
        context: "mkfs.ext4 was not found; run ./setup.sh (package e2fsprogs)".into(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let output = std::process::Command::new(mkfs)
        .args(["-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(Error::io("cannot run mkfs.ext4"))?;
    if !output.status.success() {
        return Err(Error::Io {
            context: format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            source: std::io::ErrorKind::Other.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writable_share_over_the_boot_files_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("images/root.img");
        std::fs::create_dir_all(image.parent().expect("parent")).expect("mkdir");
        let mut bytes = vec![0u8; 4096];
        bytes[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        std::fs::write(&image, bytes).expect("write");
        let files = BootFiles {
            kernel: image.clone(),
            initramfs: image.clone(),
            default_image: Some(image.clone()),
        };
        let mut config = Config::new(["true"]);
        config.shares = vec![crate::Share {
            host_path: dir.path().into(),
            guest_path: "/data".into(),
            writable: true,
        }];
        let error = layout(&config, &files, None, dir.path()).expect_err("refused");
        assert!(
            matches!(error, Error::InvalidConfig { field: "share", .. }),
            "{error:?}"
        );
        config.shares[0].writable = false;
        assert!(layout(&config, &files, None, dir.path()).is_ok());
    }

    #[test]
    fn recognises_the_three_root_file_systems() {
        let mut erofs = vec![0u8; 2048];
        erofs[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        assert_eq!(fstype_of(&erofs), Some("erofs"));
        let mut ext4 = vec![0u8; 2048];
        ext4[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(fstype_of(&ext4), Some("ext4"));
        assert_eq!(fstype_of(b"hsqs...."), Some("squashfs"));
        assert_eq!(fstype_of(&[0u8; 2048]), None);
        assert_eq!(fstype_of(&[]), None);
    }

    #[test]
    fn layout_assigns_serials_and_tags_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("root.img");
        let mut bytes = vec![0u8; 4096];
        bytes[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        std::fs::write(&image, bytes).expect("write");
        let mut config = Config::new(["true"]);
        config.rootfs = Rootfs::Image(image.clone());
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        config.shares = vec![crate::Share {
            host_path: data,
            guest_path: "/data".into(),
            writable: true,
        }];
        config.disks = vec![crate::Disk {
            path: image.clone(),
            read_only: true,
        }];
        let files = BootFiles {
            kernel: "k".into(),
            initramfs: "i".into(),
            default_image: None,
        };
        let (spec, envelope) = layout(&config, &files, None, dir.path()).expect("layout");
        assert_eq!(spec.disks[0].serial, "vmette-root");
        assert!(spec.disks[0].read_only);
        assert_eq!(spec.disks[1].serial, "vmette-disk0");
        assert_eq!(spec.shares[0].tag, "vmette-share0");
        assert!(!spec.shares[0].read_only);
        assert_eq!(envelope.shares[0].guest_path, "/data");
        assert_eq!(envelope.disks, vec!["vmette-disk0".to_string()]);
        assert!(matches!(envelope.root, RootSource::Block { ref fstype, .. } if fstype == "erofs"));
    }
}

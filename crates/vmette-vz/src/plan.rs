//! From a [`VmSpec`] to the devices of a Virtualization.framework VM.
//!
//! Everything the framework would reject is caught here, with the setting
//! named, so that a bad request fails before any framework object exists.

use std::ops::RangeInclusive;
use std::path::PathBuf;

use vmette_core::engine::{EngineError, VmSpec};
use vmette_core::Accel;

/// Virtio-socket port the guest agent listens on.
pub const CONTROL_PORT: u32 = vmette_proto::CONTROL_VSOCK_PORT;

/// Modules the guest needs for this engine's devices: the framework puts
/// virtio devices on PCI, the control channel is a virtio socket, and the
/// entropy and balloon devices have drivers of their own.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "vmw_vsock_virtio_transport",
    "virtio_rng",
    "virtio_balloon",
];

/// Longest virtio-fs tag the framework accepts, in bytes.
pub const MAX_TAG_LEN: usize = 36;

/// Longest virtio-blk identifier (serial) the framework accepts, in bytes.
pub const MAX_BLOCK_ID_LEN: usize = 20;

/// The framework's limits on CPUs and memory. On a Mac they come from
/// `VZVirtualMachineConfiguration`'s class properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Allowed CPU counts.
    pub cpus: RangeInclusive<usize>,
    /// Allowed memory sizes, bytes.
    pub memory_bytes: RangeInclusive<u64>,
}

/// A virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDevice {
    /// The image file.
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
    /// The block device identifier, which the guest reads as its serial.
    pub identifier: String,
}

/// A virtio-fs device sharing one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDevice {
    /// The host directory.
    pub path: PathBuf,
    /// The framework's read-only flag: the host refuses writes.
    pub read_only: bool,
    /// The tag the guest mounts by.
    pub tag: String,
}

/// The network device: frames over the stack's datagram socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDevice {
    /// The engine's end of the frame socket.
    pub frames: vmette_core::network::FrameSocket,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The attachment's MTU.
    pub mtu: u16,
}

/// Every device and setting of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    /// Linux boot loader: kernel image.
    pub kernel: PathBuf,
    /// Linux boot loader: initramfs.
    pub initramfs: PathBuf,
    /// Linux boot loader: command line.
    pub cmdline: String,
    /// CPU count.
    pub cpus: usize,
    /// Memory size, bytes.
    pub memory_bytes: u64,
    /// virtio-blk devices, in order.
    pub disks: Vec<DiskDevice>,
    /// virtio-fs devices.
    pub shares: Vec<ShareDevice>,
    /// A virtio network device, when the guest has a network.
    pub network: Option<NetworkDevice>,
    /// A virtio console (`hvc0`) whose output the engine keeps the end of.
    pub console: bool,
    /// virtio-socket port of the control channel.
    pub control_port: u32,
    /// A virtio entropy device, so the guest does not starve for randomness.
    pub entropy: bool,
    /// A traditional virtio memory balloon, so the host can reclaim memory.
    pub memory_balloon: bool,
}

fn invalid(field: &'static str, reason: String) -> EngineError {
    EngineError::InvalidConfig { field, reason }
}

/// Translates `spec` and checks it against `limits`.
pub fn plan(spec: &VmSpec, limits: &Limits) -> Result<DevicePlan, EngineError> {
    if spec.accel == Accel::Emulation {
        return Err(EngineError::Unsupported(
            "Virtualization.framework has no software emulation; use --accel auto".into(),
        ));
    }
    let cpus = usize::from(spec.vcpus);
    if !limits.cpus.contains(&cpus) {
        return Err(invalid(
            "vcpus",
            format!(
                "{cpus} is outside what Virtualization.framework allows here ({} to {})",
                limits.cpus.start(),
                limits.cpus.end()
            ),
        ));
    }
    let memory_bytes = u64::from(spec.memory_mib) * 1024 * 1024;
    if !limits.memory_bytes.contains(&memory_bytes) {
        return Err(invalid(
            "memory",
            format!(
                "{} MiB is outside what Virtualization.framework allows here ({} MiB to {} MiB)",
                spec.memory_mib,
                limits.memory_bytes.start() / (1024 * 1024),
                limits.memory_bytes.end() / (1024 * 1024)
            ),
        ));
    }
    for (field, path) in [("kernel", &spec.kernel), ("initramfs", &spec.initramfs)] {
        if !path.is_file() {
            return Err(invalid(field, format!("{} does not exist", path.display())));
        }
    }

    let mut disks = Vec::new();
    for disk in &spec.disks {
        if disk.serial.len() > MAX_BLOCK_ID_LEN || !disk.serial.is_ascii() {
            return Err(invalid(
                "disk",
                format!(
                    "identifier {:?} is not 1 to {MAX_BLOCK_ID_LEN} ASCII bytes",
                    disk.serial
                ),
            ));
        }
        if !disk.path.is_file() {
            return Err(invalid(
                "disk",
                format!("{} does not exist", disk.path.display()),
            ));
        }
        disks.push(DiskDevice {
            path: disk.path.clone(),
            read_only: disk.read_only,
            identifier: disk.serial.clone(),
        });
    }

    let mut shares = Vec::new();
    for share in &spec.shares {
        if share.tag.is_empty() || share.tag.len() > MAX_TAG_LEN {
            return Err(invalid(
                "share",
                format!("tag {:?} is not 1 to {MAX_TAG_LEN} bytes", share.tag),
            ));
        }
        if !share.path.is_dir() {
            return Err(invalid(
                "share",
                format!("{} is not a directory", share.path.display()),
            ));
        }
        shares.push(ShareDevice {
            path: share.path.clone(),
            read_only: share.read_only,
            tag: share.tag.clone(),
        });
    }

    let network = match &spec.nic {
        // The framework takes 1500 to 65535.
        Some(nic) if nic.mtu < 1500 => {
            return Err(invalid(
                "network",
                format!("an MTU of {} is below the framework's 1500", nic.mtu),
            ))
        }
        Some(nic) => Some(NetworkDevice {
            frames: nic.frames.clone(),
            mac: nic.mac.map(|b| format!("{b:02x}")).join(":"),
            mtu: nic.mtu,
        }),
        None => None,
    };

    let mut cmdline =
        format!("console=hvc0 quiet panic=-1 rdinit=/init vmette.control=vsock:{CONTROL_PORT}");
    if !spec.cmdline_extra.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(spec.cmdline_extra.trim());
    }

    Ok(DevicePlan {
        kernel: spec.kernel.clone(),
        initramfs: spec.initramfs.clone(),
        cmdline,
        cpus,
        memory_bytes,
        disks,
        shares,
        network,
        console: true,
        control_port: CONTROL_PORT,
        entropy: true,
        memory_balloon: true,
    })
}

#[cfg(test)]
mod tests {
    //! Config → device translation, through the host library's own layout,
    //! exactly as a run does it.

    use std::path::Path;

    use vmette_core::boot::{layout, BootFiles};
    use vmette_core::{Config, Disk, Error, Rootfs, Share};

    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn limits() -> Limits {
        Limits {
            cpus: 1..=8,
            memory_bytes: 256 * MIB..=16 * 1024 * MIB,
        }
    }

    struct Host {
        dir: tempfile::TempDir,
        files: BootFiles,
    }

    fn erofs_image(path: &Path) {
        let mut bytes = vec![0u8; 4096];
        bytes[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        std::fs::write(path, bytes).expect("image");
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let assets = dir.path().join("cache");
        std::fs::create_dir_all(&assets).expect("mkdir");
        std::fs::write(assets.join("vmlinuz"), b"kernel").expect("kernel");
        std::fs::write(assets.join("initramfs.cpio"), b"initramfs").expect("initramfs");
        erofs_image(&assets.join("default.erofs"));
        for sub in ["data", "out", "tree"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        let files = BootFiles {
            kernel: assets.join("vmlinuz"),
            initramfs: assets.join("initramfs.cpio"),
            default_image: Some(assets.join("default.erofs")),
        };
        Host { dir, files }
    }

    /// Validation, layout and plan, with engine errors reported the way a
    /// run reports them.
    fn translate(host: &Host, config: &Config) -> Result<DevicePlan, Error> {
        config.validate()?;
        let run_dir = host.dir.path().join("run");
        std::fs::create_dir_all(&run_dir).expect("run dir");
        let (spec, _envelope) = layout(config, &host.files, None, &run_dir)?;
        plan(&spec, &limits()).map_err(Error::from)
    }

    fn field(result: Result<DevicePlan, Error>) -> &'static str {
        match result {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn the_default_config_boots_the_default_image_with_the_fixed_devices() {
        let host = host();
        let plan = translate(&host, &Config::new(["true"])).expect("plan");
        assert_eq!(plan.kernel, host.files.kernel);
        assert_eq!(plan.initramfs, host.files.initramfs);
        assert_eq!(plan.cpus, 1);
        assert_eq!(plan.memory_bytes, 512 * MIB);
        assert_eq!(
            plan.disks,
            vec![DiskDevice {
                path: host.files.default_image.clone().expect("image"),
                read_only: true,
                identifier: "vmette-root".into(),
            }]
        );
        assert!(plan.shares.is_empty());
        assert!(plan.entropy && plan.memory_balloon);
        assert_eq!(plan.control_port, 1025);
        assert!(plan.cmdline.contains("console=hvc0"));
        assert!(plan.cmdline.contains("vmette.control=vsock:1025"));
        assert!(plan.console);
    }

    #[test]
    fn every_config_feature_maps_to_its_device() {
        let host = host();
        let dir = host.dir.path();
        let image = dir.join("root.erofs");
        erofs_image(&image);
        let extra = dir.join("extra.img");
        std::fs::write(&extra, vec![0u8; 4096]).expect("extra");

        let mut config = Config::new(["true"]);
        config.rootfs = Rootfs::Image(image.clone());
        config.shares = vec![
            Share {
                host_path: dir.join("data"),
                guest_path: "/data".into(),
                writable: false,
            },
            Share {
                host_path: dir.join("out"),
                guest_path: "/out".into(),
                writable: true,
            },
        ];
        config.disks = vec![
            Disk {
                path: extra.clone(),
                read_only: true,
            },
            Disk {
                path: extra.clone(),
                read_only: false,
            },
        ];
        config.scratch_mib = Some(64);
        config.vcpus = 4;
        config.memory_mib = 2048;
        config.cmdline_extra = Some("loglevel=7".into());
        config.env = vec![("A".into(), "b".into())];
        config.workdir = Some("/tmp".into());

        let plan = translate(&host, &config).expect("plan");
        assert_eq!(plan.cpus, 4);
        assert_eq!(plan.memory_bytes, 2048 * MIB);
        assert!(plan.cmdline.ends_with(" loglevel=7"));
        let disks: Vec<(&str, bool)> = plan
            .disks
            .iter()
            .map(|d| (d.identifier.as_str(), d.read_only))
            .collect();
        assert_eq!(
            disks,
            vec![
                ("vmette-root", true),
                ("vmette-scratch", false),
                ("vmette-disk0", true),
                ("vmette-disk1", false),
            ]
        );
        assert_eq!(plan.disks[0].path, image);
        assert!(plan.disks[1].path.ends_with("run/scratch.ext4"));
        let shares: Vec<(&str, bool)> = plan
            .shares
            .iter()
            .map(|s| (s.tag.as_str(), s.read_only))
            .collect();
        assert_eq!(
            shares,
            vec![("vmette-share0", true), ("vmette-share1", false)]
        );
        // Environment and working directory travel in the protocol, not as devices.
        assert!(!plan.cmdline.contains("A=b"));
    }

    #[test]
    fn directory_roots_are_shares_read_only_unless_asked() {
        let host = host();
        let tree = host.dir.path().join("tree");
        let mut config = Config::new(["true"]);
        config.rootfs = Rootfs::Directory {
            path: tree.clone(),
            writable: false,
        };
        let plan = translate(&host, &config).expect("plan");
        assert!(plan.disks.is_empty());
        assert_eq!(
            plan.shares,
            vec![ShareDevice {
                path: tree.clone(),
                read_only: true,
                tag: "vmette-root".into()
            }]
        );
        config.rootfs = Rootfs::Directory {
            path: tree,
            writable: true,
        };
        let plan = translate(&host, &config).expect("plan");
        assert!(!plan.shares[0].read_only);
    }

    #[test]
    fn too_little_memory_is_invalid() {
        let host = host();
        let mut config = Config::new(["true"]);
        // Enough for the host library, not for the framework's minimum here.
        config.memory_mib = 128;
        assert_eq!(field(translate(&host, &config)), "memory");
        config.memory_mib = 0;
        assert_eq!(field(translate(&host, &config)), "memory");
    }

    #[test]
    fn too_many_cpus_are_invalid() {
        let host = host();
        let mut config = Config::new(["true"]);
        config.vcpus = 16;
        assert_eq!(field(translate(&host, &config)), "vcpus");
    }

    #[test]
    fn a_missing_share_is_invalid() {
        let host = host();
        let mut config = Config::new(["true"]);
        config.shares = vec![Share {
            host_path: host.dir.path().join("missing"),
            guest_path: "/data".into(),
            writable: false,
        }];
        assert_eq!(field(translate(&host, &config)), "share");
    }

    #[test]
    fn a_read_write_share_of_the_image_directory_is_invalid() {
        let host = host();
        let mut config = Config::new(["true"]);
        config.shares = vec![Share {
            host_path: host.dir.path().join("cache"),
            guest_path: "/cache".into(),
            writable: true,
        }];
        assert_eq!(field(translate(&host, &config)), "share");
        // The same directory read-only is fine.
        config.shares[0].writable = false;
        assert!(translate(&host, &config).is_ok());
        // So is a writable parent of nothing the VM boots from.
        config.shares[0].host_path = host.dir.path().join("out");
        config.shares[0].writable = true;
        assert!(translate(&host, &config).is_ok());
    }

    #[test]
    fn emulation_is_not_offered() {
        let host = host();
        let mut config = Config::new(["true"]);
        config.accel = Accel::Emulation;
        assert!(matches!(
            translate(&host, &config),
            Err(Error::StartFailed(EngineError::Unsupported(_)))
        ));
    }

    #[test]
    fn long_tags_and_identifiers_are_refused_before_the_framework_sees_them() {
        let host = host();
        let spec = VmSpec {
            kernel: host.files.kernel.clone(),
            initramfs: host.files.initramfs.clone(),
            cmdline_extra: String::new(),
            vcpus: 1,
            memory_mib: 512,
            disks: vec![vmette_core::engine::DiskSpec {
                serial: "x".repeat(MAX_BLOCK_ID_LEN + 1),
                path: host.files.kernel.clone(),
                read_only: true,
            }],
            shares: vec![],
            nic: None,
            accel: Accel::Auto,
            run_dir: host.dir.path().into(),
        };
        assert!(matches!(
            plan(&spec, &limits()),
            Err(EngineError::InvalidConfig { field: "disk", .. })
        ));
        let mut spec = spec;
        spec.disks.clear();
        spec.shares = vec![vmette_core::engine::ShareSpec {
            tag: "t".repeat(MAX_TAG_LEN + 1),
            path: host.dir.path().into(),
            read_only: true,
        }];
        assert!(matches!(
            plan(&spec, &limits()),
            Err(EngineError::InvalidConfig { field: "share", .. })
        ));
    }
}

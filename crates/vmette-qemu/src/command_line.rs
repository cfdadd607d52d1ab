//! The QEMU command line for a [`VmSpec`]. Pure, so it is tested without
//! starting anything.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vmette_core::VmSpec;
use vmette_proto::CONTROL_PORT_NAME;

use crate::accel::Choice;

/// Files in the run directory that QEMU uses.
pub struct RunFiles {
    /// The control channel's socket (QEMU listens).
    pub control: PathBuf,
    /// One vhost-user socket per share, in `spec.shares` order.
    pub share_sockets: Vec<PathBuf>,
}

impl RunFiles {
    /// The standard names in `run_dir`.
    pub fn in_dir(run_dir: &Path, shares: usize) -> RunFiles {
        RunFiles {
            control: run_dir.join("control.sock"),
            share_sockets: (0..shares)
                .map(|i| run_dir.join(format!("fs{i}.sock")))
                .collect(),
        }
    }
}

/// The kernel command line: vmette's fixed part, then the user's extras.
pub fn kernel_cmdline(spec: &VmSpec, accel: &Choice, tsc_khz: Option<u64>) -> String {
    let mut parts = vec![
        "console=ttyS0".to_string(),
        "quiet".into(),
        "panic=-1".into(),
        "pci=off".into(),
        "mitigations=off".into(),
        "rdinit=/init".into(),
    ];
    if let (Choice::Tcg(_), Some(khz)) = (accel, tsc_khz) {
        // Without these, some emulated boots hang calibrating the TSC.
        parts.push(format!("tsc_early_khz={khz}"));
        parts.extend(["tsc=reliable", "no_timer_check", "lpj=5000000"].map(String::from));
    }
    if !spec.cmdline_extra.trim().is_empty() {
        parts.push(spec.cmdline_extra.trim().to_string());
    }
    parts.join(" ")
}

/// Arguments for `qemu-system-*` (without the program itself). A network
/// device is backed by the stack's frame socket, or by `netdev_override`
/// when given (the benchmark's passt).
pub fn qemu_args(
    spec: &VmSpec,
    accel: &Choice,
    cmdline: &str,
    files: &RunFiles,
    netdev_override: Option<&str>,
) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    let memory = format!("{}M", spec.memory_mib);
    push(&["-M", "microvm"]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
    ]);
    match accel {
        Choice::Kvm(_) => push(&["-accel", "kvm", "-cpu", "host"]),
        Choice::Tcg(_) => push(&["-accel", "tcg"]),
    }
    push(&["-smp", &spec.vcpus.to_string(), "-m", &memory]);
    if !spec.shares.is_empty() {
        // vhost-user devices need guest memory the back end can map.
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
            "-machine",
            "memory-backend=mem",
        ]);
    }
    push(&[
        "-kernel",
        &spec.kernel.to_string_lossy(),
        "-initrd",
        &spec.initramfs.to_string_lossy(),
        "-append",
        cmdline,
    ]);
    // The console goes to QEMU's stdout, a pipe the engine reads into a
    // bounded buffer: a guest flooding its console fills no disk.
    push(&["-serial", "stdio"]);
    push(&[
        "-device",
        "virtio-serial-device",
        "-chardev",
        &format!(
            "socket,id=control,path={},server=on,wait=off",
            escape(&files.control)
        ),
        "-device",
        &format!("virtserialport,chardev=control,name={CONTROL_PORT_NAME}"),
    ]);
    if let Some(nic) = &spec.nic {
        // The stack's socket pair: each datagram one Ethernet frame. QEMU
        // inherits the descriptor (vm.rs clears its close-on-exec).
        let mac = nic.mac.map(|b| format!("{b:02x}")).join(":");
        let netdev = match netdev_override {
            Some(netdev) => format!("{netdev},id=net0"),
            None => format!(
                "dgram,id=net0,local.type=fd,local.str={}",
                nic.frames.0.as_raw_fd()
            ),
        };
        push(&[
            "-netdev",
            &netdev,
            "-device",
            &format!(
                "virtio-net-device,netdev=net0,mac={mac},host_mtu={}",
                nic.mtu
            ),
        ]);
    }
    for (index, disk) in spec.disks.iter().enumerate() {
        // Always raw, never probed: a guest that writes a qcow2 header into
        // a writable disk must not get QEMU to open a backing file of its
        // choosing on the next run.
        push(&[
            "-drive",
            &format!(
                "if=none,id=disk{index},file={},format=raw,readonly={}",
                escape(&disk.path),
                if disk.read_only { "on" } else { "off" }
            ),
            "-device",
            &format!("virtio-blk-device,drive=disk{index},serial={}", disk.serial),
        ]);
    }
    for (index, (share, socket)) in spec.shares.iter().zip(&files.share_sockets).enumerate() {
        push(&[
            "-chardev",
            &format!("socket,id=fs{index},path={}", escape(socket)),
            "-device",
            &format!("vhost-user-fs-device,chardev=fs{index},tag={}", share.tag),
        ]);
    }
    args
}

/// QEMU option values separate with commas; a literal comma is doubled.
fn escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmette_core::engine::{DiskSpec, ShareSpec};
    use vmette_core::Accel;

    fn spec() -> VmSpec {
        VmSpec {
            kernel: "/k/vmlinuz".into(),
            initramfs: "/k/initrd".into(),
            cmdline_extra: "loglevel=7".into(),
            vcpus: 2,
            memory_mib: 256,
            disks: vec![DiskSpec {
                serial: "vmette-root".into(),
                path: "/images/a,b.erofs".into(),
                read_only: true,
            }],
            shares: vec![ShareSpec {
                tag: "vmette-share0".into(),
                path: "/data".into(),
                read_only: true,
            }],
            nic: None,
            accel: Accel::Auto,
            run_dir: "/run/x".into(),
        }
    }

    #[test]
    fn tcg_boots_get_the_tsc_arguments_and_user_extras_come_last() {
        let line = kernel_cmdline(&spec(), &Choice::Tcg(String::new()), Some(2_600_000));
        assert!(line.contains("tsc_early_khz=2600000 tsc=reliable no_timer_check"));
        assert!(line.ends_with("loglevel=7"));
        let kvm = kernel_cmdline(&spec(), &Choice::Kvm(String::new()), Some(2_600_000));
        assert!(!kvm.contains("tsc_early_khz"));
    }

    #[test]
    fn devices_follow_the_spec() {
        let spec = spec();
        let files = RunFiles::in_dir(Path::new("/run/x"), 1);
        let args = qemu_args(
            &spec,
            &Choice::Tcg(String::new()),
            "console=ttyS0",
            &files,
            None,
        );
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg"));
        assert!(!joined.contains("-cpu host"));
        assert!(joined.contains("-smp 2 -m 256M"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(joined.contains("file=/images/a,,b.erofs,format=raw,readonly=on"));
        assert!(joined.contains("virtio-blk-device,drive=disk0,serial=vmette-root"));
        assert!(joined.contains("vhost-user-fs-device,chardev=fs0,tag=vmette-share0"));
        assert!(joined.contains("socket,id=fs0,path=/run/x/fs0.sock"));
        assert!(joined.contains("virtserialport,chardev=control,name=vmette.ctl"));
    }

    #[test]
    fn a_network_device_takes_the_frame_socket() {
        let mut spec = spec();
        let (_, engine_end) = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let fd = std::os::fd::OwnedFd::from(engine_end);
        let number = fd.as_raw_fd();
        spec.nic = Some(vmette_core::network::NicSpec {
            frames: vmette_core::network::FrameSocket(std::sync::Arc::new(fd)),
            mac: [0x52, 0x54, 0, 0x76, 0x6d, 0x0f],
            mtu: 65520,
        });
        let files = RunFiles::in_dir(Path::new("/run/x"), 1);
        let args = qemu_args(&spec, &Choice::Tcg(String::new()), "", &files, None).join(" ");
        assert!(args.contains(&format!("dgram,id=net0,local.type=fd,local.str={number}")));
        let passt = qemu_args(
            &spec,
            &Choice::Tcg(String::new()),
            "",
            &files,
            Some("stream,addr.type=unix,addr.path=/run/passt.sock"),
        )
        .join(" ");
        assert!(passt.contains("-netdev stream,addr.type=unix,addr.path=/run/passt.sock,id=net0"));
        assert!(args.contains("virtio-net-device,netdev=net0,mac=52:54:00:76:6d:0f,host_mtu=65520"));
    }

    #[test]
    fn no_shared_memory_without_shares() {
        let mut spec = spec();
        spec.shares.clear();
        let files = RunFiles::in_dir(Path::new("/run/x"), 0);
        let args = qemu_args(&spec, &Choice::Kvm(String::new()), "", &files, None).join(" ");
        assert!(!args.contains("memory-backend"));
        assert!(args.contains("-accel kvm -cpu host"));
    }
}

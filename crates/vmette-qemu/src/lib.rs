//! The QEMU engine for vmette: each VM is one `qemu-system` process on the
//! `microvm` machine type, plus one `virtiofsd` per directory share.
//!
//! * The control channel is a virtio-serial port backed by a unix socket
//!   QEMU listens on; it lives inside QEMU (no helper process) and does not
//!   block migration-based snapshots.
//! * Disks are virtio-blk devices on virtio-mmio, found by the guest by
//!   serial number.
//! * Shares are vhost-user-fs devices served by `virtiofsd`, which enforces
//!   read-only shares itself (`--readonly`), whatever the guest mounts.
//! * KVM is used only where it really works, decided before QEMU starts
//!   ([`accel`]); otherwise TCG.
//!
//! * A network device is virtio-net on the frame socket of vmette's stack
//!   (`-netdev dgram` on an inherited descriptor). [`NETDEV_ENV`] replaces
//!   that backend, for the network benchmark's comparison with passt.
//!
//! Everything runs as the invoking user. Without root, `virtiofsd` runs in
//! a user namespace (via `unshare`) where the user is root.

#![warn(missing_docs)]

pub mod accel;
mod command_line;
mod virtiofsd;
mod vm;

use std::path::PathBuf;
use std::process::Command;

use vmette_core::assets::host_tool;
use vmette_core::engine::{Check, Engine, EngineError, Vm, VmSpec};
use vmette_core::process::Watchdog;

/// Environment variable naming a QEMU `-netdev` backend (without its
/// `id`) to give a guest's network device instead of vmette's stack, e.g.
/// `stream,addr.type=unix,addr.path=/tmp/passt.sock`. For benchmarks: the
/// guest then bypasses vmette's rules.
pub const NETDEV_ENV: &str = "VMETTE_QEMU_NETDEV";

/// The QEMU engine.
#[derive(Debug, Clone, Default)]
pub struct QemuEngine {
    _private: (),
}

impl QemuEngine {
    /// The engine, using `qemu-system-*` and `virtiofsd` from the host.
    pub fn new() -> QemuEngine {
        QemuEngine::default()
    }
}

/// The QEMU system emulator for this host's architecture.
pub fn qemu_program() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "qemu-system-aarch64"
    } else {
        "qemu-system-x86_64"
    }
}

fn find(program: &str, env_override: &str) -> Option<PathBuf> {
    std::env::var_os(env_override)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| host_tool::locate(program))
}

fn version_line(program: &std::path::Path) -> Option<String> {
    let output = Command::new(program).arg("--version").output().ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

impl Engine for QemuEngine {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start(&self, spec: &VmSpec, watchdog: &Watchdog) -> Result<Box<dyn Vm>, EngineError> {
        let vm = vm::QemuVm::start(spec, watchdog)?;
        Ok(Box::new(vm))
    }

    fn guest_modules(&self) -> &'static [&'static str] {
        // microvm puts every virtio device on virtio-mmio.
        &["virtio_mmio"]
    }

    fn diagnose(&self) -> Vec<Check> {
        let (choice, reason) = accel::choose(vmette_core::Accel::Auto)
            .map(|c| (c.name(), c.reason().to_string()))
            .unwrap_or_else(|e| ("none", e.to_string()));
        let mut checks = vec![
            program_check(
                "qemu",
                find(qemu_program(), "VMETTE_QEMU"),
                format!("{} not found", qemu_program()),
                "apt-get install qemu-system-x86 (or run ./setup.sh)",
            ),
            Check {
                name: "accelerator".into(),
                detail: format!("{choice}: {reason}"),
                fix: None,
            },
            program_check(
                "virtiofsd",
                find("virtiofsd", "VMETTE_VIRTIOFSD"),
                "not found; --share and directory root file systems need it".into(),
                "cargo install virtiofsd --locked --root /usr/local (or run ./setup.sh)",
            ),
        ];
        if !host_tool::is_root() {
            checks.push(program_check(
                "unshare",
                host_tool::locate("unshare"),
                "not found; virtiofsd runs in a user namespace made by unshare".into(),
                "apt-get install util-linux (or run ./setup.sh)",
            ));
        }
        checks
    }
}

/// A doctor line for a program: its version and path, or how to get it.
fn program_check(name: &str, path: Option<PathBuf>, missing: String, fix: &str) -> Check {
    match path {
        Some(path) => Check {
            name: name.into(),
            detail: format!(
                "{} ({})",
                version_line(&path).unwrap_or_else(|| "version unknown".into()),
                path.display()
            ),
            fix: None,
        },
        None => Check {
            name: name.into(),
            detail: missing,
            fix: Some(fix.into()),
        },
    }
}

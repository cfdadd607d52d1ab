//! What to run and how: the [`Config`] every front end fills in.
//!
//! `Config` is plain data. [`Config::validate`] checks it without touching
//! anything but the file system's metadata, so a bad request fails before a
//! single process starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Error;

/// Default guest memory, MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Smallest guest memory vmette accepts, MiB: the kernel, the initramfs and
/// a tmpfs overlay need about this much.
pub const MIN_MEMORY_MIB: u32 = 128;
/// Most guest memory vmette accepts, MiB.
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// Most vCPUs vmette accepts.
pub const MAX_VCPUS: u8 = 64;
/// Smallest scratch disk, MiB (ext4 needs room for its own metadata).
pub const MIN_SCRATCH_MIB: u64 = 16;
/// Default cap on each captured output stream.
pub const DEFAULT_CAPTURE_LIMIT: usize = 1 << 20;
/// Default cap on one file transfer in a session, bytes.
pub const DEFAULT_TRANSFER_LIMIT: u64 = 1 << 30;

/// Where the guest's root file system comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Rootfs {
    /// The default Debian image from the cache, built on first use.
    #[default]
    Default,
    /// A file system image (erofs, squashfs or ext4), attached read-only.
    Image(PathBuf),
    /// A host directory shared with virtio-fs.
    Directory {
        /// The directory.
        path: PathBuf,
        /// Write through to the directory instead of into a throwaway overlay.
        writable: bool,
    },
    /// An image named by a word (a preset, a stored image, a registry
    /// reference), for an [`crate::ImageProvider`] to resolve with
    /// [`Config::resolve_image`] before the boot.
    Named(String),
}

/// A host directory mounted in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The host directory.
    pub host_path: PathBuf,
    /// Where the guest sees it; absolute.
    pub guest_path: String,
    /// Let the guest write. Read-only shares are enforced by the host.
    pub writable: bool,
}

/// An extra block device for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image file (raw or qcow2).
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
}

/// What the command reads on stdin.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Stdin {
    /// `/dev/null`.
    #[default]
    Null,
    /// This process's stdin, forwarded until end-of-file. The thread that
    /// reads it cannot be interrupted: if the run ends first, it lives on,
    /// blocked, until this process's stdin yields data or end-of-file.
    Inherit,
    /// These bytes, then end-of-file.
    Bytes(Vec<u8>),
}

/// Which accelerator the engine should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Hardware virtualisation where it really works, emulation otherwise.
    #[default]
    Auto,
    /// Hardware virtualisation (KVM on Linux); an error where it does not work.
    Hardware,
    /// Software emulation (TCG on QEMU).
    Emulation,
}

/// A VM to boot: the machine, and for a one-shot run its one command.
///
/// [`crate::Session::start`] uses the machine fields only; a session's
/// commands come as [`crate::ExecSpec`]s. A one-shot run
/// ([`crate::Runner::run`]) is a session with one exec made of `command`,
/// `env`, `workdir` and `stdin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Program and arguments to run in the guest.
    pub command: Vec<String>,
    /// Environment variables for the command, over the guest's defaults.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest; the image's, else `/`, when `None`.
    pub workdir: Option<String>,
    /// Who the command runs as (`name`, `uid`, `name:group`, `uid:gid`);
    /// the image's user, else root, when `None`.
    pub user: Option<String>,
    /// Replaces the image's entrypoint (Docker's `--entrypoint`); applied
    /// by [`Config::resolve_image`].
    pub entrypoint: Option<Vec<String>>,
    /// What every exec of the machine starts from: the image's `Env`,
    /// `WorkingDir` and `User`, filled by [`Config::resolve_image`].
    pub exec_defaults: crate::ExecDefaults,
    /// The image provider's hold on the resolved root (set by
    /// [`Config::resolve_image`]); every VM booted from this config keeps
    /// it until the VM is gone.
    pub image_lease: Option<crate::ImageLease>,
    /// What the command reads on stdin.
    pub stdin: Stdin,
    /// Run the command on a PTY of this size (stdin then feeds the
    /// terminal, and all output arrives as stdout).
    pub pty: Option<vmette_proto::PtySize>,
    /// The root file system.
    pub rootfs: Rootfs,
    /// Host directories to mount.
    pub shares: Vec<Share>,
    /// Extra block devices.
    pub disks: Vec<Disk>,
    /// The guest's network; none by default.
    pub network: crate::Network,
    /// Size of an ephemeral ext4 disk holding the root's writable layer,
    /// in MiB; `None` keeps the layer in guest memory.
    pub scratch_mib: Option<u64>,
    /// Kill the VM after this long: a run then reports a timeout (its boot
    /// counts), a session ends with [`crate::EndReason::SessionTimeout`]
    /// (counted from when it is ready).
    pub timeout: Option<Duration>,
    /// End a session after this long with no exec running; `None` never.
    pub idle_timeout: Option<Duration>,
    /// The most bytes one file transfer of a session may move (a file
    /// written or read, a tree copied in or out).
    pub transfer_limit: u64,
    /// Virtual CPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Kernel image; the cached cloud kernel when `None`.
    pub kernel: Option<PathBuf>,
    /// Initramfs; built from the guest agent and the kernel's modules when `None`.
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended after vmette's own, so
    /// that a later `key=value` overrides an earlier one.
    pub cmdline_extra: Option<String>,
    /// Accelerator preference.
    pub accel: Accel,
    /// Cap on each captured output stream, in bytes.
    pub capture_limit: usize,
}

impl Config {
    /// A config that runs `command` with every other setting at its default.
    pub fn new<I, S>(command: I) -> Config
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Config {
            command: command.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            workdir: None,
            user: None,
            entrypoint: None,
            exec_defaults: crate::ExecDefaults::default(),
            image_lease: None,
            stdin: Stdin::Null,
            pty: None,
            rootfs: Rootfs::Default,
            shares: Vec::new(),
            disks: Vec::new(),
            network: crate::Network::None,
            scratch_mib: None,
            timeout: None,
            idle_timeout: None,
            transfer_limit: DEFAULT_TRANSFER_LIMIT,
            vcpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            kernel: None,
            initramfs: None,
            cmdline_extra: None,
            accel: Accel::Auto,
            capture_limit: DEFAULT_CAPTURE_LIMIT,
        }
    }

    /// A machine with every setting at its default and no command, for
    /// [`crate::Session::start`].
    pub fn default_machine() -> Config {
        Config::new(Vec::<String>::new())
    }

    /// Checks every field; the first problem found is returned as
    /// [`Error::InvalidConfig`].
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_command()?;
        self.validate_machine()
    }

    /// Checks the fields of the one-shot run's command.
    fn validate_command(&self) -> Result<(), Error> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return invalid(
                "command",
                "no command given, and the image has no Entrypoint or Cmd",
            );
        }
        if self.command.len() > vmette_proto::MAX_ARGS {
            return invalid("command", "too many arguments");
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return invalid("command", "arguments must not contain NUL bytes");
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
                return invalid(
                    "env",
                    format!("{key:?} is not a valid variable name (expected KEY=VALUE)"),
                );
            }
        }
        if let Some(dir) = &self.workdir {
            if !dir.starts_with('/') {
                return invalid("workdir", format!("{dir} is not an absolute path"));
            }
        }
        Ok(())
    }

    /// Checks the fields that describe the machine, which is all a
    /// [`crate::Session`] uses.
    pub fn validate_machine(&self) -> Result<(), Error> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return invalid("vcpus", format!("must be 1 to {MAX_VCPUS}"));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return invalid(
                "memory",
                format!(
                    "{} MiB is outside {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            );
        }
        if let Some(timeout) = self.timeout {
            if timeout.is_zero() {
                return invalid("timeout", "must be longer than zero");
            }
        }
        if self.transfer_limit == 0 {
            return invalid("transfer limit", "must be at least one byte");
        }
        if self.idle_timeout.is_some_and(|t| t.is_zero()) {
            return invalid("idle timeout", "must be longer than zero");
        }
        if let Some(mib) = self.scratch_mib {
            if mib < MIN_SCRATCH_MIB {
                return invalid("scratch", format!("must be at least {MIN_SCRATCH_MIB} MiB"));
            }
            if matches!(self.rootfs, Rootfs::Directory { writable: true, .. }) {
                return invalid(
                    "scratch",
                    "a writable directory rootfs has no overlay to put on a scratch disk",
                );
            }
        }
        if let Some(kernel) = &self.kernel {
            require_file("kernel", kernel)?;
        }
        if let Some(initramfs) = &self.initramfs {
            require_file("initramfs", initramfs)?;
        }
        match &self.rootfs {
            Rootfs::Default => {}
            Rootfs::Image(path) => require_file("rootfs", path)?,
            Rootfs::Directory { path, .. } => require_dir("rootfs", path)?,
            Rootfs::Named(name) => {
                return invalid(
                    "rootfs",
                    format!("the image {name:?} is not resolved yet (Config::resolve_image)"),
                )
            }
        }
        if self.entrypoint.is_some() {
            return invalid(
                "entrypoint",
                "is applied by Config::resolve_image, which was not called",
            );
        }
        if self.shares.len() > vmette_proto::MAX_SHARES {
            return invalid("share", "too many shares");
        }
        for share in &self.shares {
            require_dir("share", &share.host_path)?;
            let guest = &share.guest_path;
            if !guest.starts_with('/') || guest == "/" {
                return invalid(
                    "share",
                    format!("guest path {guest:?} must be an absolute path other than /"),
                );
            }
            if guest.split('/').any(|part| part == "..") {
                return invalid(
                    "share",
                    format!("guest path {guest:?} must not contain '..'"),
                );
            }
        }
        if self.disks.len() > vmette_proto::MAX_SHARES {
            return invalid("disk", "too many disks");
        }
        for disk in &self.disks {
            require_file("disk", &disk.path)?;
        }
        if self.capture_limit == 0 {
            return invalid("capture limit", "must be at least one byte");
        }
        if let Some(nat) = self.nat() {
            validate_nat(nat)?;
        }
        Ok(())
    }
}

/// Most ports one network publishes or opens on the host's loopback.
pub const MAX_PORTS: usize = 64;

fn validate_nat(nat: &crate::Nat) -> Result<(), Error> {
    if nat.publish.len() > MAX_PORTS {
        return invalid(
            "publish",
            format!("at most {MAX_PORTS} ports can be published"),
        );
    }
    for (index, mapping) in nat.publish.iter().enumerate() {
        if mapping.guest_port == 0 {
            return invalid(
                "publish",
                format!("{mapping}: the guest port must be 1 to 65535"),
            );
        }
        let clash = nat.publish[..index].iter().any(|earlier| {
            mapping.host_port != 0
                && earlier.host_port == mapping.host_port
                && (earlier.host_ip == mapping.host_ip
                    || earlier.host_ip.is_unspecified()
                    || mapping.host_ip.is_unspecified())
        });
        if clash {
            return invalid(
                "publish",
                format!("{mapping}: that host port is published twice"),
            );
        }
    }
    if nat.host_ports.len() > MAX_PORTS {
        return invalid(
            "host port",
            format!("at most {MAX_PORTS} host ports can be opened"),
        );
    }
    if nat.host_ports.contains(&0) {
        return invalid("host port", "must be 1 to 65535");
    }
    if let crate::Egress::Allowlist(allowlist) = &nat.egress {
        if allowlist.hosts.len() > crate::MAX_RULES || allowlist.cidrs.len() > crate::MAX_RULES {
            return invalid(
                "allowlist",
                format!(
                    "at most {} hosts and {} address ranges can be allowed",
                    crate::MAX_RULES,
                    crate::MAX_RULES
                ),
            );
        }
    }
    if let Some(server) = nat.dns {
        let ip = server.ip();
        if server.port() == 0
            || ip.is_unspecified()
            || ip.is_multicast()
            || ip == std::net::Ipv4Addr::BROADCAST
        {
            return invalid("dns", format!("{server} is not a DNS server's address"));
        }
    }
    Ok(())
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Result<(), Error> {
    Err(Error::InvalidConfig {
        field,
        reason: reason.into(),
    })
}

fn require_file(field: &'static str, path: &Path) -> Result<(), Error> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => invalid(field, format!("{} is not a file", path.display())),
        Err(_) => invalid(field, format!("{} does not exist", path.display())),
    }
}

fn require_dir(field: &'static str, path: &Path) -> Result<(), Error> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => invalid(field, format!("{} is not a directory", path.display())),
        Err(_) => invalid(field, format!("{} does not exist", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(config: &Config) -> &'static str {
        match config.validate() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn the_default_config_is_valid() {
        assert!(Config::new(["true"]).validate().is_ok());
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut c = Config::new(Vec::<String>::new());
        assert_eq!(field_of(&c), "command");

        c = Config::new(["true"]);
        c.memory_mib = 0;
        assert_eq!(field_of(&c), "memory");

        c = Config::new(["true"]);
        c.vcpus = 0;
        assert_eq!(field_of(&c), "vcpus");

        c = Config::new(["true"]);
        c.env = vec![("".into(), "x".into())];
        assert_eq!(field_of(&c), "env");

        c = Config::new(["true"]);
        c.kernel = Some("/nonexistent/vmlinuz".into());
        assert_eq!(field_of(&c), "kernel");

        c = Config::new(["true"]);
        c.shares = vec![Share {
            host_path: "/nonexistent/dir".into(),
            guest_path: "/mnt".into(),
            writable: false,
        }];
        assert_eq!(field_of(&c), "share");

        c = Config::new(["true"]);
        c.shares = vec![Share {
            host_path: std::env::temp_dir(),
            guest_path: "/a/../b".into(),
            writable: false,
        }];
        assert_eq!(field_of(&c), "share");

        c = Config::new(["true"]);
        c.timeout = Some(Duration::ZERO);
        assert_eq!(field_of(&c), "timeout");

        c = Config::new(["true"]);
        c.scratch_mib = Some(1);
        assert_eq!(field_of(&c), "scratch");

        c = Config::new(["true"]);
        c.workdir = Some("relative".into());
        assert_eq!(field_of(&c), "workdir");

        c = Config::new(["true"]);
        c.network = crate::Network::Nat(crate::Nat {
            publish: vec![crate::PortMapping::loopback(8000, 0)],
            ..Default::default()
        });
        assert_eq!(field_of(&c), "publish");

        c = Config::new(["true"]);
        c.network = crate::Network::Nat(crate::Nat {
            publish: vec![
                crate::PortMapping::loopback(8000, 80),
                crate::PortMapping {
                    host_ip: std::net::Ipv6Addr::UNSPECIFIED.into(),
                    host_port: 8000,
                    guest_port: 81,
                },
            ],
            ..Default::default()
        });
        assert_eq!(field_of(&c), "publish");

        c = Config::new(["true"]);
        c.network = crate::Network::Nat(crate::Nat {
            host_ports: vec![0],
            ..Default::default()
        });
        assert_eq!(field_of(&c), "host port");

        c = Config::new(["true"]);
        let rule: crate::AllowedHost = "example.com".parse().expect("rule");
        c.network = crate::Network::Nat(crate::Nat {
            egress: crate::Egress::Allowlist(crate::Allowlist {
                hosts: vec![rule; crate::MAX_RULES + 1],
                cidrs: Vec::new(),
            }),
            ..Default::default()
        });
        assert_eq!(field_of(&c), "allowlist");
    }
}

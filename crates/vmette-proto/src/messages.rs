//! The messages of protocol version [`PROTOCOL_VERSION`].
//!
//! New fields must be added at the end of a struct and new variants at the
//! end of an enum; anything else changes the postcard encoding and needs a
//! new protocol version.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::files::{FileError, FileReply, FileRequest};

/// Protocol generation spoken by this build. Host and guest must agree.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest data chunk (stdout, stderr, stdin) a sender puts in one frame.
pub const MAX_CHUNK_LEN: usize = 64 * 1024;

/// Most stdin bytes the host may have sent but not yet seen acknowledged.
pub const STDIN_WINDOW: usize = 256 * 1024;

/// Most bytes of one exec stream (stdout, or stderr) the guest may have
/// sent without the host's credit for them. Each stream of each exec has
/// its own window, so one exec whose reader is slow stalls only itself.
pub const OUTPUT_WINDOW: usize = 256 * 1024;

/// Largest terminal side, in rows or columns, a PTY may be given.
pub const MAX_PTY_SIDE: u16 = 4096;

/// Most arguments in one exec request.
pub const MAX_ARGS: usize = 4096;

/// Most environment variables in one exec request.
pub const MAX_ENV: usize = 4096;

/// Most directory shares in one boot envelope.
pub const MAX_SHARES: usize = 64;

/// Identifies one exec within a VM. Chosen by the host, unique per VM.
pub type ExecId = u32;

/// Messages from the host to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// How to assemble the root filesystem. Sent once, after `Hello`.
    Boot(BootEnvelope),
    /// Start a command.
    Exec(ExecRequest),
    /// Bytes for an exec's stdin, at most [`MAX_CHUNK_LEN`].
    Stdin {
        /// The exec.
        id: ExecId,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The exec's stdin is at its end: the guest closes the pipe.
    StdinEof {
        /// The exec.
        id: ExecId,
    },
    /// Deliver a signal to the exec's process group.
    Signal {
        /// The exec.
        id: ExecId,
        /// Signal number, a standard signal (1 to 31).
        signal: i32,
    },
    /// Flush file systems and power the VM off.
    PowerOff,
    /// The host consumed `bytes` of an exec's output stream: the guest may
    /// send that many more. Never more than [`OUTPUT_WINDOW`] in all.
    OutputCredit {
        /// The exec.
        id: ExecId,
        /// Which stream (a PTY exec's output is [`OutputStream::Stdout`]).
        stream: OutputStream,
        /// How many bytes.
        bytes: u32,
    },
    /// The PTY of a PTY exec changed size.
    Resize {
        /// The exec.
        id: ExecId,
        /// The new size.
        size: PtySize,
    },
    /// Start a file operation.
    File(FileRequest),
}

/// One of an exec's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputStream {
    /// Standard output, or a PTY exec's terminal output.
    Stdout,
    /// Standard error (unused by PTY execs).
    Stderr,
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows, 1 to [`MAX_PTY_SIDE`].
    pub rows: u16,
    /// Columns, 1 to [`MAX_PTY_SIDE`].
    pub cols: u16,
}

impl PtySize {
    fn validate(&self) -> Result<(), InvalidMessage> {
        let side = 1..=MAX_PTY_SIDE;
        if !side.contains(&self.rows) || !side.contains(&self.cols) {
            return invalid("pty size", "rows and columns must be 1 to 4096");
        }
        Ok(())
    }
}

/// Messages from the guest agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// First message on the channel.
    Hello {
        /// The guest's [`PROTOCOL_VERSION`].
        version: u32,
        /// The agent's own crate version, for diagnostics.
        agent_version: String,
    },
    /// The root is assembled and execs may start.
    Ready,
    /// The root could not be assembled; the guest powers off after this.
    BootFailed {
        /// What went wrong, one sentence.
        message: String,
    },
    /// Output the exec wrote to stdout.
    Stdout {
        /// The exec.
        id: ExecId,
        /// The bytes, at most [`MAX_CHUNK_LEN`].
        data: Vec<u8>,
    },
    /// Output the exec wrote to stderr.
    Stderr {
        /// The exec.
        id: ExecId,
        /// The bytes, at most [`MAX_CHUNK_LEN`].
        data: Vec<u8>,
    },
    /// `bytes` more of the exec's stdin went into its pipe.
    StdinAck {
        /// The exec.
        id: ExecId,
        /// How many bytes.
        bytes: u32,
    },
    /// The exec's command ended. Always after its last output chunk.
    Exited {
        /// The exec.
        id: ExecId,
        /// How it ended.
        status: ExitStatus,
    },
    /// The exec's command could not be started.
    ExecFailed {
        /// The exec.
        id: ExecId,
        /// Why, one sentence.
        message: String,
        /// The shell convention for the failure: 127 not found, 126 not executable.
        code: i32,
    },
    /// A file operation ended. Always after its last output chunk.
    FileDone {
        /// The operation.
        id: ExecId,
        /// What it produced, or why it failed.
        result: Result<FileReply, FileError>,
    },
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The shell's view of the status: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal) => 128 + signal,
        }
    }
}

/// Everything the guest needs to assemble its root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEnvelope {
    /// Where the root's contents come from.
    pub root: RootSource,
    /// Where the writable overlay layer lives. Ignored for a writable
    /// directory root, which is mounted directly.
    pub overlay: OverlayUpper,
    /// Directory shares to mount after the root.
    pub shares: Vec<ShareMount>,
    /// Serial numbers of additional block disks, in the user's order. The
    /// guest links each to `/dev/disk/by-id/virtio-<serial>`.
    pub disks: Vec<String>,
    /// The guest's host name.
    pub hostname: String,
    /// The network interface to configure; the guest has only `lo`
    /// without one.
    pub network: Option<GuestNetwork>,
}

/// The guest's one network interface, configured statically by the agent
/// (no DHCP client in images). IPv4 only: the agent turns IPv6 off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// The interface's MAC address, to find it by.
    pub mac: [u8; 6],
    /// The guest's address.
    pub address: Ipv4Addr,
    /// The length of the subnet's prefix.
    pub prefix_len: u8,
    /// The default gateway, in the subnet.
    pub gateway: Ipv4Addr,
    /// The name server the guest's `/etc/resolv.conf` names.
    pub nameserver: Ipv4Addr,
    /// The interface's MTU.
    pub mtu: u16,
}

/// Smallest MTU a guest interface takes (IPv4's minimum datagram).
pub const MIN_MTU: u16 = 576;
/// Largest MTU a guest interface takes: an IPv4 datagram's limit, less
/// the Ethernet header, rounded down as passt does.
pub const MAX_MTU: u16 = 65520;

/// The source of the root filesystem's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootSource {
    /// A block device with this serial, holding a file system of `fstype`
    /// (`erofs`, `squashfs` or `ext4`), always mounted read-only.
    Block {
        /// The virtio-blk serial.
        serial: String,
        /// The file system type.
        fstype: String,
    },
    /// A virtio-fs share with this tag.
    VirtioFs {
        /// The virtio-fs tag.
        tag: String,
        /// Mount it read-write as the root itself, without an overlay.
        writable: bool,
    },
}

/// The writable layer of an overlay root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OverlayUpper {
    /// A tmpfs in guest memory.
    Tmpfs,
    /// An ext4-formatted block device with this serial.
    Disk {
        /// The virtio-blk serial.
        serial: String,
    },
}

/// One directory share mounted in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareMount {
    /// The virtio-fs tag.
    pub tag: String,
    /// Absolute guest path to mount at.
    pub guest_path: String,
    /// Mount read-only. The host enforces this too; the guest flag only
    /// makes failures quicker and clearer.
    pub read_only: bool,
}

/// A command to start in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The host's id for this exec.
    pub id: ExecId,
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Environment, applied over the guest's defaults.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    pub workdir: Option<String>,
    /// Whether stdin is forwarded. When false the command reads `/dev/null`.
    /// A PTY exec always reads its terminal.
    pub stdin: bool,
    /// Run the command on a new PTY of this size, as its controlling
    /// terminal in a session of its own; stdout then carries the terminal's
    /// output and stderr stays empty.
    pub pty: Option<PtySize>,
    /// Who runs the command, as an image's `User` is written: `name`,
    /// `uid`, `name:group` or `uid:gid`, looked up in the root's
    /// `/etc/passwd` and `/etc/group`; root when absent.
    pub user: Option<String>,
}

/// Why a message was refused by [`HostMessage::validate`] or
/// [`GuestMessage::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidMessage {
    /// Which part of the message.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

pub(crate) fn invalid(field: &'static str, reason: &'static str) -> Result<(), InvalidMessage> {
    Err(InvalidMessage { field, reason })
}

pub(crate) fn check_guest_path(field: &'static str, path: &str) -> Result<(), InvalidMessage> {
    if !path.starts_with('/') {
        return invalid(field, "must be an absolute path");
    }
    if path.split('/').any(|part| part == "..") {
        return invalid(field, "must not contain '..'");
    }
    if path.contains('\0') {
        return invalid(field, "must not contain NUL");
    }
    Ok(())
}

fn check_plain(field: &'static str, value: &str) -> Result<(), InvalidMessage> {
    if value.is_empty() || value.len() > 64 {
        return invalid(field, "must be 1 to 64 bytes");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return invalid(field, "must be ASCII letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

impl HostMessage {
    /// Checks the limits and shapes the guest relies on. The guest calls
    /// this on every message before acting on it.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            HostMessage::Boot(envelope) => envelope.validate(),
            HostMessage::Exec(request) => request.validate(),
            HostMessage::Stdin { data, .. } if data.len() > MAX_CHUNK_LEN => {
                invalid("stdin", "chunk too large")
            }
            HostMessage::Signal { signal, .. } if !(1..=31).contains(signal) => {
                invalid("signal", "must be a standard signal, 1 to 31")
            }
            HostMessage::OutputCredit { bytes, .. } if *bytes as usize > OUTPUT_WINDOW => {
                invalid("output credit", "more than the window")
            }
            HostMessage::Resize { size, .. } => size.validate(),
            HostMessage::File(request) => request.validate(),
            HostMessage::Stdin { .. }
            | HostMessage::StdinEof { .. }
            | HostMessage::Signal { .. }
            | HostMessage::OutputCredit { .. }
            | HostMessage::PowerOff => Ok(()),
        }
    }
}

impl GuestMessage {
    /// Checks the limits the host relies on. The host calls this on every
    /// message from the guest, which it never trusts.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            GuestMessage::Stdout { data, .. } | GuestMessage::Stderr { data, .. }
                if data.len() > MAX_CHUNK_LEN =>
            {
                invalid("output", "chunk too large")
            }
            // Empty chunks cost the host a queue entry each and carry
            // nothing; the agent never sends them.
            GuestMessage::Stdout { data, .. } | GuestMessage::Stderr { data, .. }
                if data.is_empty() =>
            {
                invalid("output", "empty chunk")
            }
            GuestMessage::StdinAck { bytes, .. } if *bytes as usize > STDIN_WINDOW => {
                invalid("stdin ack", "acknowledges more than the window")
            }
            GuestMessage::Exited {
                status: ExitStatus::Code(code),
                ..
            } if !(0..=255).contains(code) => invalid("exit status", "code must be 0 to 255"),
            GuestMessage::Exited {
                status: ExitStatus::Signal(signal),
                ..
            } if !(1..=64).contains(signal) => invalid("exit status", "signal must be 1 to 64"),
            GuestMessage::ExecFailed { code, .. } if !(1..=255).contains(code) => {
                invalid("exec failure", "code must be 1 to 255")
            }
            GuestMessage::Hello { agent_version, .. } if agent_version.len() > 64 => {
                invalid("agent version", "too long")
            }
            GuestMessage::BootFailed { message } | GuestMessage::ExecFailed { message, .. }
                if message.len() > 4096 =>
            {
                invalid("message", "too long")
            }
            GuestMessage::FileDone {
                result: Ok(reply), ..
            } => reply.validate(),
            GuestMessage::FileDone {
                result: Err(error), ..
            } => error.validate(),
            GuestMessage::Hello { .. }
            | GuestMessage::Ready
            | GuestMessage::BootFailed { .. }
            | GuestMessage::Stdout { .. }
            | GuestMessage::Stderr { .. }
            | GuestMessage::StdinAck { .. }
            | GuestMessage::Exited { .. }
            | GuestMessage::ExecFailed { .. } => Ok(()),
        }
    }
}

impl BootEnvelope {
    fn validate(&self) -> Result<(), InvalidMessage> {
        match &self.root {
            RootSource::Block { serial, fstype } => {
                check_plain("root serial", serial)?;
                if !matches!(fstype.as_str(), "erofs" | "squashfs" | "ext4") {
                    return invalid("root fstype", "must be erofs, squashfs or ext4");
                }
            }
            RootSource::VirtioFs { tag, .. } => check_plain("root tag", tag)?,
        }
        if let OverlayUpper::Disk { serial } = &self.overlay {
            check_plain("scratch serial", serial)?;
        }
        if self.shares.len() > MAX_SHARES {
            return invalid("shares", "too many");
        }
        for share in &self.shares {
            check_plain("share tag", &share.tag)?;
            check_guest_path("share guest path", &share.guest_path)?;
            if share.guest_path == "/" {
                return invalid("share guest path", "must not be the root");
            }
        }
        if self.disks.len() > MAX_SHARES {
            return invalid("disks", "too many");
        }
        for serial in &self.disks {
            check_plain("disk serial", serial)?;
        }
        if let Some(network) = &self.network {
            network.validate()?;
        }
        check_plain("hostname", &self.hostname)
    }
}

impl GuestNetwork {
    fn validate(&self) -> Result<(), InvalidMessage> {
        if !(8..=30).contains(&self.prefix_len) {
            return invalid("network prefix", "must be 8 to 30 bits");
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return invalid("network mtu", "must be 576 to 65520");
        }
        if self.mac[0] & 1 != 0 {
            return invalid("network mac", "must be a unicast address");
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix_len));
        let subnet = |ip: Ipv4Addr| u32::from(ip) & mask;
        let host = |ip: Ipv4Addr| u32::from(ip) & !mask;
        for ip in [self.address, self.gateway] {
            if subnet(ip) != subnet(self.address) || host(ip) == 0 || host(ip) == !mask {
                return invalid("network address", "must be hosts of one subnet");
            }
        }
        if self.address == self.gateway {
            return invalid("network gateway", "must not be the guest's address");
        }
        if self.nameserver.is_unspecified() || self.nameserver.is_broadcast() {
            return invalid("network nameserver", "must be a unicast address");
        }
        Ok(())
    }
}

impl ExecRequest {
    fn validate(&self) -> Result<(), InvalidMessage> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return invalid("argv", "must name a program");
        }
        if self.argv.len() > MAX_ARGS {
            return invalid("argv", "too many arguments");
        }
        if self.argv.iter().any(|arg| arg.contains('\0')) {
            return invalid("argv", "must not contain NUL");
        }
        if self.env.len() > MAX_ENV {
            return invalid("env", "too many variables");
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
                return invalid("env", "keys must be non-empty without '=' or NUL");
            }
        }
        if let Some(workdir) = &self.workdir {
            check_guest_path("workdir", workdir)?;
        }
        if let Some(size) = &self.pty {
            size.validate()?;
        }
        if let Some(user) = &self.user {
            check_user(user)?;
        }
        Ok(())
    }
}

/// Longest user spec: a name and a group, each at most 256 bytes.
const MAX_USER_LEN: usize = 513;

fn check_user(user: &str) -> Result<(), InvalidMessage> {
    if user.is_empty() || user.len() > MAX_USER_LEN {
        return invalid("user", "must be 1 to 513 bytes");
    }
    let mut parts = user.split(':');
    let name = parts.next().unwrap_or_default();
    let group = parts.next();
    if parts.next().is_some() {
        return invalid("user", "must be USER or USER:GROUP");
    }
    for part in std::iter::once(name).chain(group) {
        if part.is_empty() || part.len() > 256 {
            return invalid("user", "names must be 1 to 256 bytes");
        }
        if !part.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return invalid(
                "user",
                "names must be printable ASCII without '/' or spaces",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> BootEnvelope {
        BootEnvelope {
            root: RootSource::Block {
                serial: "vmette-root".into(),
                fstype: "erofs".into(),
            },
            overlay: OverlayUpper::Tmpfs,
            shares: vec![ShareMount {
                tag: "share0".into(),
                guest_path: "/mnt/data".into(),
                read_only: true,
            }],
            disks: vec![],
            hostname: "vmette".into(),
            network: Some(GuestNetwork {
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 0, 2, 2),
                nameserver: Ipv4Addr::new(10, 0, 2, 2),
                mtu: 65520,
            }),
        }
    }

    #[test]
    fn a_guest_network_must_be_one_subnet_of_unicast_hosts() {
        let broken: [fn(&mut GuestNetwork); 7] = [
            |n| n.prefix_len = 31,
            |n| n.mtu = 100,
            |n| n.mac[0] = 1,
            |n| n.gateway = Ipv4Addr::new(10, 0, 3, 2),
            |n| n.address = Ipv4Addr::new(10, 0, 2, 255),
            |n| n.gateway = n.address,
            |n| n.nameserver = Ipv4Addr::BROADCAST,
        ];
        for (index, breaks) in broken.iter().enumerate() {
            let mut env = envelope();
            breaks(env.network.as_mut().expect("network"));
            assert!(HostMessage::Boot(env).validate().is_err(), "case {index}");
        }
    }

    fn exec(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            id: 1,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            workdir: None,
            stdin: false,
            pty: None,
            user: None,
        }
    }

    #[test]
    fn accepts_a_normal_boot_and_exec() {
        assert_eq!(HostMessage::Boot(envelope()).validate(), Ok(()));
        assert_eq!(HostMessage::Exec(exec(&["uname", "-r"])).validate(), Ok(()));
    }

    #[test]
    fn rejects_share_paths_that_escape_or_replace_the_root() {
        for path in ["relative", "/a/../etc", "/"] {
            let mut env = envelope();
            env.shares[0].guest_path = path.into();
            assert!(HostMessage::Boot(env).validate().is_err(), "{path}");
        }
    }

    #[test]
    fn rejects_tags_with_odd_characters() {
        let mut env = envelope();
        env.shares[0].tag = "a,b".into();
        assert!(HostMessage::Boot(env).validate().is_err());
    }

    #[test]
    fn rejects_unknown_fstype() {
        let mut env = envelope();
        env.root = RootSource::Block {
            serial: "r".into(),
            fstype: "nfs".into(),
        };
        assert!(HostMessage::Boot(env).validate().is_err());
    }

    #[test]
    fn rejects_empty_argv_and_bad_env() {
        assert!(HostMessage::Exec(exec(&[])).validate().is_err());
        assert!(HostMessage::Exec(exec(&[""])).validate().is_err());
        let mut request = exec(&["env"]);
        request.env = vec![("A=B".into(), "c".into())];
        assert!(HostMessage::Exec(request).validate().is_err());
    }

    #[test]
    fn user_specs_are_one_or_two_plain_names() {
        for good in ["root", "1000", "app:staff", "1000:1000", "www-data"] {
            let mut request = exec(&["id"]);
            request.user = Some(good.into());
            assert_eq!(HostMessage::Exec(request).validate(), Ok(()), "{good}");
        }
        let long = "a".repeat(257);
        for bad in [
            "",
            ":",
            "a:",
            "é",
            ":b",
            "a:b:c",
            "a b",
            "a/b",
            "a\0",
            long.as_str(),
        ] {
            let mut request = exec(&["id"]);
            request.user = Some(bad.into());
            assert!(HostMessage::Exec(request).validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_out_of_range_signals_and_big_chunks() {
        let signal = HostMessage::Signal { id: 1, signal: 0 };
        assert!(signal.validate().is_err());
        let stdin = HostMessage::Stdin {
            id: 1,
            data: vec![0; MAX_CHUNK_LEN + 1],
        };
        assert!(stdin.validate().is_err());
        let stdout = GuestMessage::Stdout {
            id: 1,
            data: vec![0; MAX_CHUNK_LEN + 1],
        };
        assert!(stdout.validate().is_err());
        let empty = GuestMessage::Stderr {
            id: 1,
            data: vec![],
        };
        assert!(empty.validate().is_err());
    }

    #[test]
    fn rejects_exit_statuses_no_process_can_have() {
        for status in [
            ExitStatus::Code(-1),
            ExitStatus::Code(256),
            ExitStatus::Signal(0),
            ExitStatus::Signal(i32::MAX),
        ] {
            let exited = GuestMessage::Exited { id: 1, status };
            assert!(exited.validate().is_err(), "{status:?}");
        }
        let ok = GuestMessage::Exited {
            id: 1,
            status: ExitStatus::Signal(9),
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn rejects_credit_beyond_the_window_and_odd_terminal_sizes() {
        let credit = HostMessage::OutputCredit {
            id: 1,
            stream: OutputStream::Stdout,
            bytes: OUTPUT_WINDOW as u32 + 1,
        };
        assert!(credit.validate().is_err());
        for (rows, cols) in [(0, 80), (24, 0), (MAX_PTY_SIDE + 1, 80)] {
            let resize = HostMessage::Resize {
                id: 1,
                size: PtySize { rows, cols },
            };
            assert!(resize.validate().is_err(), "{rows}x{cols}");
            let mut request = exec(&["sh"]);
            request.pty = Some(PtySize { rows, cols });
            assert!(HostMessage::Exec(request).validate().is_err());
        }
        let fine = HostMessage::Resize {
            id: 1,
            size: PtySize { rows: 24, cols: 80 },
        };
        assert_eq!(fine.validate(), Ok(()));
    }

    #[test]
    fn shell_codes_follow_the_shell_convention() {
        assert_eq!(ExitStatus::Code(7).shell_code(), 7);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
    }
}

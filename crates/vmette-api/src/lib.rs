//! The types of `vmetted`'s HTTP API (`docs/api.md`), and where its socket
//! lives: one definition for the daemon that serves them and the clients
//! (the `vmette` CLI) that call them, so the two cannot drift apart.
//!
//! Requests refuse unknown fields, so a misspelt setting is an error
//! rather than silently ignored.

#![warn(missing_docs)]

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The socket file's name in the socket directory.
pub const SOCKET_NAME: &str = "vmetted.sock";

/// The daemon's lock file in the socket directory.
pub const LOCK_NAME: &str = "vmetted.lock";

/// The directory the daemon serves from: `$XDG_RUNTIME_DIR/vmette`, else
/// `run` under the vmette cache directory.
pub fn socket_dir() -> Result<PathBuf, vmette_assets::AssetError> {
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(runtime).join("vmette"));
    }
    Ok(vmette_assets::Cache::locate()?.root().join("run"))
}

/// Where paused sessions will be kept (`$XDG_DATA_HOME/vmette/paused`, else
/// `~/.local/share/vmette/paused`). The daemon creates it and never cleans
/// it: unlike sockets, locks and run directories, what is in it outlives a
/// daemon on purpose.
pub fn state_dir() -> Option<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".local/share"))
        })?;
    Some(data.join("vmette").join("paused"))
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    /// The daemon's version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// Live sessions.
    pub sessions: usize,
    /// Guest memory they hold, MiB.
    pub memory_mib: u64,
    /// Most live sessions.
    pub max_sessions: usize,
    /// Most guest memory, MiB.
    pub max_memory_mib: u64,
    /// Default idle eviction, seconds.
    pub idle_timeout_s: Option<u64>,
}

/// `POST /v1/sessions`: every field optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// A unique name: 1 to 64 letters, digits, `-`, `_` and `.`, starting
    /// with a letter or digit, and not with `vm-` (kept for ids).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^(?!vm-)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    )]
    pub name: Option<String>,
    /// Guest memory, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 128, maximum = 262144))]
    #[serde(default, deserialize_with = "whole::optional")]
    pub memory_mib: Option<u32>,
    /// Virtual CPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    #[serde(default, deserialize_with = "whole::optional")]
    pub vcpus: Option<u8>,
    /// An ephemeral ext4 disk for the root's writes, MiB (not with a
    /// writable directory `rootfs`, which has no overlay).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 16, maximum = 65536))]
    #[serde(default, deserialize_with = "whole::optional")]
    pub scratch_mib: Option<u64>,
    /// End the session this long after it is ready, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(format = "uint64", maximum = 18446744073709551615_u64, minimum = 1)
    )]
    #[serde(default, deserialize_with = "whole::optional")]
    pub timeout_s: Option<u64>,
    /// End it after this long without an exec.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(format = "uint64", maximum = 18446744073709551615_u64, minimum = 1)
    )]
    #[serde(default, deserialize_with = "whole::optional")]
    pub idle_timeout_s: Option<u64>,
    /// Host directories to mount (read-only unless `writable`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(max_items = 64))]
    pub shares: Vec<ShareRequest>,
    /// Disk images to attach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(max_items = 64))]
    pub disks: Vec<DiskRequest>,
    /// The root file system instead of the default image: a directory or
    /// an erofs, squashfs or ext4 image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsRequest>,
    /// The image instead of the default one (not with `rootfs`): a registry
    /// reference (`python:3.12-slim`), a name in the daemon's store, a
    /// preset (`debian`, `python`, `node`, `toolbox`: built from Debian
    /// packages on first use, which takes a minute), an `http(s)://` URL
    /// of a root tarball, or an absolute path to a directory, tarball or
    /// file-system image. Its Env, WorkingDir and User apply to every exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 4096))]
    pub image: Option<String>,
    /// The guest's network; without one the guest has only `lo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRequest>,
}

/// A session's network: a device behind the host's user-mode stack.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// Let the guest open connections outward (NAT), except to loopback,
    /// private, link-local (cloud metadata), multicast and reserved
    /// addresses, which stay unreachable; names that resolve to them are
    /// refused. Without it (and without `allow_hosts` or `allow_cidrs`)
    /// the guest reaches nothing, and only serves the ports published.
    #[serde(default)]
    pub outbound: bool,
    /// Limits the guest's connections to these names (`NAME[:PORT]`;
    /// `*.example.com` covers the names below example.com, not itself),
    /// reached through the addresses the stack's DNS gave the guest for
    /// them. Without a port: HTTP (80) and HTTPS (443), where the stack
    /// reads the Host or the TLS server name of each connection and
    /// connects to that name itself. Other names get NXDOMAIN. With
    /// `allow_hosts` or `allow_cidrs`, egress goes only where they allow,
    /// whatever `outbound` says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(
        feature = "openapi",
        schema(max_items = 256, value_type = Vec<String>, example = json!(["pypi.org", "*.pythonhosted.org", "git.example.com:22"]))
    )]
    pub allow_hosts: Vec<String>,
    /// Limits the guest's connections and UDP to these IPv4 ranges
    /// (`ADDRESS[/PREFIX][:PORT]`; every port without one). A range the
    /// stack otherwise denies (a private network) is reachable when named
    /// here; the host's loopback never is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(
        feature = "openapi",
        schema(max_items = 256, value_type = Vec<String>, example = json!(["203.0.113.0/24", "198.51.100.7:8080"]))
    )]
    pub allow_cidrs: Vec<String>,
    /// Guest TCP ports to publish on the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(max_items = 64))]
    pub publish: Vec<PortRequest>,
    /// Ports of the host's loopback the guest may reach, at its gateway's
    /// address (10.0.2.2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(max_items = 64))]
    pub host_ports: Vec<u16>,
    /// The DNS server the stack asks for the guest (`IP` or `IP:PORT`);
    /// the daemon host's resolver configuration when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(max_length = 64))]
    pub dns: Option<String>,
}

/// A guest TCP port to publish on the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PortRequest {
    /// The host address to listen on; 127.0.0.1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(max_length = 64))]
    pub host_ip: Option<String>,
    /// The host port; 0 (the default) picks a free one.
    #[serde(default)]
    pub host_port: u16,
    /// The guest port connections go to.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    pub guest_port: u16,
}

/// A port a session publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PublishedPortInfo {
    /// The host address it listens on.
    pub host_ip: String,
    /// The host port (the one chosen, when 0 was asked).
    pub host_port: u16,
    /// The guest port connections go to.
    pub guest_port: u16,
}

/// A host directory mounted in a session's guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ShareRequest {
    /// The host directory, an absolute path.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^/[^\u0000]*$"))]
    pub host_path: String,
    /// Where the guest sees it, an absolute path other than `/`, without
    /// `..`.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^(?!.*(?:^|/)\.\.(?:/|$))/[^\u0000]+$")
    )]
    pub guest_path: String,
    /// Let the guest write (the host enforces read-only otherwise).
    #[serde(default)]
    pub writable: bool,
}

/// A disk image attached to a session's guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    /// The image, an absolute path.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^/[^\u0000]*$"))]
    pub path: String,
    /// Attach it read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A session's root file system.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RootfsRequest {
    /// A directory or image, an absolute path.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^/[^\u0000]*$"))]
    pub path: String,
    /// For a directory: write through to it instead of into an overlay.
    #[serde(default)]
    pub writable: bool,
}

/// A session, as created, listed and described.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionInfo {
    /// Its id: `vm-` and 16 hex digits.
    #[cfg_attr(feature = "openapi", schema(pattern = "^vm-[0-9a-f]{16}$"))]
    pub id: String,
    /// Its name.
    pub name: Option<String>,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub vcpus: u8,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// `running` or `ended`.
    #[cfg_attr(feature = "openapi", schema(schema_with = schemas::session_state))]
    pub state: String,
    /// Why it ended, once it has.
    pub end_reason: Option<String>,
    /// Whether the guest has a network device.
    #[serde(default)]
    pub network: bool,
    /// The ports it publishes now.
    #[serde(default)]
    pub published: Vec<PublishedPortInfo>,
    /// What the network stack refused the guest so far, by reason; only
    /// for a session with a network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<DeniedCounts>,
}

/// How many of a guest's connections, UDP flows and DNS queries the
/// network stack refused, by reason: each counted once, however many
/// packets it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeniedCounts {
    /// DNS queries for names not allowed, or over the size bound.
    pub dns: u64,
    /// Connections to addresses nothing allows.
    pub ip: u64,
    /// TLS connections whose ClientHello named no allowed server.
    pub sni: u64,
    /// HTTP requests for a host not allowed, or another host than the
    /// connection's first request.
    pub host: u64,
    /// Connections to an allowed address on a port not opened.
    pub port: u64,
    /// UDP flows other than DNS that no range allows.
    pub udp: u64,
    /// DNS answers refused for naming only addresses the guest may not
    /// reach (rebinding).
    pub rebind: u64,
}

/// `DELETE /v1/sessions/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Ended {
    /// The session's id.
    pub id: String,
    /// Why it ended.
    pub end_reason: String,
}

/// `POST /v1/sessions/{id}/execs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments: a non-empty program, at most 4096 strings
    /// in all, none with a NUL.
    #[cfg_attr(feature = "openapi", schema(schema_with = schemas::argv))]
    pub argv: Vec<String>,
    /// Environment variables: at most 4096, names non-empty without `=`,
    /// neither names nor values with a NUL.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = schemas::env))]
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory, an absolute guest path without `..`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^(?!.*(?:^|/)\.\.(?:/|$))/[^\u0000]*$")
    )]
    pub workdir: Option<String>,
    /// Open a stdin to write to.
    #[serde(default)]
    pub stdin: bool,
    /// Run on a PTY.
    #[serde(default)]
    pub tty: bool,
    /// The PTY's rows (default 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4096))]
    #[serde(deserialize_with = "whole::optional")]
    pub rows: Option<u16>,
    /// The PTY's columns (default 80).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4096))]
    #[serde(deserialize_with = "whole::optional")]
    pub cols: Option<u16>,
    /// Kill the command after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(format = "uint64", maximum = 18446744073709551615_u64)
    )]
    #[serde(deserialize_with = "whole::optional")]
    pub timeout_ms: Option<u64>,
    /// Who runs it: `name`, `uid`, `name:group` or `uid:gid` (printable
    /// ASCII without `/`), from the root's own `/etc/passwd`; the image's
    /// user (else root) by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[!-.0-9;-~]{1,256}(:[!-.0-9;-~]{1,256})?$")
    )]
    pub user: Option<String>,
}

/// A started exec.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecInfo {
    /// Its id within the session.
    pub id: u32,
    /// The session's id.
    pub session: String,
}

/// `POST …/signal`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// 1 to 31.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 31))]
    #[serde(deserialize_with = "whole::number")]
    pub signal: i32,
}

/// `POST …/resize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    /// Rows.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4096))]
    #[serde(deserialize_with = "whole::number")]
    pub rows: u16,
    /// Columns.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4096))]
    #[serde(deserialize_with = "whole::number")]
    pub cols: u16,
}

/// The data of one exec event; which fields are set depends on the event's
/// kind (`stdout`, `stderr`, `pty`, `exit`, `failed`, `gap`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventData {
    /// The event's sequence number, also its SSE id.
    pub seq: u64,
    /// Output bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(content_encoding = "base64"))]
    pub data: Option<String>,
    /// For `exit` and `failed`: how the exec ended.
    #[serde(flatten)]
    pub end: ExecEnd,
    /// For `gap`: output bytes this client missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed_bytes: Option<u64>,
}

/// How an exec ended, in its `exit` or `failed` event and in the attach
/// WebSocket's status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecEnd {
    /// The shell's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// For `exit`: `exited`, `signaled`, `timed_out` or `session_ended`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// After a signal: the signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// For `failed`, `session_ended` and errors: one sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The attach WebSocket's subprotocol, also its version
/// (`Sec-WebSocket-Protocol`).
pub const ATTACH_PROTOCOL: &str = "v1.attach.vmette.dev";

/// Over loopback TCP, a `Sec-WebSocket-Protocol` entry of this prefix and
/// the token stands in for the `Authorization` header, which a browser's
/// WebSocket cannot send.
pub const TOKEN_PROTOCOL_PREFIX: &str = "bearer.vmette.dev.";

/// The attach WebSocket's channels: the first byte of every binary message.
pub mod channel {
    /// Client to daemon: bytes for the command's stdin.
    pub const STDIN: u8 = 0;
    /// Daemon to client: the command's stdout, or a PTY's one stream.
    pub const STDOUT: u8 = 1;
    /// Daemon to client: the command's stderr.
    pub const STDERR: u8 = 2;
    /// Daemon to client: an [`AttachStatus`](super::AttachStatus) as JSON.
    pub const STATUS: u8 = 3;
    /// Client to daemon: a [`ResizeRequest`](super::ResizeRequest) as JSON.
    pub const RESIZE: u8 = 4;
    /// Client to daemon: close the stream named by the next byte (only
    /// [`STDIN`] can be closed).
    pub const CLOSE: u8 = 255;
}

/// A message on the attach WebSocket's status channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttachStatus {
    /// `exit` (the command ended; the daemon then closes the WebSocket),
    /// `failed` (it never started; closed too), or `error` (something the
    /// client asked for was refused; the attach goes on).
    #[serde(rename = "type")]
    pub kind: String,
    /// How the exec ended, or for `error` the `message`.
    #[serde(flatten)]
    pub end: ExecEnd,
}

/// A path's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Stat {
    /// `file`, `directory`, `symlink` or `other`.
    #[cfg_attr(feature = "openapi", schema(schema_with = schemas::file_kind))]
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits, octal.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-7]+$"))]
    pub mode: String,
    /// Modification time, seconds since the epoch.
    pub modified_unix: i64,
}

/// One directory entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Its metadata.
    #[serde(flatten)]
    pub stat: Stat,
}

/// `GET …/files/list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Listing {
    /// Entries, sorted by name, at most 1024.
    pub entries: Vec<Entry>,
    /// The directory has more.
    pub truncated: bool,
}

/// A finished transfer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Moved {
    /// Bytes moved.
    pub bytes: u64,
}

/// Every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// A stable code (`not_found`, `limit_reached`, …).
    pub code: String,
    /// One sentence.
    pub message: String,
}

/// Whole numbers however JSON spells them: `93` and `93.0` are the same
/// integer to JSON Schema, and so to the daemon.
mod whole {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, Deserializer, Unexpected, Visitor};
    use serde::Deserialize;

    struct Whole<T>(PhantomData<T>);

    impl<T: TryFrom<u64> + TryFrom<i64>> Visitor<'_> for Whole<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number in range")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
            // Only values that u64 or i64 hold exactly; 2^64 itself is not.
            if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                self.visit_u64(v as u64)
            } else if v.fract() == 0.0 && (-9_223_372_036_854_775_808.0..0.0).contains(&v) {
                self.visit_i64(v as i64)
            } else {
                Err(E::invalid_value(Unexpected::Float(v), &self))
            }
        }
    }

    pub fn number<'de, D: Deserializer<'de>, T: TryFrom<u64> + TryFrom<i64>>(
        d: D,
    ) -> Result<T, D::Error> {
        d.deserialize_any(Whole(PhantomData))
    }

    struct Present<T>(T);

    impl<'de, T: TryFrom<u64> + TryFrom<i64>> Deserialize<'de> for Present<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            number(d).map(Present)
        }
    }

    pub fn optional<'de, D: Deserializer<'de>, T: TryFrom<u64> + TryFrom<i64>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        Option::<Present<T>>::deserialize(d).map(|v| v.map(|Present(v)| v))
    }
}

/// Schemas that the derive cannot say by itself: fixed sets of words, and
/// rules on items of a list or names of a map.
#[cfg(feature = "openapi")]
mod schemas {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type};

    const NO_NUL: &str = r"^[^\u0000]*$";

    fn words(values: &[&str]) -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .enum_values(Some(values.iter().copied()))
    }

    pub fn session_state() -> ObjectBuilder {
        words(&["running", "ended"]).description(Some("`running` or `ended`."))
    }

    pub fn file_kind() -> ObjectBuilder {
        words(&["file", "directory", "symlink", "other"])
            .description(Some("`file`, `directory`, `symlink` or `other`."))
    }

    fn text(pattern: &str) -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .pattern(Some(pattern))
    }

    pub fn argv() -> ArrayBuilder {
        ArrayBuilder::new()
            .description(Some(
                "Program and arguments: a non-empty program, at most 4096 strings in all, none with a NUL.",
            ))
            .prefix_items([Schema::Object(text(NO_NUL).min_length(Some(1)).build())])
            .items(text(NO_NUL))
            .min_items(Some(1))
            .max_items(Some(4096))
    }

    pub fn env() -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::Object))
            .description(Some(
                "Environment variables: at most 4096, names non-empty without `=`, neither names nor values with a NUL.",
            ))
            .additional_properties(Some(text(NO_NUL)))
            .property_names(Some(text(r"^[^=\u0000]+$")))
            .max_properties(Some(4096))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_may_be_spelt_as_floats() {
        let r: ResizeRequest =
            serde_json::from_str(r#"{"rows": 40.0, "cols": 120}"#).expect("whole");
        assert_eq!((r.rows, r.cols), (40, 120));
        for bad in [
            r#"{"rows": 40.5, "cols": 1}"#,
            r#"{"rows": 70000, "cols": 1}"#,
            r#"{"rows": -1.0, "cols": 1}"#,
        ] {
            assert!(serde_json::from_str::<ResizeRequest>(bad).is_err(), "{bad}");
        }
        let s: SessionRequest =
            serde_json::from_str(r#"{"vcpus": 2.0, "timeout_s": null}"#).expect("whole");
        assert_eq!((s.vcpus, s.timeout_s, s.memory_mib), (Some(2), None, None));
        let e: ExecRequest = serde_json::from_str(r#"{"argv": ["x"]}"#).expect("defaults");
        assert_eq!(e.timeout_ms, None);
    }
}

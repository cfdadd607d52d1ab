//! The boundary between the host library and a hypervisor.
//!
//! The library turns a [`crate::Config`] into a [`VmSpec`]: a machine with
//! a kernel, disks identified by serial, directory shares identified by tag,
//! and a control channel. An [`Engine`] makes that machine real (QEMU on
//! Linux, Virtualization.framework on macOS) and hands back a [`Vm`]. The
//! library never learns which engine it talks to; engines depend on this
//! crate, never the reverse.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::Watchdog;
use crate::Accel;

/// A block device of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Serial number the guest finds the disk by (at most 20 bytes).
    pub serial: String,
    /// The image file.
    pub path: PathBuf,
    /// Attach read-only; the engine must refuse guest writes.
    pub read_only: bool,
}

/// A host directory shared over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// virtio-fs tag the guest mounts by.
    pub tag: String,
    /// The host directory.
    pub path: PathBuf,
    /// Refuse guest writes on the host side.
    pub read_only: bool,
}

/// The machine an engine is asked to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs holding the guest agent.
    pub initramfs: PathBuf,
    /// Kernel arguments to append after the engine's own.
    pub cmdline_extra: String,
    /// Virtual CPUs.
    pub vcpus: u8,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Block devices.
    pub disks: Vec<DiskSpec>,
    /// Directory shares.
    pub shares: Vec<ShareSpec>,
    /// The network device, when the guest has one.
    pub nic: Option<crate::network::NicSpec>,
    /// Accelerator preference.
    pub accel: Accel,
    /// A private directory for the engine's sockets and logs; removed after
    /// the run.
    pub run_dir: PathBuf,
}

/// One line of `vmette doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// What was found.
    pub detail: String,
    /// `None` when fine; otherwise the command or step that fixes it.
    pub fix: Option<String>,
}

/// A hypervisor back end.
pub trait Engine: Send + Sync {
    /// Short name (`qemu`, `vz`).
    fn name(&self) -> &'static str;

    /// Starts the machine. Every helper process the engine spawns must be
    /// spawned with [`crate::process::spawn_helper`], so that it dies with
    /// the run, however the run ends.
    fn start(&self, spec: &VmSpec, watchdog: &Watchdog) -> Result<Box<dyn Vm>, EngineError>;

    /// Kernel modules the guest needs for this engine's devices (the virtio
    /// transport, vsock) on top of the common set the initramfs always has.
    fn guest_modules(&self) -> &'static [&'static str];

    /// What this engine needs from the host and whether it is there.
    fn diagnose(&self) -> Vec<Check>;
}

/// A started machine. Dropping it stops the machine and its helpers.
pub trait Vm: Send {
    /// Connects to the guest agent's control channel, waiting until
    /// `deadline` for the engine to make it available.
    fn connect_control(&mut self, deadline: Instant) -> Result<UnixStream, EngineError>;

    /// `true` once the machine has stopped.
    fn has_exited(&mut self) -> bool;

    /// Waits up to `timeout` for the machine to stop by itself.
    fn wait_exit(&mut self, timeout: Duration) -> bool;

    /// Stops the machine at once.
    fn kill(&mut self);

    /// `true` once the machine has stopped because the guest powered it
    /// off, rather than because it crashed or was killed.
    fn powered_off_by_guest(&mut self) -> bool;

    /// The end of the guest's console output, for error reports.
    fn console_tail(&self) -> String;

    /// Which accelerator runs the machine, and why, for `-v` output.
    fn accelerator(&self) -> String;
}

/// Keeps the last bytes of a guest console in memory. The guest decides
/// how much it writes to its console, so the console goes through a pipe
/// into this bounded buffer rather than into a file that could fill the
/// host's disk.
#[derive(Debug, Clone)]
pub struct ConsoleTail {
    buffer: Arc<Mutex<VecDeque<u8>>>,
    capacity: usize,
}

impl ConsoleTail {
    /// Reads `source` on a thread of its own until it ends, keeping the
    /// last `capacity` bytes.
    pub fn capture(source: impl Read + Send + 'static, capacity: usize) -> io::Result<ConsoleTail> {
        let tail = ConsoleTail {
            buffer: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity,
        };
        let sink = tail.clone();
        thread::Builder::new()
            .name("vmette-console".into())
            .spawn(move || sink.fill_from(source))?;
        Ok(tail)
    }

    fn fill_from(&self, mut source: impl Read) {
        let mut chunk = [0u8; 4096];
        loop {
            match source.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => self.push(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn push(&self, data: &[u8]) {
        let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        buffer.extend(data);
        let excess = buffer.len().saturating_sub(self.capacity);
        buffer.drain(..excess);
    }

    /// What the console said last, as text.
    pub fn text(&self) -> String {
        let buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        let (front, back) = buffer.as_slices();
        let mut bytes = Vec::with_capacity(buffer.len());
        bytes.extend_from_slice(front);
        bytes.extend_from_slice(back);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The last `max_bytes` of a log file, for error reports; empty when the
/// file cannot be read.
pub fn log_tail(path: &Path, max_bytes: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(max_bytes)))
        .is_err()
    {
        return String::new();
    }
    let mut tail = Vec::new();
    let _ = file.take(max_bytes).read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).into_owned()
}

/// Why an engine could not start or talk to a machine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The machine asked for is outside what this engine can build (too
    /// little memory for the hypervisor, a tag it cannot carry). Reported to
    /// callers as [`crate::Error::InvalidConfig`].
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// Which setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A helper program could not be started.
    #[error("could not start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor exited during start-up.
    #[error("{program} exited during start-up: {output}")]
    EarlyExit {
        /// The program.
        program: String,
        /// What it printed.
        output: String,
    },
    /// The requested accelerator cannot be used on this host.
    #[error("the {accel} accelerator is not usable here: {reason}")]
    AccelUnavailable {
        /// The accelerator.
        accel: &'static str,
        /// Why not.
        reason: String,
    },
    /// The machine did not offer its control channel in time.
    #[error("the control channel did not appear within {0:?}")]
    ControlTimeout(Duration),
    /// Something the engine needs is unsupported by this host or engine.
    #[error("{0}")]
    Unsupported(String),
    /// A file or socket operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_tail_keeps_only_the_end() {
        let flood = vec![b'x'; 100_000];
        let mut source = flood.clone();
        source.extend_from_slice(b"the end");
        let tail = ConsoleTail::capture(std::io::Cursor::new(source), 16).expect("capture");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !tail.text().ends_with("the end") {
            assert!(std::time::Instant::now() < deadline, "never saw the end");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(tail.text(), "xxxxxxxxxthe end");
    }
}

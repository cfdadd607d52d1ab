//! A running QEMU VM and the helpers it owns.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmette_core::engine::{log_tail, ConsoleTail, EngineError, Vm, VmSpec};
use vmette_core::process::{spawn_helper, HelperProcess, Watchdog};

use crate::accel::{self, Choice};
use crate::command_line::{kernel_cmdline, qemu_args, RunFiles};
use crate::{find, qemu_program, virtiofsd};

/// How much of the guest console is kept for error reports.
const CONSOLE_TAIL: usize = 4096;

/// How much of QEMU's own log an error report shows.
const QEMU_LOG_TAIL: u64 = 2000;

/// A QEMU process and its virtiofsd helpers. Fields drop in order: QEMU
/// first, so the helpers see it disconnect.
pub struct QemuVm {
    qemu: HelperProcess,
    _virtiofsd: Vec<HelperProcess>,
    files: RunFiles,
    console: ConsoleTail,
    qemu_log: PathBuf,
    accel: Choice,
}

impl QemuVm {
    pub fn start(spec: &VmSpec, watchdog: &Watchdog) -> Result<QemuVm, EngineError> {
        let accel = accel::choose(spec.accel)?;
        let files = RunFiles::in_dir(&spec.run_dir, spec.shares.len());
        let mut helpers = Vec::new();
        for (index, (share, socket)) in spec.shares.iter().zip(&files.share_sockets).enumerate() {
            let log = virtiofsd::log_path(&spec.run_dir, index);
            helpers.push(virtiofsd::start(share, socket, &log, watchdog)?);
        }

        let program = find(qemu_program(), "VMETTE_QEMU").ok_or_else(|| EngineError::Spawn {
            program: qemu_program().into(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not installed; run ./setup.sh",
            ),
        })?;
        let cmdline = kernel_cmdline(spec, &accel, accel::host_tsc_khz());
        let netdev = std::env::var(crate::NETDEV_ENV)
            .ok()
            .filter(|v| !v.is_empty());
        let args = qemu_args(spec, &accel, &cmdline, &files, netdev.as_deref());
        let qemu_log = spec.run_dir.join("qemu.log");
        let log = File::create(&qemu_log).map_err(|source| EngineError::Io {
            context: "cannot create the QEMU log".into(),
            source,
        })?;
        let mut command = Command::new(&program);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(nic) = &spec.nic {
            let fd = nic.frames.0.as_raw_fd();
            // SAFETY: fcntl is async-signal-safe, and the closure touches no
            // memory of the parent; it only lets the child keep `fd`, which
            // the spec holds open until after the spawn.
            unsafe {
                command.pre_exec(move || {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        tracing::debug!(?program, ?args, "starting QEMU");
        let mut qemu =
            spawn_helper("qemu", &mut command, watchdog).map_err(|source| EngineError::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        let stdout = qemu.take_stdout().ok_or_else(|| EngineError::Io {
            context: "QEMU has no console pipe".into(),
            source: std::io::ErrorKind::BrokenPipe.into(),
        })?;
        let console =
            ConsoleTail::capture(stdout, CONSOLE_TAIL).map_err(|source| EngineError::Io {
                context: "cannot read the guest console".into(),
                source,
            })?;
        Ok(QemuVm {
            qemu,
            _virtiofsd: helpers,
            files,
            console,
            qemu_log,
            accel,
        })
    }

    fn early_exit(&self) -> EngineError {
        EngineError::EarlyExit {
            program: qemu_program().into(),
            output: log_tail(&self.qemu_log, QEMU_LOG_TAIL).trim().to_string(),
        }
    }
}

impl Vm for QemuVm {
    fn connect_control(&mut self, deadline: Instant) -> Result<UnixStream, EngineError> {
        let started = Instant::now();
        loop {
            match UnixStream::connect(&self.files.control) {
                Ok(stream) => return Ok(stream),
                Err(e) => tracing::trace!("control socket not ready: {e}"),
            }
            if self.qemu.has_exited() {
                return Err(self.early_exit());
            }
            if Instant::now() >= deadline {
                return Err(EngineError::ControlTimeout(started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn has_exited(&mut self) -> bool {
        self.qemu.has_exited()
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        self.qemu.wait_timeout(timeout)
    }

    fn kill(&mut self) {
        self.qemu.kill();
    }

    fn powered_off_by_guest(&mut self) -> bool {
        // With -no-reboot, QEMU exits 0 when the guest powers off or
        // reboots; a crash or a signal gives another status.
        self.qemu.exited_successfully()
    }

    fn console_tail(&self) -> String {
        let mut text = self.console.text();
        // QEMU's own complaints (a kernel it cannot load, a device it
        // rejects) go to its log, not the guest console.
        let qemu = log_tail(&self.qemu_log, QEMU_LOG_TAIL);
        for line in qemu.lines().filter(|l| !l.trim().is_empty()).take(20) {
            text.push_str(&format!("\n[qemu] {line}"));
        }
        text
    }

    fn accelerator(&self) -> String {
        format!("{} ({})", self.accel.name(), self.accel.reason())
    }
}

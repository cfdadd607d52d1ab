//! One run: prepare, boot, exec one command, power off, release everything.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vmette_assets::{Progress, Silent};
use vmette_proto::{ExecRequest, GuestMessage, HostMessage, PROTOCOL_VERSION};

use crate::control::{self, CloseOnDrop, Event, StdinWindow};
use crate::engine::Vm;
use crate::process::Watchdog;
use crate::{boot, Config, Engine, Error, Stdin};

/// How long the guest may take from machine start to `Ready` when no
/// timeout is set. Generous: emulated boots of a loaded host are slow.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the command gets to react to a forwarded interrupt before the
/// VM is torn down.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// How long the guest gets to flush its file systems and power off by
/// itself after the command ended.
const POWER_OFF_GRACE: Duration = Duration::from_secs(10);

/// The single exec of a one-shot run.
const EXEC_ID: u32 = 1;

/// Which of the command's streams a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStatus {
    /// The command exited with this code.
    Exited(i32),
    /// The command was killed by this signal.
    Signaled(i32),
    /// The timeout expired; the VM was killed.
    TimedOut,
    /// The caller interrupted the run with this signal.
    Interrupted(i32),
    /// The guest could not start the command (not found, not executable).
    NotStarted {
        /// The shell's code for the failure: 127 or 126.
        code: i32,
        /// Why, one sentence.
        message: String,
    },
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    /// How it ended.
    pub status: RunStatus,
    /// Captured stdout (empty when streaming).
    pub stdout: Vec<u8>,
    /// Captured stderr (empty when streaming).
    pub stderr: Vec<u8>,
    /// Stdout exceeded the capture limit and was cut.
    pub stdout_truncated: bool,
    /// Stderr exceeded the capture limit and was cut.
    pub stderr_truncated: bool,
}

impl RunOutput {
    /// The exit code a shell would report: the command's code, 128 + N for
    /// signal N, 124 for a timeout, 126/127 when it could not start.
    pub fn exit_code(&self) -> i32 {
        match &self.status {
            RunStatus::Exited(code) => *code,
            RunStatus::Signaled(signal) | RunStatus::Interrupted(signal) => 128 + signal,
            RunStatus::TimedOut => 124,
            RunStatus::NotStarted { code, .. } => *code,
        }
    }
}

/// Runs configs on an engine. Built with setters, then used once per run.
pub struct Runner<'a> {
    engine: &'a dyn Engine,
    progress: &'a dyn Progress,
    interrupts: Option<Receiver<i32>>,
}

impl<'a> Runner<'a> {
    /// A runner on `engine` that reports no progress and is never interrupted.
    pub fn new(engine: &'a dyn Engine) -> Runner<'a> {
        Runner {
            engine,
            progress: &Silent,
            interrupts: None,
        }
    }

    /// Reports long first-time work (kernel download, image build) here.
    pub fn progress(mut self, progress: &'a dyn Progress) -> Runner<'a> {
        self.progress = progress;
        self
    }

    /// Signal numbers received here are forwarded to the guest command; if
    /// it has not ended two seconds later, the VM is torn down and
    /// the run reports [`RunStatus::Interrupted`].
    pub fn interrupts(mut self, interrupts: Receiver<i32>) -> Runner<'a> {
        self.interrupts = Some(interrupts);
        self
    }

    /// Runs `config`, capturing stdout and stderr separately, each up to
    /// `config.capture_limit` bytes.
    pub fn run(self, config: &Config) -> Result<RunOutput, Error> {
        let limit = config.capture_limit;
        let mut stdout = Capture::new(limit);
        let mut stderr = Capture::new(limit);
        let mut output = self.run_streaming(config, &mut |stream, data| match stream {
            OutputStream::Stdout => stdout.push(data),
            OutputStream::Stderr => stderr.push(data),
        })?;
        output.stdout = stdout.bytes;
        output.stdout_truncated = stdout.truncated;
        output.stderr = stderr.bytes;
        output.stderr_truncated = stderr.truncated;
        Ok(output)
    }

    /// Runs `config`, handing each chunk of output to `sink` as the guest
    /// produces it. The returned output holds no captured bytes.
    pub fn run_streaming(
        self,
        config: &Config,
        sink: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> Result<RunOutput, Error> {
        let started = Instant::now();
        config.validate()?;
        let deadline = config.timeout.map(|t| started + t);
        let files = boot::prepare(config, self.engine.guest_modules(), self.progress)?;

        let run_dir = tempfile::Builder::new()
            .prefix("vmette-")
            .tempdir()
            .map_err(Error::io("cannot create the run directory"))?;
        let watchdog =
            Watchdog::spawn(run_dir.path()).map_err(Error::io("cannot start the watchdog"))?;
        let (spec, envelope) = boot::layout(config, &files, run_dir.path())?;
        // The guest refuses what breaks the protocol's rules; find out here,
        // before a VM starts, and name the setting.
        for message in [
            HostMessage::Boot(envelope.clone()),
            HostMessage::Exec(exec_request(config)),
        ] {
            message.validate().map_err(|e| Error::InvalidConfig {
                field: e.field,
                reason: e.reason.to_string(),
            })?;
        }

        let (events_tx, events) = mpsc::sync_channel(control::EVENT_QUEUE);
        if let Some(interrupts) = self.interrupts {
            let forward = events_tx.clone();
            let _ = thread::Builder::new()
                .name("vmette-interrupts".into())
                .spawn(move || {
                    for signal in interrupts {
                        if forward.send(Event::Interrupt(signal)).is_err() {
                            return;
                        }
                    }
                });
        }

        let mut vm = self.engine.start(&spec, &watchdog).map_err(Error::from)?;
        tracing::info!(accelerator = %vm.accelerator(), "VM started");

        let boot_deadline =
            deadline.map_or(started + BOOT_TIMEOUT, |d| d.min(started + BOOT_TIMEOUT));
        let session = Session {
            vm: &mut *vm,
            events: &events,
            deadline,
        };
        let result = session.drive(config, envelope, events_tx, boot_deadline, sink);
        tracing::debug!(elapsed = ?started.elapsed(), "run finished");

        // Release in order: the machine and its helpers, then the run
        // directory they used, then the watchdog that guarded both.
        drop(vm);
        drop(run_dir);
        drop(watchdog);
        result
    }
}

/// The conversation with one guest.
struct Session<'s> {
    vm: &'s mut dyn Vm,
    events: &'s Receiver<Event>,
    deadline: Option<Instant>,
}

enum Wait {
    Event(Event),
    Deadline,
    VmGone,
}

impl Session<'_> {
    fn drive(
        mut self,
        config: &Config,
        envelope: vmette_proto::BootEnvelope,
        events_tx: mpsc::SyncSender<Event>,
        boot_deadline: Instant,
        sink: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> Result<RunOutput, Error> {
        let stream = self
            .vm
            .connect_control(boot_deadline)
            .map_err(Error::StartFailed)?;
        let sender = control::start(stream, events_tx)?;

        // Boot: Hello, then the envelope, then Ready.
        loop {
            match self.wait(boot_deadline) {
                Wait::Event(Event::Guest(GuestMessage::Hello {
                    version,
                    agent_version,
                })) => {
                    if version != PROTOCOL_VERSION {
                        return Err(Error::Protocol(format!(
                            "the guest agent {agent_version} speaks protocol {version}, this host speaks {PROTOCOL_VERSION}; rebuild the initramfs with this vmette"
                        )));
                    }
                    sender.send(HostMessage::Boot(envelope.clone()))?;
                }
                Wait::Event(Event::Guest(GuestMessage::Ready)) => break,
                Wait::Event(Event::Guest(GuestMessage::BootFailed { message })) => {
                    return Err(self.boot_failed(message));
                }
                Wait::Event(Event::Interrupt(signal)) => {
                    return Ok(bare(RunStatus::Interrupted(signal)));
                }
                Wait::Event(Event::Guest(other)) => {
                    return Err(Error::Protocol(format!("unexpected {other:?} during boot")));
                }
                Wait::Event(Event::Invalid(reason)) => return Err(Error::Protocol(reason)),
                Wait::Event(Event::Closed(_)) | Wait::VmGone => {
                    return Err(
                        self.boot_failed("the VM stopped before the guest agent was ready".into())
                    );
                }
                Wait::Deadline if self.deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Ok(bare(RunStatus::TimedOut));
                }
                Wait::Deadline => {
                    return Err(self.boot_failed(format!(
                        "the guest agent was not ready within {BOOT_TIMEOUT:?}"
                    )));
                }
            }
        }

        sender.send(HostMessage::Exec(exec_request(config)))?;
        let window = Arc::new(StdinWindow::default());
        let _stop_pump = CloseOnDrop(Arc::clone(&window));
        match &config.stdin {
            Stdin::Null => {}
            Stdin::Inherit => control::pump_stdin(
                EXEC_ID,
                std::io::stdin(),
                sender.clone(),
                Arc::clone(&window),
            ),
            Stdin::Bytes(bytes) => control::pump_stdin(
                EXEC_ID,
                std::io::Cursor::new(bytes.clone()),
                sender.clone(),
                Arc::clone(&window),
            ),
        }

        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let mut until = self.deadline.unwrap_or(far);
        let mut interrupted = None;
        let status = loop {
            match self.wait(until) {
                Wait::Event(Event::Guest(message)) => match message {
                    GuestMessage::Stdout { id: EXEC_ID, data } => sink(OutputStream::Stdout, &data),
                    GuestMessage::Stderr { id: EXEC_ID, data } => sink(OutputStream::Stderr, &data),
                    GuestMessage::StdinAck { id: EXEC_ID, bytes } => {
                        if !window.release(bytes as usize) {
                            return Err(Error::Protocol(
                                "the guest acknowledged stdin it was never sent".into(),
                            ));
                        }
                    }
                    GuestMessage::Exited {
                        id: EXEC_ID,
                        status,
                    } => {
                        break match status {
                            vmette_proto::ExitStatus::Code(code) => RunStatus::Exited(code),
                            vmette_proto::ExitStatus::Signal(signal) => RunStatus::Signaled(signal),
                        }
                    }
                    GuestMessage::ExecFailed {
                        id: EXEC_ID,
                        message,
                        code,
                    } => break RunStatus::NotStarted { code, message },
                    other => tracing::debug!(?other, "ignoring guest message"),
                },
                Wait::Event(Event::Interrupt(signal)) => {
                    if interrupted.is_none() {
                        interrupted = Some(signal);
                        // A failed send means the channel is gone; the
                        // grace period below still ends the run.
                        let _ = sender.send(HostMessage::Signal {
                            id: EXEC_ID,
                            signal,
                        });
                        until = until.min(Instant::now() + INTERRUPT_GRACE);
                    }
                }
                Wait::Event(Event::Invalid(reason)) => return Err(Error::Protocol(reason)),
                Wait::Event(Event::Closed(error)) => {
                    return Err(match error {
                        Some(error) => Error::Channel(error),
                        None => self.boot_failed("the guest closed the control channel".into()),
                    });
                }
                Wait::VmGone => {
                    return Err(self.boot_failed("the VM stopped while the command ran".into()));
                }
                Wait::Deadline => {
                    break match interrupted {
                        Some(signal) => RunStatus::Interrupted(signal),
                        None => RunStatus::TimedOut,
                    }
                }
            }
        };
        window.close();

        // A finished command gets a clean power-off, so that writes to
        // writable disks and shares are flushed; anything else is killed.
        let finished = !matches!(status, RunStatus::TimedOut | RunStatus::Interrupted(_));
        let powered_off = finished
            && sender.send(HostMessage::PowerOff).is_ok()
            && self.vm.wait_exit(POWER_OFF_GRACE);
        if !powered_off {
            self.vm.kill();
        }
        Ok(bare(status))
    }

    /// Waits for the next event, the deadline, or the VM's exit.
    fn wait(&mut self, until: Instant) -> Wait {
        loop {
            let now = Instant::now();
            if now >= until {
                return Wait::Deadline;
            }
            // The VM's exit is polled; everything else arrives as an event.
            let slice = (until - now).min(Duration::from_millis(50));
            match self.events.recv_timeout(slice) {
                Ok(event) => return Wait::Event(event),
                Err(RecvTimeoutError::Timeout) => {
                    if self.vm.has_exited() {
                        // Drain what the guest said before it went away
                        // (a BootFailed, the last output): the reader
                        // delivers it, then the end of the stream.
                        return match self.events.recv_timeout(Duration::from_millis(500)) {
                            Ok(Event::Closed(_)) | Err(_) => Wait::VmGone,
                            Ok(event) => Wait::Event(event),
                        };
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Wait::VmGone,
            }
        }
    }

    fn boot_failed(&self, reason: String) -> Error {
        Error::BootFailed {
            reason,
            console: self.vm.console_tail(),
        }
    }
}

/// The exec request of a one-shot run.
fn exec_request(config: &Config) -> ExecRequest {
    ExecRequest {
        id: EXEC_ID,
        argv: config.command.clone(),
        env: config.env.clone(),
        workdir: config.workdir.clone(),
        stdin: config.stdin != Stdin::Null,
    }
}

fn bare(status: RunStatus) -> RunOutput {
    RunOutput {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
    }
}

/// A capped capture buffer.
struct Capture {
    bytes: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Capture {
    fn new(limit: usize) -> Capture {
        Capture {
            bytes: Vec::new(),
            limit,
            truncated: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_stops_at_the_limit_and_says_so() {
        let mut capture = Capture::new(5);
        capture.push(b"abc");
        assert!(!capture.truncated);
        capture.push(b"defg");
        assert_eq!(capture.bytes, b"abcde");
        assert!(capture.truncated);
    }

    #[test]
    fn exit_codes_follow_the_documented_convention() {
        assert_eq!(bare(RunStatus::Exited(7)).exit_code(), 7);
        assert_eq!(bare(RunStatus::Signaled(9)).exit_code(), 137);
        assert_eq!(bare(RunStatus::TimedOut).exit_code(), 124);
        assert_eq!(bare(RunStatus::Interrupted(2)).exit_code(), 130);
        let not_found = RunStatus::NotStarted {
            code: 127,
            message: "x".into(),
        };
        assert_eq!(bare(not_found).exit_code(), 127);
    }
}

//! One run: a session with one exec. Boot, run the command, power off,
//! release everything.

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use vmette_assets::{Progress, Silent};
use vmette_proto::{HostMessage, OutputStream, PtySize};

use crate::control;
use crate::session::{BootAbort, Capture, EndReason, ExecEvent, ExecSpec, ExecStatus, Session};
use crate::{Config, DenialCounts, Engine, Error, NetworkProvider, PublishedPort, Stdin};

/// How long the command gets to react to a forwarded interrupt before the
/// VM is torn down.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// How often the run looks for interrupts while it waits for output.
const POLL: Duration = Duration::from_millis(50);

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
    /// What the network stack refused the guest, for a networked run.
    pub denials: Option<DenialCounts>,
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

/// What [`Runner::on_published`] is told: the ports the run publishes.
pub type PublishedReport<'a> = dyn Fn(&[PublishedPort]) + 'a;

/// Runs configs on an engine. Built with setters, then used once per run.
pub struct Runner<'a> {
    engine: &'a dyn Engine,
    network: Option<&'a dyn NetworkProvider>,
    on_published: Option<&'a PublishedReport<'a>>,
    progress: &'a dyn Progress,
    interrupts: Option<Receiver<i32>>,
    resizes: Option<Receiver<PtySize>>,
}

impl<'a> Runner<'a> {
    /// A runner on `engine` that reports no progress and is never interrupted.
    pub fn new(engine: &'a dyn Engine) -> Runner<'a> {
        Runner {
            engine,
            network: None,
            on_published: None,
            progress: &Silent,
            interrupts: None,
            resizes: None,
        }
    }

    /// Attaches the guest to `network` when the config asks for one.
    pub fn network(mut self, network: &'a dyn NetworkProvider) -> Runner<'a> {
        self.network = Some(network);
        self
    }

    /// Tells `report` which ports the run publishes (the host ports
    /// chosen, where 0 was asked) once the guest is up, before the
    /// command starts.
    pub fn on_published(mut self, report: &'a PublishedReport<'a>) -> Runner<'a> {
        self.on_published = Some(report);
        self
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

    /// Terminal sizes received here resize a PTY command's terminal
    /// ([`Config::pty`]).
    pub fn resizes(mut self, resizes: Receiver<PtySize>) -> Runner<'a> {
        self.resizes = Some(resizes);
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
        let spec = exec_spec(config);
        // The guest refuses what breaks the protocol's rules; find out here,
        // before a VM starts, and name the setting. What is checked is what
        // the session will send: the image's Env, WorkingDir and User under
        // the run's own.
        HostMessage::Exec(config.exec_defaults.apply(&spec).request(1)).validate()?;

        let interrupts = self.interrupts;
        let session = match Session::boot(
            self.engine,
            self.network,
            config,
            self.progress,
            deadline,
            interrupts.as_ref(),
        ) {
            Ok(session) => session,
            Err(BootAbort::Deadline) => return Ok(bare(RunStatus::TimedOut)),
            Err(BootAbort::Interrupted(signal)) => return Ok(bare(RunStatus::Interrupted(signal))),
            Err(BootAbort::Failed(error)) => return Err(error),
        };
        if let Some(report) = self.on_published {
            let published = session.published();
            if !published.is_empty() {
                report(&published);
            }
        }
        let exec = session.exec(&spec)?;
        match &config.stdin {
            Stdin::Null => {}
            Stdin::Inherit => control::pump_stdin(std::io::stdin(), exec.stdin()),
            Stdin::Bytes(bytes) => {
                control::pump_stdin(std::io::Cursor::new(bytes.clone()), exec.stdin())
            }
        }

        let mut interrupted: Option<(i32, Instant)> = None;
        let status = loop {
            if let Some(signal) = interrupts.as_ref().and_then(|i| i.try_recv().ok()) {
                if interrupted.is_none() {
                    interrupted = Some((signal, Instant::now() + INTERRUPT_GRACE));
                    // A failed send means the channel is gone; the grace
                    // period still ends the run.
                    let _ = exec.signal(signal);
                }
            }
            if let Some(size) = self.resizes.as_ref().and_then(|r| r.try_iter().last()) {
                // Only a PTY command has a terminal to resize, and a lost
                // resize is harmless.
                if config.pty.is_some() {
                    let _ = exec.resize(size);
                }
            }
            if let Some((signal, until)) = interrupted {
                if Instant::now() >= until {
                    break RunStatus::Interrupted(signal);
                }
            }
            match exec.next_event_timeout(POLL) {
                Ok(Some(ExecEvent::Stdout(data))) => sink(OutputStream::Stdout, &data),
                Ok(Some(ExecEvent::Stderr(data))) => sink(OutputStream::Stderr, &data),
                Ok(Some(ExecEvent::Exit(status))) => match run_status(status) {
                    Ok(status) => break status,
                    Err(reason) => {
                        let console = session.final_console();
                        return Err(Error::BootFailed {
                            reason: format!("{reason} while the command ran"),
                            console,
                        });
                    }
                },
                Ok(None) | Err(()) => {}
            }
        };
        drop(exec);

        let denials = session.denials();
        // A finished command gets a clean power-off, so that writes to
        // writable disks and shares are flushed; anything else is killed.
        if matches!(status, RunStatus::TimedOut | RunStatus::Interrupted(_)) {
            session.kill();
        } else {
            session.stop();
        }
        tracing::debug!(elapsed = ?started.elapsed(), "run finished");
        Ok(RunOutput {
            denials,
            ..bare(status)
        })
    }
}

/// The one-shot run's status for its exec's; `Err` with the reason when the
/// session ended under the command in a way that is vmette's failure.
fn run_status(status: ExecStatus) -> Result<RunStatus, EndReason> {
    Ok(match status {
        ExecStatus::Exited(code) => RunStatus::Exited(code),
        ExecStatus::Signaled(signal) => RunStatus::Signaled(signal),
        ExecStatus::TimedOut | ExecStatus::SessionEnded(EndReason::SessionTimeout) => {
            RunStatus::TimedOut
        }
        ExecStatus::NotStarted { code, message } => RunStatus::NotStarted { code, message },
        ExecStatus::SessionEnded(reason) => return Err(reason),
    })
}

/// The exec of a one-shot run.
fn exec_spec(config: &Config) -> ExecSpec {
    ExecSpec {
        argv: config.command.clone(),
        env: config.env.clone(),
        workdir: config.workdir.clone(),
        user: config.user.clone(),
        stdin: config.stdin != Stdin::Null,
        pty: config.pty,
        timeout: None,
    }
}

fn bare(status: RunStatus) -> RunOutput {
    RunOutput {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        denials: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

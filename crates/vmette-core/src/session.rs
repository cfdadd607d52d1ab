//! Sessions: a VM whose guest agent stays up and serves many execs.
//!
//! [`Session::start`] boots the machine and waits for the agent. From then
//! on one *monitor* thread owns the VM: it routes every validated guest
//! message to the exec it names, enforces the session-wide and idle
//! timeouts and each exec's timeout, notices when the VM stops, and carries
//! out stop requests. Callers hold [`Exec`] handles and never block the
//! monitor: each exec's output sits in its own queue, which the guest can
//! fill only as far as the host has granted credit
//! ([`vmette_proto::OUTPUT_WINDOW`] per stream). Credit goes back as the
//! handle's owner takes the data, so a reader that is slow, or gone, stalls
//! its own exec and nothing else.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmette_assets::Progress;
use vmette_proto::{
    ExecId, ExecRequest, FileError, FileReply, GuestMessage, HostMessage, OutputStream, PtySize,
    MAX_CHUNK_LEN, OUTPUT_WINDOW, PROTOCOL_VERSION,
};

use crate::control::{self, ControlSender, Event, Reserved, StdinWindow};
use crate::engine::Vm;
use crate::image::ExecDefaults;
use crate::network::{
    DenialCounts, NetworkAttachment, NetworkProvider, PortMapping, PublishedPort,
};
use crate::process::Watchdog;
use crate::{boot, Config, Engine, Error};

/// How long the guest may take from machine start to `Ready` when no
/// earlier deadline applies. Generous: emulated boots of a loaded host are
/// slow.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a graceful stop lets the guest flush its file systems and power
/// off by itself before the VM is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How often the monitor looks at the VM and the clocks.
const TICK: Duration = Duration::from_millis(50);

/// How long an exec that outlived its timeout gets, after `SIGKILL`, for
/// the guest to report its end before the host reports it anyway.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// How long a file operation may go without a byte moving or an answer
/// before the host gives up on it (the guest may be stuck on a fifo, or
/// hostile). Generous: removing a large tree under emulation is slow.
pub const FILE_STALL_LIMIT: Duration = Duration::from_secs(120);

/// Credit goes back to the guest in batches of at least this many bytes,
/// or sooner once the consumer has caught up.
const CREDIT_BATCH: usize = OUTPUT_WINDOW / 4;

/// One command to run in a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments; the program is looked up in the guest's `PATH`.
    pub argv: Vec<String>,
    /// Environment variables, over the guest's defaults. Nothing of the
    /// host's environment passes unless it is here.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest; the image's, else `/`, when `None`.
    pub workdir: Option<String>,
    /// Who runs the command (`name`, `uid`, `name:group`, `uid:gid`); the
    /// image's user, else root, when `None`.
    pub user: Option<String>,
    /// Give the command a stdin pipe to write to ([`Exec::write_stdin`]);
    /// otherwise it reads `/dev/null`. A PTY exec always reads its terminal.
    pub stdin: bool,
    /// Run the command on a PTY of this size: one output stream
    /// ([`ExecEvent::Stdout`]), `TERM` set, Ctrl-C and friends handled by
    /// the guest's terminal.
    pub pty: Option<PtySize>,
    /// Kill the command (`SIGKILL` to its process group) after this long;
    /// it then ends with [`ExecStatus::TimedOut`] and the session goes on.
    pub timeout: Option<Duration>,
}

impl ExecSpec {
    /// A spec that runs `argv` with no stdin, no PTY and no timeout.
    pub fn new<I, S>(argv: I) -> ExecSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            workdir: None,
            user: None,
            stdin: false,
            pty: None,
            timeout: None,
        }
    }

    pub(crate) fn request(&self, id: ExecId) -> ExecRequest {
        ExecRequest {
            id,
            argv: self.argv.clone(),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            stdin: self.stdin || self.pty.is_some(),
            pty: self.pty,
            user: self.user.clone(),
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// [`Session::stop`] or a [`StopHandle`] ended it.
    Stopped,
    /// The guest powered the machine off by itself.
    PoweredOff,
    /// The machine stopped without the guest powering it off (the
    /// hypervisor died or was killed).
    Crashed,
    /// [`Config::timeout`] ran out.
    SessionTimeout,
    /// No exec ran for [`Config::idle_timeout`].
    IdleTimeout,
    /// The guest agent broke the protocol; the VM was killed.
    ProtocolError(String),
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::Stopped => write!(f, "the session was stopped"),
            EndReason::PoweredOff => write!(f, "the guest powered off"),
            EndReason::Crashed => write!(f, "the VM stopped unexpectedly"),
            EndReason::SessionTimeout => write!(f, "the session's timeout ran out"),
            EndReason::IdleTimeout => write!(f, "the session was idle for too long"),
            EndReason::ProtocolError(reason) => {
                write!(f, "the guest agent broke the protocol: {reason}")
            }
        }
    }
}

/// How an exec ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecStatus {
    /// The command exited with this code.
    Exited(i32),
    /// The command was killed by this signal.
    Signaled(i32),
    /// [`ExecSpec::timeout`] ran out; the command was killed.
    TimedOut,
    /// The guest could not start the command.
    NotStarted {
        /// The shell's code for the failure: 127 not found, 126 not
        /// executable, 125 refused.
        code: i32,
        /// Why, one sentence.
        message: String,
    },
    /// The session ended before the command did.
    SessionEnded(EndReason),
}

impl ExecStatus {
    /// The exit code a shell would report: the command's code, 128 + N for
    /// signal N, 124 for a timeout, 126/127 when it could not start, 125
    /// when the session ended under it.
    pub fn shell_code(&self) -> i32 {
        match self {
            ExecStatus::Exited(code) => *code,
            ExecStatus::Signaled(signal) => 128 + signal,
            ExecStatus::TimedOut => 124,
            ExecStatus::NotStarted { code, .. } => *code,
            ExecStatus::SessionEnded(_) => 125,
        }
    }
}

/// What an exec produced, in order. [`ExecEvent::Exit`] is always last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// A chunk of stdout (of the terminal, for a PTY exec).
    Stdout(Vec<u8>),
    /// A chunk of stderr.
    Stderr(Vec<u8>),
    /// The exec ended.
    Exit(ExecStatus),
}

impl ExecEvent {
    /// Which stream an output event came from, and how many bytes it holds.
    fn output(&self) -> Option<(OutputStream, usize)> {
        match self {
            ExecEvent::Stdout(data) => Some((OutputStream::Stdout, data.len())),
            ExecEvent::Stderr(data) => Some((OutputStream::Stderr, data.len())),
            ExecEvent::Exit(_) => None,
        }
    }
}

/// A running VM whose agent serves execs until the session ends.
///
/// Dropping a session that has not ended stops it: gracefully, then by
/// force after [`STOP_GRACE`].
pub struct Session {
    shared: Arc<Shared>,
    transfer_limit: u64,
    exec_defaults: ExecDefaults,
    monitor: Option<JoinHandle<()>>,
    // Released after the monitor, which owns the VM, has ended; the
    // watchdog last, since it guards both.
    network: Option<Arc<dyn NetworkAttachment>>,
    run_dir: Option<tempfile::TempDir>,
    watchdog: Option<Watchdog>,
    // The root's lease, held until the VM that reads the root is gone.
    _image_lease: Option<crate::ImageLease>,
}

/// Stops a session from any thread.
#[derive(Clone)]
pub struct StopHandle {
    shared: Arc<Shared>,
}

/// One exec of a session: its output, its stdin, its status.
///
/// Dropping the handle does not stop the command; its output is then
/// discarded as it comes.
pub struct Exec {
    state: Arc<ExecState>,
    sender: ControlSender,
    shared: Arc<Shared>,
}

/// Writes to an exec's stdin from any thread; cheap to clone.
#[derive(Clone)]
pub struct ExecStdin {
    id: ExecId,
    window: Arc<StdinWindow>,
    sender: ControlSender,
}

struct Shared {
    sender: ControlSender,
    /// Wakes the monitor from its wait for guest messages.
    wake: mpsc::SyncSender<Event>,
    execs: Mutex<ExecTable>,
    next_id: AtomicU32,
    control: Mutex<Lifecycle>,
    changed: Condvar,
}

/// The running execs. `closed` is set, under the same lock, when the
/// monitor finishes them all at the session's end, so no exec can slip in
/// afterwards and wait for ever.
#[derive(Default)]
struct ExecTable {
    running: HashMap<ExecId, Arc<ExecState>>,
    closed: bool,
}

struct Lifecycle {
    stop: Option<StopKind>,
    end: Option<EndReason>,
    /// The guest console's last lines, kept when the session ends.
    console: String,
    last_activity: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopKind {
    /// Power off cleanly, then kill after [`STOP_GRACE`].
    Graceful,
    /// Kill at once.
    Now,
}

/// What kind of operation an [`ExecState`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// A command.
    Exec,
    /// A file operation; `output` when the guest may send data for it.
    File { output: bool },
}

struct ExecState {
    id: ExecId,
    kind: OpKind,
    pty: bool,
    deadline: Option<Instant>,
    window: Arc<StdinWindow>,
    queue: Mutex<ExecQueue>,
    ready: Condvar,
}

#[derive(Default)]
struct ExecQueue {
    events: VecDeque<ExecEvent>,
    /// Bytes of each stream received but not yet credited back.
    owed: [usize; 2],
    /// Bytes of each stream consumed but not yet credited back.
    consumed: [usize; 2],
    /// The exit event has been queued; nothing follows it.
    finished: bool,
    /// The exit event has been handed out.
    delivered: bool,
    /// The handle is gone: output is discarded and credited on arrival.
    detached: bool,
    /// When the host killed the command for its timeout.
    killed_at: Option<Instant>,
    /// How a file operation ended, once it has.
    file_result: Option<Result<FileReply, FileError>>,
    /// When data last moved either way, or the operation began.
    progress: Option<Instant>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn stream_index(stream: OutputStream) -> usize {
    match stream {
        OutputStream::Stdout => 0,
        OutputStream::Stderr => 1,
    }
}

/// How [`Session::boot`] can be cut short, for the one-shot run.
pub(crate) enum BootAbort {
    /// The caller's deadline passed.
    Deadline,
    /// The caller was interrupted with this signal.
    Interrupted(i32),
    /// Anything else.
    Failed(Error),
}

impl From<Error> for BootAbort {
    fn from(error: Error) -> BootAbort {
        BootAbort::Failed(error)
    }
}

impl Session {
    /// Boots a VM for `config` on `engine` and waits until its agent is
    /// ready to run commands. `config`'s command fields are not used: a
    /// session's commands come as [`ExecSpec`]s.
    pub fn start(
        engine: &dyn Engine,
        config: &Config,
        progress: &dyn Progress,
    ) -> Result<Session, Error> {
        Session::start_with(engine, None, config, progress)
    }

    /// Boots a VM for `config` as [`Session::start`] does, attached to
    /// `network` when the config asks for a network.
    pub fn start_with(
        engine: &dyn Engine,
        network: Option<&dyn NetworkProvider>,
        config: &Config,
        progress: &dyn Progress,
    ) -> Result<Session, Error> {
        match Session::boot(engine, network, config, progress, None, None) {
            Ok(session) => Ok(session),
            Err(BootAbort::Failed(error)) => Err(error),
            // Given no deadline and no interrupts, a boot only succeeds or
            // fails; these cannot come.
            Err(BootAbort::Deadline | BootAbort::Interrupted(_)) => Err(Error::BootFailed {
                reason: "the boot was cut short".into(),
                console: String::new(),
            }),
        }
    }

    pub(crate) fn boot(
        engine: &dyn Engine,
        network: Option<&dyn NetworkProvider>,
        config: &Config,
        progress: &dyn Progress,
        deadline: Option<Instant>,
        interrupts: Option<&Receiver<i32>>,
    ) -> Result<Session, BootAbort> {
        let started = Instant::now();
        config.validate_machine()?;
        let files = boot::prepare(config, engine.guest_modules(), progress)?;
        let run_dir = tempfile::Builder::new()
            .prefix("vmette-")
            .tempdir()
            .map_err(Error::io("cannot create the run directory"))?;
        let watchdog =
            Watchdog::spawn(run_dir.path()).map_err(Error::io("cannot start the watchdog"))?;
        // Before the VM: a published port already in use fails the boot
        // here, with nothing started.
        let network = match (config.nat(), network) {
            (None, _) => None,
            (Some(nat), Some(provider)) => Some(provider.attach(nat).map_err(Error::Network)?),
            (Some(_), None) => {
                return Err(Error::InvalidConfig {
                    field: "network",
                    reason: "no network stack was given to this session".into(),
                }
                .into())
            }
        };
        let (spec, envelope) = boot::layout(config, &files, network.as_deref(), run_dir.path())?;
        // The guest refuses what breaks the protocol's rules; find out here,
        // before a VM starts, and name the setting.
        HostMessage::Boot(envelope.clone())
            .validate()
            .map_err(Error::from)?;

        let (events_tx, events) = mpsc::sync_channel(control::EVENT_QUEUE);
        let mut vm = engine.start(&spec, &watchdog).map_err(Error::from)?;
        tracing::info!(accelerator = %vm.accelerator(), "VM started");
        let boot_deadline =
            deadline.map_or(started + BOOT_TIMEOUT, |d| d.min(started + BOOT_TIMEOUT));
        let stream = vm
            .connect_control(boot_deadline)
            .map_err(Error::StartFailed)?;
        let wake = events_tx.clone();
        let sender = control::start(stream, events_tx)?;
        let boot_failed = |vm: &dyn Vm, reason: String| {
            BootAbort::Failed(Error::BootFailed {
                reason,
                console: vm.console_tail(),
            })
        };

        // Hello, then the envelope, then Ready.
        let mut greeted = false;
        loop {
            if let Some(signal) = interrupts.and_then(|i| i.try_recv().ok()) {
                vm.kill();
                return Err(BootAbort::Interrupted(signal));
            }
            let now = Instant::now();
            if now >= boot_deadline {
                vm.kill();
                if deadline.is_some_and(|d| now >= d) {
                    return Err(BootAbort::Deadline);
                }
                return Err(boot_failed(
                    &*vm,
                    format!("the guest agent was not ready within {BOOT_TIMEOUT:?}"),
                ));
            }
            let event = match events.recv_timeout(TICK.min(boot_deadline - now)) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) if vm.has_exited() => {
                    return Err(boot_failed(
                        &*vm,
                        "the VM stopped before the guest agent was ready".into(),
                    ));
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => Event::Closed(None),
            };
            match event {
                Event::Guest(GuestMessage::Hello {
                    version,
                    agent_version,
                }) => {
                    if greeted {
                        vm.kill();
                        return Err(Error::Protocol("the guest said hello twice".into()).into());
                    }
                    greeted = true;
                    if version != PROTOCOL_VERSION {
                        vm.kill();
                        return Err(Error::Protocol(format!(
                            "the guest agent {agent_version} speaks protocol {version}, this host speaks {PROTOCOL_VERSION}; rebuild the initramfs with this vmette"
                        ))
                        .into());
                    }
                    sender.send(HostMessage::Boot(envelope.clone()))?;
                }
                Event::Guest(GuestMessage::Ready) => break,
                // No one can ask a session to stop before it exists.
                Event::Wake => {}
                Event::Guest(GuestMessage::BootFailed { message }) => {
                    // Let the guest's last console lines arrive.
                    vm.wait_exit(Duration::from_millis(500));
                    return Err(boot_failed(&*vm, message));
                }
                Event::Guest(other) => {
                    vm.kill();
                    return Err(Error::Protocol(format!("unexpected {other:?} during boot")).into());
                }
                Event::Invalid(reason) => {
                    vm.kill();
                    return Err(Error::Protocol(reason).into());
                }
                Event::Closed(_) => {
                    vm.wait_exit(Duration::from_millis(500));
                    return Err(boot_failed(
                        &*vm,
                        "the VM stopped before the guest agent was ready".into(),
                    ));
                }
            }
        }
        tracing::debug!(elapsed = ?started.elapsed(), "guest ready");

        let shared = Arc::new(Shared {
            sender,
            wake,
            execs: Mutex::new(ExecTable::default()),
            next_id: AtomicU32::new(1),
            control: Mutex::new(Lifecycle {
                stop: None,
                end: None,
                console: String::new(),
                last_activity: Instant::now(),
            }),
            changed: Condvar::new(),
        });
        // A session's own timeout counts from when it is ready: a caller
        // asking for a minute of sandbox gets a minute to use. (A run's
        // timeout, `deadline`, covers its boot too.)
        let session_deadline = config.timeout.and_then(|t| Instant::now().checked_add(t));
        let monitor = Monitor {
            shared: Arc::clone(&shared),
            vm,
            events,
            deadline: session_deadline,
            idle_timeout: config.idle_timeout,
        };
        let monitor = thread::Builder::new()
            .name("vmette-session".into())
            .spawn(move || monitor.run())
            .map_err(Error::io("cannot start the session monitor"))?;
        Ok(Session {
            shared,
            transfer_limit: config.transfer_limit,
            exec_defaults: config.exec_defaults.clone(),
            monitor: Some(monitor),
            network,
            run_dir: Some(run_dir),
            watchdog: Some(watchdog),
            _image_lease: config.image_lease.clone(),
        })
    }

    /// Publishes a guest TCP port on the host while the session runs.
    pub fn publish(&self, mapping: PortMapping) -> Result<PublishedPort, Error> {
        let network = self.network.as_ref().ok_or_else(|| Error::InvalidConfig {
            field: "publish",
            reason:
                "the session has no network device; start it with a published port or a network"
                    .into(),
        })?;
        network.publish(mapping).map_err(Error::Network)
    }

    /// Stops publishing the port listening on `host` and closes its
    /// connections; `false` when none listens there.
    pub fn unpublish(&self, host: SocketAddr) -> bool {
        self.network.as_ref().is_some_and(|n| n.unpublish(host))
    }

    /// The ports the session publishes now.
    pub fn published(&self) -> Vec<PublishedPort> {
        self.network
            .as_ref()
            .map(|n| n.published())
            .unwrap_or_default()
    }

    /// What the network stack refused the guest so far; `None` without a
    /// network.
    pub fn denials(&self) -> Option<DenialCounts> {
        self.network.as_ref().map(|n| n.denials())
    }

    /// Starts a command. Many may run at once.
    pub fn exec(&self, spec: &ExecSpec) -> Result<Exec, Error> {
        // A timeout too long to represent is no timeout.
        let deadline = spec.timeout.and_then(|t| Instant::now().checked_add(t));
        let spec = self.exec_defaults.apply(spec);
        self.open(OpKind::Exec, spec.pty.is_some(), deadline, |id| {
            HostMessage::Exec(spec.request(id))
        })
    }

    /// Starts an operation with a fresh id: an exec, or a file operation
    /// (which uses the same queue, stdin window and credit).
    pub(crate) fn open(
        &self,
        kind: OpKind,
        pty: bool,
        deadline: Option<Instant>,
        message: impl FnOnce(ExecId) -> HostMessage,
    ) -> Result<Exec, Error> {
        if let Some(reason) = self.end_reason() {
            return Err(Error::SessionEnded(reason));
        }
        let id = self.shared.next_id();
        let request = message(id);
        request.validate()?;
        // What cannot be one frame would break the channel for everyone.
        if let Err(error) = vmette_proto::write_frame(&mut Vec::new(), &request) {
            return Err(Error::InvalidConfig {
                field: "request",
                reason: error.to_string(),
            });
        }
        let state = Arc::new(ExecState {
            id,
            kind,
            pty,
            deadline,
            window: Arc::new(StdinWindow::default()),
            queue: Mutex::new(ExecQueue {
                progress: Some(Instant::now()),
                ..ExecQueue::default()
            }),
            ready: Condvar::new(),
        });
        {
            let mut table = lock(&self.shared.execs);
            if table.closed {
                drop(table);
                let reason = self.end_reason().unwrap_or(EndReason::Crashed);
                return Err(Error::SessionEnded(reason));
            }
            table.running.insert(id, Arc::clone(&state));
        }
        self.shared.touch();
        if let Err(error) = self.shared.sender.send(request) {
            lock(&self.shared.execs).running.remove(&id);
            return Err(error);
        }
        Ok(Exec {
            state,
            sender: self.shared.sender.clone(),
            shared: Arc::clone(&self.shared),
        })
    }

    /// The most bytes one file transfer may move ([`Config::transfer_limit`]).
    pub fn transfer_limit(&self) -> u64 {
        self.transfer_limit
    }

    /// A handle that stops this session from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stops the session: the guest powers off cleanly (flushing writable
    /// disks and shares), or is killed after [`STOP_GRACE`]. Returns why the
    /// session ended, which is not [`EndReason::Stopped`] if it had already
    /// ended otherwise.
    pub fn stop(mut self) -> EndReason {
        self.shared.request_stop(StopKind::Graceful);
        self.finish()
    }

    /// Kills the VM at once, with no chance to flush: for a session whose
    /// work was abandoned (a timeout, an interrupt).
    pub fn kill(mut self) -> EndReason {
        self.shared.request_stop(StopKind::Now);
        self.finish()
    }

    /// The end of the guest's console when the session ended, for reports
    /// of a VM that stopped unexpectedly; empty while it runs.
    pub fn final_console(&self) -> String {
        lock(&self.shared.control).console.clone()
    }

    /// Why the session ended, or `None` while it runs.
    pub fn end_reason(&self) -> Option<EndReason> {
        lock(&self.shared.control).end.clone()
    }

    /// Waits until the session ends by itself or is stopped, or `timeout`
    /// passes; the reason, or `None` on timeout.
    pub fn wait_end(&self, timeout: Duration) -> Option<EndReason> {
        self.shared.wait_end(Instant::now().checked_add(timeout))
    }

    fn finish(&mut self) -> EndReason {
        if let Some(monitor) = self.monitor.take() {
            let _ = monitor.join();
        }
        drop(self.run_dir.take());
        drop(self.watchdog.take());
        self.end_reason().unwrap_or(EndReason::Crashed)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.monitor.is_some() {
            self.shared.request_stop(StopKind::Graceful);
            self.finish();
        }
    }
}

impl StopHandle {
    /// Asks the session to stop, as [`Session::stop`] does, without waiting.
    pub fn stop(&self) {
        self.shared.request_stop(StopKind::Graceful);
    }

    /// Why the session ended, or `None` while it runs.
    pub fn end_reason(&self) -> Option<EndReason> {
        lock(&self.shared.control).end.clone()
    }
}

impl Shared {
    /// A fresh exec id: ids wrap after 2^32 execs, so one still in use is
    /// skipped rather than reused.
    fn next_id(&self) -> ExecId {
        let table = lock(&self.execs);
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !table.running.contains_key(&id) {
                return id;
            }
        }
    }

    fn touch(&self) {
        lock(&self.control).last_activity = Instant::now();
    }

    fn request_stop(&self, kind: StopKind) {
        let mut control = lock(&self.control);
        // A kill overrides a graceful stop still in progress, not the other
        // way round.
        if control.stop != Some(StopKind::Now) {
            control.stop = Some(kind);
        }
        self.changed.notify_all();
        // A full queue means the monitor is busy and looks soon anyway.
        let _ = self.wake.try_send(Event::Wake);
    }

    /// Waits for the end until `until`; `None` waits as long as it takes.
    fn wait_end(&self, until: Option<Instant>) -> Option<EndReason> {
        let mut control = lock(&self.control);
        loop {
            if let Some(end) = &control.end {
                return Some(end.clone());
            }
            control = match until {
                None => self
                    .changed
                    .wait(control)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(until) => {
                    let now = Instant::now();
                    if now >= until {
                        return None;
                    }
                    self.changed
                        .wait_timeout(control, until - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

impl Exec {
    /// The exec's id within its session.
    pub fn id(&self) -> u32 {
        self.state.id
    }

    /// The next event, waiting as long as it takes; `None` after
    /// [`ExecEvent::Exit`] was handed out.
    pub fn next_event(&self) -> Option<ExecEvent> {
        self.next_event_until(None).ok().flatten()
    }

    /// The next event, waiting until `deadline` at most; `Err(())` when it
    /// passed first, `Ok(None)` after [`ExecEvent::Exit`] was handed out.
    #[allow(clippy::result_unit_err)]
    pub fn next_event_timeout(&self, timeout: Duration) -> Result<Option<ExecEvent>, ()> {
        self.next_event_until(Instant::now().checked_add(timeout))
    }

    fn next_event_until(&self, deadline: Option<Instant>) -> Result<Option<ExecEvent>, ()> {
        let mut queue = lock(&self.state.queue);
        loop {
            if let Some(event) = queue.events.pop_front() {
                if let Some((stream, bytes)) = event.output() {
                    let caught_up = queue.events.is_empty();
                    queue.consumed(stream, bytes, caught_up, self.state.id, &self.sender);
                }
                if matches!(event, ExecEvent::Exit(_)) {
                    queue.delivered = true;
                }
                return Ok(Some(event));
            }
            if queue.delivered {
                return Ok(None);
            }
            queue = match deadline {
                None => self
                    .state
                    .ready
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(());
                    }
                    self.state
                        .ready
                        .wait_timeout(queue, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Writes `data` to the command's stdin, waiting while the guest has
    /// too much of it unread. Fails once the exec has ended.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), Error> {
        self.stdin().write_all(data)
    }

    /// Ends the command's stdin (for a PTY exec: sends the terminal's
    /// end-of-file character).
    pub fn close_stdin(&self) -> Result<(), Error> {
        self.stdin().close()
    }

    /// A writer for the command's stdin that other threads can own.
    pub fn stdin(&self) -> ExecStdin {
        ExecStdin {
            id: self.state.id,
            window: Arc::clone(&self.state.window),
            sender: self.sender.clone(),
        }
    }

    /// Sends `signal` (1 to 31) to the command's process group.
    pub fn signal(&self, signal: i32) -> Result<(), Error> {
        let message = HostMessage::Signal {
            id: self.state.id,
            signal,
        };
        message.validate()?;
        self.sender.send(message)
    }

    /// Changes the size of a PTY exec's terminal; the command gets SIGWINCH.
    pub fn resize(&self, size: PtySize) -> Result<(), Error> {
        if !self.state.pty {
            return Err(Error::InvalidConfig {
                field: "pty",
                reason: "this exec has no terminal to resize".into(),
            });
        }
        let message = HostMessage::Resize {
            id: self.state.id,
            size,
        };
        message.validate()?;
        self.sender.send(message)
    }

    /// Waits for the end, discarding output not yet taken.
    pub fn wait(self) -> ExecStatus {
        loop {
            match self.next_event() {
                Some(ExecEvent::Exit(status)) => return status,
                Some(_) => {}
                None => return ExecStatus::SessionEnded(EndReason::Crashed),
            }
        }
    }

    /// Waits for the end and returns what the command wrote, each stream
    /// kept up to `limit` bytes (the rest is read and dropped).
    pub fn output(self, limit: usize) -> ExecOutput {
        let mut stdout = Capture::new(limit);
        let mut stderr = Capture::new(limit);
        let status = loop {
            match self.next_event() {
                Some(ExecEvent::Stdout(data)) => stdout.push(&data),
                Some(ExecEvent::Stderr(data)) => stderr.push(&data),
                Some(ExecEvent::Exit(status)) => break status,
                None => break ExecStatus::SessionEnded(EndReason::Crashed),
            }
        };
        ExecOutput {
            status,
            stdout: stdout.bytes,
            stderr: stderr.bytes,
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
        }
    }
}

impl Exec {
    /// How a file operation ended: its reply, once its end was handed out.
    pub(crate) fn file_result(&self) -> Option<Result<FileReply, FileError>> {
        lock(&self.state.queue).file_result.take()
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        // An abandoned file operation is over for the host: whatever the
        // guest still sends for it is ignored, and it holds up nothing.
        if matches!(self.state.kind, OpKind::File { .. }) {
            lock(&self.shared.execs).running.remove(&self.state.id);
        }
        let mut queue = lock(&self.state.queue);
        queue.detached = true;
        while let Some(event) = queue.events.pop_front() {
            if let Some((stream, bytes)) = event.output() {
                queue.consumed(stream, bytes, true, self.state.id, &self.sender);
            }
        }
    }
}

/// What an exec wrote, captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// How it ended.
    pub status: ExecStatus,
    /// Captured stdout.
    pub stdout: Vec<u8>,
    /// Captured stderr.
    pub stderr: Vec<u8>,
    /// Stdout went past the limit and was cut.
    pub stdout_truncated: bool,
    /// Stderr went past the limit and was cut.
    pub stderr_truncated: bool,
}

/// A capped capture buffer.
pub(crate) struct Capture {
    pub(crate) bytes: Vec<u8>,
    limit: usize,
    pub(crate) truncated: bool,
}

impl Capture {
    pub(crate) fn new(limit: usize) -> Capture {
        Capture {
            bytes: Vec::new(),
            limit,
            truncated: false,
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }
}

impl ExecStdin {
    /// Writes all of `data`, in chunks, each once the guest has room.
    pub fn write_all(&self, data: &[u8]) -> Result<(), Error> {
        self.write_all_within(data, None)
    }

    /// Writes all of `data` unless the command leaves its stdin unread for
    /// `patience`: then [`Error::StdinFull`], with what fitted sent.
    pub fn write_all_within(&self, data: &[u8], patience: Option<Duration>) -> Result<(), Error> {
        for chunk in data.chunks(MAX_CHUNK_LEN) {
            let deadline = patience.and_then(|p| Instant::now().checked_add(p));
            match self.window.reserve(chunk.len(), deadline) {
                Reserved::Granted => {}
                Reserved::Closed => return Err(Error::ExecEnded),
                Reserved::TimedOut => return Err(Error::StdinFull(patience.unwrap_or_default())),
            }
            self.sender.send(HostMessage::Stdin {
                id: self.id,
                data: chunk.to_vec(),
            })?;
        }
        Ok(())
    }

    /// Ends the command's input.
    pub fn close(&self) -> Result<(), Error> {
        self.sender.send(HostMessage::StdinEof { id: self.id })
    }
}

impl io::Write for ExecStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(MAX_CHUNK_LEN);
        self.write_all(&buf[..n])
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ExecQueue {
    /// The consumer took `bytes` of `stream`: credit them back in batches,
    /// and all at once when it has caught up, so a waiting guest always
    /// gets room.
    fn consumed(
        &mut self,
        stream: OutputStream,
        bytes: usize,
        caught_up: bool,
        id: ExecId,
        sender: &ControlSender,
    ) {
        let i = stream_index(stream);
        self.consumed[i] += bytes;
        if self.consumed[i] >= CREDIT_BATCH || (caught_up && self.consumed[i] > 0) {
            let credit = self.consumed[i];
            self.consumed[i] = 0;
            self.owed[i] = self.owed[i].saturating_sub(credit);
            sender.credit(id, stream, credit);
        }
    }
}

impl ExecState {
    /// Queues output from the guest; `Err` when the guest sent beyond its
    /// credit, which only a broken or hostile guest does.
    fn push_output(
        &self,
        stream: OutputStream,
        data: Vec<u8>,
        sender: &ControlSender,
    ) -> Result<(), String> {
        if self.kind == (OpKind::File { output: false })
            || (self.pty && stream == OutputStream::Stderr)
        {
            return Err(format!("operation {} sent output it cannot have", self.id));
        }
        let mut queue = lock(&self.queue);
        queue.progress = Some(Instant::now());
        let i = stream_index(stream);
        queue.owed[i] += data.len();
        if queue.owed[i] > OUTPUT_WINDOW {
            return Err(format!(
                "exec {} sent more output than its credit allows",
                self.id
            ));
        }
        if queue.finished {
            return Err(format!("exec {} sent output after its exit", self.id));
        }
        if queue.detached {
            queue.consumed(stream, data.len(), true, self.id, sender);
            return Ok(());
        }
        queue.events.push_back(match stream {
            OutputStream::Stdout => ExecEvent::Stdout(data),
            OutputStream::Stderr => ExecEvent::Stderr(data),
        });
        self.ready.notify_all();
        Ok(())
    }

    fn finish_file(&self, result: Result<FileReply, FileError>) {
        lock(&self.queue).file_result = Some(result);
        self.finish(ExecStatus::Exited(0));
    }

    fn finish(&self, status: ExecStatus) {
        let mut queue = lock(&self.queue);
        if queue.finished {
            return;
        }
        let status = match status {
            ExecStatus::Exited(_) | ExecStatus::Signaled(_) | ExecStatus::NotStarted { .. }
                if queue.killed_at.is_some() =>
            {
                ExecStatus::TimedOut
            }
            other => other,
        };
        queue.finished = true;
        queue.events.push_back(ExecEvent::Exit(status));
        self.window.close();
        self.ready.notify_all();
    }
}

/// The thread that owns the VM while the session runs.
struct Monitor {
    shared: Arc<Shared>,
    vm: Box<dyn Vm>,
    events: Receiver<Event>,
    deadline: Option<Instant>,
    idle_timeout: Option<Duration>,
}

impl Monitor {
    fn run(mut self) {
        let reason = self.serve();
        if !self.vm.has_exited() {
            self.vm.kill();
        }
        // The reason is known before any exec hears of the end, so that a
        // caller told "the session ended" can ask why.
        let console = self.vm.console_tail();
        {
            let mut control = lock(&self.shared.control);
            control.console = console;
            control.end = Some(reason.clone());
        }
        let execs: Vec<_> = {
            let mut table = lock(&self.shared.execs);
            table.closed = true;
            table.running.drain().map(|(_, e)| e).collect()
        };
        for exec in execs {
            exec.finish(ExecStatus::SessionEnded(reason.clone()));
        }
        // The writer ends; stdin pumps still holding a sender fail at once.
        self.shared.sender.close();
        tracing::debug!(%reason, "session ended");
        self.shared.changed.notify_all();
    }

    fn serve(&mut self) -> EndReason {
        let mut checked = Instant::now();
        loop {
            match self.events.recv_timeout(TICK) {
                Ok(Event::Guest(message)) => {
                    if let Err(reason) = self.route(message) {
                        return EndReason::ProtocolError(reason);
                    }
                    if checked.elapsed() < TICK {
                        continue;
                    }
                }
                Ok(Event::Invalid(reason)) => return EndReason::ProtocolError(reason),
                Ok(Event::Wake) => {}
                Ok(Event::Closed(error)) => {
                    if let Some(error) = error {
                        tracing::debug!("the control channel failed: {error}");
                    }
                    return self.channel_end();
                }
                Err(RecvTimeoutError::Disconnected) => return self.channel_end(),
                Err(RecvTimeoutError::Timeout) => {}
            }
            if let Some(reason) = self.check() {
                return reason;
            }
            checked = Instant::now();
        }
    }

    /// The channel ends when the VM does; a channel that fails under a
    /// running VM leaves a session nobody can talk to, which is a crash.
    fn channel_end(&mut self) -> EndReason {
        self.vm.wait_exit(Duration::from_secs(2));
        self.vm_end()
    }

    fn vm_end(&mut self) -> EndReason {
        if self.vm.powered_off_by_guest() {
            EndReason::PoweredOff
        } else {
            EndReason::Crashed
        }
    }

    /// The clocks, the VM and stop requests, once per tick (and after
    /// bursts of messages, which a flood cannot postpone past a tick).
    fn check(&mut self) -> Option<EndReason> {
        let now = Instant::now();
        if self.vm.has_exited() {
            return Some(self.vm_end());
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Some(EndReason::SessionTimeout);
        }
        let (stop, idle_since) = {
            let control = lock(&self.shared.control);
            (control.stop, control.last_activity)
        };
        match stop {
            Some(StopKind::Now) => return Some(EndReason::Stopped),
            Some(StopKind::Graceful) => {
                if self.shared.sender.send(HostMessage::PowerOff).is_ok() {
                    // In ticks, so that a kill asked for meanwhile is not
                    // kept waiting for the grace period.
                    let until = now + STOP_GRACE;
                    while Instant::now() < until
                        && !self.vm.wait_exit(TICK)
                        && lock(&self.shared.control).stop == Some(StopKind::Graceful)
                    {
                    }
                }
                if !self.vm.has_exited() {
                    tracing::debug!("the guest did not power off in time; killing the VM");
                }
                return Some(EndReason::Stopped);
            }
            None => {}
        }
        let execs: Vec<_> = lock(&self.shared.execs).running.values().cloned().collect();
        if execs.is_empty() {
            if let Some(idle) = self.idle_timeout {
                if now.duration_since(idle_since) >= idle {
                    return Some(EndReason::IdleTimeout);
                }
            }
        }
        for exec in execs {
            if let OpKind::File { .. } = exec.kind {
                let progress = lock(&exec.queue).progress;
                if progress.is_some_and(|at| now.duration_since(at) >= FILE_STALL_LIMIT) {
                    lock(&self.shared.execs).running.remove(&exec.id);
                    exec.finish_file(Err(FileError {
                        kind: vmette_proto::FileErrorKind::TimedOut,
                        message: format!(
                            "the guest moved nothing for the file operation in {FILE_STALL_LIMIT:?}"
                        ),
                    }));
                    self.shared.touch();
                }
                continue;
            }
            let Some(deadline) = exec.deadline else {
                continue;
            };
            if now < deadline {
                continue;
            }
            let killed_at = lock(&exec.queue).killed_at;
            match killed_at {
                None => {
                    lock(&exec.queue).killed_at = Some(now);
                    let _ = self.shared.sender.send(HostMessage::Signal {
                        id: exec.id,
                        signal: libc::SIGKILL,
                    });
                }
                Some(at) if now.duration_since(at) >= KILL_GRACE => {
                    lock(&self.shared.execs).running.remove(&exec.id);
                    exec.finish(ExecStatus::TimedOut);
                    self.shared.touch();
                }
                Some(_) => {}
            }
        }
        None
    }

    fn route(&mut self, message: GuestMessage) -> Result<(), String> {
        let id = match &message {
            GuestMessage::Stdout { id, .. }
            | GuestMessage::Stderr { id, .. }
            | GuestMessage::StdinAck { id, .. }
            | GuestMessage::Exited { id, .. }
            | GuestMessage::ExecFailed { id, .. }
            | GuestMessage::FileDone { id, .. } => *id,
            other => return Err(format!("unexpected {other:?} after boot")),
        };
        let Some(exec) = lock(&self.shared.execs).running.get(&id).cloned() else {
            // An exec the host already gave up on (its timeout's grace
            // ran out) may still report; anything else names no exec.
            tracing::debug!(id, "message for an exec that is not running");
            return Ok(());
        };
        match message {
            GuestMessage::Stdout { data, .. } => {
                exec.push_output(OutputStream::Stdout, data, &self.shared.sender)
            }
            GuestMessage::Stderr { data, .. } => {
                exec.push_output(OutputStream::Stderr, data, &self.shared.sender)
            }
            GuestMessage::StdinAck { bytes, .. } => {
                lock(&exec.queue).progress = Some(Instant::now());
                if exec.window.release(bytes as usize) {
                    Ok(())
                } else {
                    Err("the guest acknowledged stdin it was never sent".into())
                }
            }
            GuestMessage::Exited { status, .. } => {
                lock(&self.shared.execs).running.remove(&id);
                exec.finish(match status {
                    vmette_proto::ExitStatus::Code(code) => ExecStatus::Exited(code),
                    vmette_proto::ExitStatus::Signal(signal) => ExecStatus::Signaled(signal),
                });
                self.shared.touch();
                Ok(())
            }
            GuestMessage::FileDone { result, .. } => {
                lock(&self.shared.execs).running.remove(&id);
                exec.finish_file(result);
                self.shared.touch();
                Ok(())
            }
            GuestMessage::ExecFailed { message, code, .. } => {
                lock(&self.shared.execs).running.remove(&id);
                exec.finish(ExecStatus::NotStarted { code, message });
                self.shared.touch();
                Ok(())
            }
            _ => Ok(()),
        }
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
    fn exec_status_codes_follow_the_shell_convention() {
        assert_eq!(ExecStatus::Exited(3).shell_code(), 3);
        assert_eq!(ExecStatus::Signaled(2).shell_code(), 130);
        assert_eq!(ExecStatus::TimedOut.shell_code(), 124);
        assert_eq!(
            ExecStatus::SessionEnded(EndReason::IdleTimeout).shell_code(),
            125
        );
    }
}

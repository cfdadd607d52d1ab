//! Running commands: one exec per request, many at once.
//!
//! As PID 1 the agent inherits every orphan in the VM, so a single reaper
//! thread waits for all children. It must not reap a child that
//! `std::process::Command::spawn` is still waiting on (spawn reaps a child
//! whose `exec` failed itself), so the reaper first *peeks* at an exited
//! child with `WNOWAIT`, then takes the table lock that every spawn holds,
//! and only then reaps. Each exec's status goes to its own finisher thread,
//! which sends `Exited` after the output threads have drained the pipes.
//!
//! Each output stream sends only as far as the host's credit goes
//! ([`vmette_proto::OUTPUT_WINDOW`]); a stream out of credit stops reading
//! its pipe, so the command blocks on a full pipe while every other exec
//! goes on. A PTY exec has one stream, the terminal's master side.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{setgid, setgroups, setsid, setuid, Gid, Pid, Uid};
use vmette_proto::{
    ExecId, ExecRequest, ExitStatus, GuestMessage, OutputStream, PtySize, MAX_CHUNK_LEN,
};

use crate::channel::Outbox;
use crate::credit::Credit;

/// How long the output pipes may stay silent, after the command exited,
/// before the exit status is sent anyway. A background process that keeps
/// them open must not hold the status back for ever; output still flowing
/// (a slow host draining a backlog) keeps the wait going.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// The longest the exit status waits for output after the command exited.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// The terminal type a PTY exec gets unless its request sets `TERM`.
const PTY_TERM: &str = "xterm-256color";

const DEFAULT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
];

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the output threads tell the finisher.
enum Drain {
    /// A chunk went out.
    Progress,
    /// The stream is out of credit: the host is slow, not the pipe silent,
    /// so the finisher waits without a deadline until `Progress`.
    Blocked,
    /// The pipe reached end-of-file.
    Done,
}

/// What the host can still do to a running exec.
struct Running {
    pgid: Pid,
    stdin: Option<mpsc::Sender<Option<Vec<u8>>>>,
    stdout_credit: Arc<Credit>,
    stderr_credit: Arc<Credit>,
    /// The PTY's master side, for window-size changes.
    pty: Option<Arc<OwnedFd>>,
}

impl Running {
    fn close_credit(&self) {
        self.stdout_credit.close();
        self.stderr_credit.close();
    }
}

/// All execs of this VM.
pub struct Execs {
    outbox: Outbox,
    running: Arc<Mutex<HashMap<ExecId, Running>>>,
    children: Arc<Children>,
}

/// Pids of exec'd commands, mapped to where their status goes.
struct Children {
    table: Mutex<HashMap<i32, mpsc::Sender<ExitStatus>>>,
    spawned: Condvar,
}

impl Execs {
    pub fn new(outbox: Outbox) -> Execs {
        let children = Arc::new(Children {
            table: Mutex::new(HashMap::new()),
            spawned: Condvar::new(),
        });
        let reaper = Arc::clone(&children);
        if let Err(e) = thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_forever(&reaper))
        {
            eprintln!("vmette-guest: cannot start the reaper: {e}");
        }
        Execs {
            outbox,
            running: Arc::new(Mutex::new(HashMap::new())),
            children,
        }
    }

    /// Starts `request`; failures are reported to the host as `ExecFailed`.
    pub fn start(&self, request: ExecRequest) {
        let id = request.id;
        if let Err((message, code)) = self.try_start(request) {
            self.outbox
                .send(GuestMessage::ExecFailed { id, message, code });
        }
    }

    fn try_start(&self, request: ExecRequest) -> Result<(), (String, i32)> {
        let id = request.id;
        if lock(&self.running).contains_key(&id) {
            return Err((format!("exec id {id} is already in use"), 125));
        }
        let mut command = Command::new(resolve(&request));
        command
            .arg0(&request.argv[0])
            .args(&request.argv[1..])
            .env_clear()
            .envs(DEFAULT_ENV.iter().copied())
            .current_dir(request.workdir.as_deref().unwrap_or("/"));
        let pty =
            match request.pty {
                Some(size) => {
                    if !request.env.iter().any(|(key, _)| key == "TERM") {
                        command.env("TERM", PTY_TERM);
                    }
                    Some(attach_pty(&mut command, size).map_err(|e| {
                        (format!("cannot open a terminal for the command: {e}"), 125)
                    })?)
                }
                None => {
                    command
                        .stdin(if request.stdin {
                            Stdio::piped()
                        } else {
                            Stdio::null()
                        })
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped());
                    // Its own process group, so that a signal from the host
                    // reaches everything it started. (Not a session of its
                    // own: without a terminal that changes nothing, and it
                    // would force fork over the cheaper posix_spawn.)
                    command.process_group(0);
                    None
                }
            };
        if let Some(user) = &request.user {
            let credentials = crate::user::lookup(user).map_err(|e| (e, 125))?;
            if !request.env.iter().any(|(key, _)| key == "HOME") {
                command.env("HOME", &credentials.home);
            }
            run_as(&mut command, credentials);
        }
        command.envs(request.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &request.workdir {
            // As `docker run` does, a working directory the image or the
            // caller names is made if the root lacks it.
            if !std::path::Path::new(dir).exists() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| (format!("cannot create working directory {dir}: {e}"), 125))?;
            }
        }

        let (status_tx, status_rx) = mpsc::channel();
        let mut child = {
            let mut table = lock(&self.children.table);
            let child = command.spawn().map_err(|e| spawn_failure(&request, &e))?;
            table.insert(child.id() as i32, status_tx);
            self.children.spawned.notify_one();
            child
        };
        // The command holds the PTY's slave side; ours must close, or the
        // master never sees the end of the terminal.
        drop(command);
        let pid = Pid::from_raw(child.id() as i32);
        let stdout_credit = Credit::new();
        let stderr_credit = Credit::new();

        let (done_tx, done_rx) = mpsc::channel();
        let mut streams = 0;
        let mut output = |stream: OutputStream, source: Box<dyn Read + Send>| {
            let outbox = self.outbox.clone();
            let done = done_tx.clone();
            let credit = Arc::clone(match stream {
                OutputStream::Stdout => &stdout_credit,
                OutputStream::Stderr => &stderr_credit,
            });
            streams += 1;
            spawn_named("output", move || {
                pump_output(source, id, stream, &credit, &outbox, &done);
                let _ = done.send(Drain::Done);
            });
        };
        let stdin_sink: Option<(Box<dyn Write + Send>, bool)> = match &pty {
            Some(master) => {
                let reader = File::from(master.try_clone().map_err(|e| io_failure(&e))?);
                output(OutputStream::Stdout, Box::new(reader));
                let writer = File::from(master.try_clone().map_err(|e| io_failure(&e))?);
                Some((Box::new(writer), true))
            }
            None => {
                if let Some(stdout) = child.stdout.take() {
                    output(OutputStream::Stdout, Box::new(stdout));
                }
                if let Some(stderr) = child.stderr.take() {
                    output(OutputStream::Stderr, Box::new(stderr));
                }
                child
                    .stdin
                    .take()
                    .map(|pipe| (Box::new(pipe) as Box<dyn Write + Send>, false))
            }
        };
        drop(done_tx);
        let stdin = stdin_sink.map(|(sink, terminal)| {
            let (tx, rx) = mpsc::channel();
            let outbox = self.outbox.clone();
            spawn_named("stdin", move || {
                pump_stdin(id, sink, terminal, &rx, &outbox)
            });
            tx
        });
        lock(&self.running).insert(
            id,
            Running {
                pgid: pid,
                stdin,
                stdout_credit,
                stderr_credit,
                pty: pty.map(Arc::new),
            },
        );

        let outbox = self.outbox.clone();
        let running = Arc::clone(&self.running);
        spawn_named("finisher", move || {
            let status = status_rx.recv().unwrap_or(ExitStatus::Code(255));
            wait_for_output(&done_rx, streams);
            if let Some(done) = lock(&running).remove(&id) {
                // Output a background process writes after this is dropped:
                // the exec is over for the host.
                done.close_credit();
            }
            outbox.send(GuestMessage::Exited { id, status });
        });
        Ok(())
    }

    /// The host granted more output credit.
    pub fn credit(&self, id: ExecId, stream: OutputStream, bytes: u32) {
        if let Some(running) = lock(&self.running).get(&id) {
            match stream {
                OutputStream::Stdout => running.stdout_credit.grant(bytes as usize),
                OutputStream::Stderr => running.stderr_credit.grant(bytes as usize),
            }
        }
    }

    /// The host's terminal changed size: the kernel tells the command with
    /// SIGWINCH.
    pub fn resize(&self, id: ExecId, size: PtySize) {
        if let Some(master) = lock(&self.running).get(&id).and_then(|r| r.pty.clone()) {
            if let Err(e) = set_window_size(&master, size) {
                eprintln!("vmette-guest: cannot resize the terminal of exec {id}: {e}");
            }
        }
    }

    pub fn stdin(&self, id: ExecId, data: Vec<u8>) {
        let running = lock(&self.running);
        match running.get(&id).and_then(|r| r.stdin.as_ref()) {
            Some(pipe) => {
                let _ = pipe.send(Some(data));
            }
            None => {
                let bytes = data.len() as u32;
                drop(running);
                // Keep the host's window honest even when nobody reads.
                self.outbox.send(GuestMessage::StdinAck { id, bytes });
            }
        }
    }

    pub fn stdin_eof(&self, id: ExecId) {
        if let Some(running) = lock(&self.running).get_mut(&id) {
            if let Some(pipe) = running.stdin.take() {
                let _ = pipe.send(None);
            }
        }
    }

    pub fn signal(&self, id: ExecId, signal: i32) {
        let Some(pgid) = lock(&self.running).get(&id).map(|r| r.pgid) else {
            return;
        };
        match Signal::try_from(signal) {
            Ok(signal) => {
                let _ = killpg(pgid, signal);
            }
            Err(_) => eprintln!("vmette-guest: ignoring unknown signal {signal}"),
        }
    }
}

/// The program to run: a bare name is looked up in the command's `PATH`
/// here, with a `stat` per directory, rather than by the spawn trying an
/// `execve` in each, which costs a millisecond apiece under emulation. A
/// name found nowhere is left as it is, for the spawn to report.
fn resolve(request: &ExecRequest) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let program = &request.argv[0];
    if program.contains('/') {
        return program.into();
    }
    let path = request
        .env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map(|(_, value)| value.as_str())
        .or_else(|| {
            DEFAULT_ENV
                .iter()
                .find(|(key, _)| *key == "PATH")
                .map(|(_, v)| *v)
        })
        .unwrap_or_default();
    path.split(':')
        .filter(|dir| dir.starts_with('/'))
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| program.into())
}

fn spawn_failure(request: &ExecRequest, error: &io::Error) -> (String, i32) {
    let program = &request.argv[0];
    match error.kind() {
        ErrorKind::NotFound => match &request.workdir {
            Some(dir) if !std::path::Path::new(dir).is_dir() => {
                (format!("working directory {dir} does not exist"), 125)
            }
            _ => (format!("{program}: command not found"), 127),
        },
        ErrorKind::PermissionDenied => (format!("{program}: permission denied"), 126),
        _ => (format!("{program}: cannot start: {error}"), 126),
    }
}

/// Stack of an exec's helper threads: they copy between pipes and the
/// channel with one heap buffer, and a small stack is cheaper to set up,
/// which several threads per exec notice under emulation.
const HELPER_STACK: usize = 128 * 1024;

fn spawn_named(name: &str, body: impl FnOnce() + Send + 'static) {
    let builder = thread::Builder::new()
        .name(name.into())
        .stack_size(HELPER_STACK);
    if let Err(e) = builder.spawn(body) {
        eprintln!("vmette-guest: cannot start a {name} thread: {e}");
    }
}

/// Gives `command` a new PTY of `size` as stdin, stdout, stderr and
/// controlling terminal, in a session of its own; returns the master side.
fn attach_pty(command: &mut Command, size: PtySize) -> io::Result<OwnedFd> {
    let window = Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&window), None)?;
    // Other commands must not inherit either side; the child gets the
    // slave as its 0, 1 and 2, which `dup2` leaves open across exec.
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    command
        .stdin(Stdio::from(pty.slave.try_clone()?))
        .stdout(Stdio::from(pty.slave.try_clone()?))
        .stderr(Stdio::from(pty.slave));
    // SAFETY: setsid and ioctl are async-signal-safe and touch no memory of
    // the parent. The new session makes the PTY the controlling terminal
    // of the command, so job control and Ctrl-C work as in a real shell.
    unsafe {
        command.pre_exec(|| {
            setsid().map_err(io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(pty.master)
}

/// Makes `command` drop root for `credentials` just before it execs.
fn run_as(command: &mut Command, credentials: crate::user::Credentials) {
    let groups: Vec<Gid> = credentials
        .groups
        .iter()
        .map(|&g| Gid::from_raw(g))
        .collect();
    let gid = Gid::from_raw(credentials.gid);
    let uid = Uid::from_raw(credentials.uid);
    // SAFETY: setgroups, setgid and setuid are async-signal-safe system
    // calls; the closure only reads values moved into it before the fork.
    // Groups go first and the uid last, while the child may still change
    // them; this runs after a PTY's own setup, which needs root.
    unsafe {
        command.pre_exec(move || {
            setgroups(&groups).map_err(io::Error::from)?;
            setgid(gid).map_err(io::Error::from)?;
            setuid(uid).map_err(io::Error::from)
        });
    }
}

fn set_window_size(master: &OwnedFd, size: PtySize) -> io::Result<()> {
    let window = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points to
    // a live local for the duration of the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &window) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn io_failure(error: &io::Error) -> (String, i32) {
    (format!("cannot set up the command's streams: {error}"), 125)
}

/// Waits until every output stream of an exited command has drained: a
/// stream silent for [`DRAIN_GRACE`] (a background process holds it open)
/// or the [`DRAIN_LIMIT`] ends the wait, but a stream waiting for the
/// host's credit never does, since that output is still owed.
fn wait_for_output(done: &mpsc::Receiver<Drain>, mut open: usize) {
    let mut limit = Instant::now() + DRAIN_LIMIT;
    let mut blocked = false;
    while open > 0 {
        let event = if blocked {
            done.recv().ok()
        } else if Instant::now() < limit {
            done.recv_timeout(DRAIN_GRACE).ok()
        } else {
            None
        };
        match event {
            Some(Drain::Progress) => {
                if blocked {
                    blocked = false;
                    limit = Instant::now() + DRAIN_LIMIT;
                }
            }
            Some(Drain::Blocked) => blocked = true,
            Some(Drain::Done) => open -= 1,
            None => return,
        }
    }
}

fn pump_output(
    mut source: impl Read,
    id: ExecId,
    stream: OutputStream,
    credit: &Credit,
    outbox: &Outbox,
    finisher: &mpsc::Sender<Drain>,
) {
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    loop {
        let room = credit.take(MAX_CHUNK_LEN, || {
            let _ = finisher.send(Drain::Blocked);
        });
        if room == 0 {
            return;
        }
        let n = loop {
            match source.read(&mut buf[..room]) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // A PTY master reads EIO once the terminal's last user is
                // gone: that is its end-of-file.
                Ok(0) | Err(_) => return,
                Ok(n) => break n,
            }
        };
        // Credit taken but not used goes back.
        credit.grant(room - n);
        let data = buf[..n].to_vec();
        outbox.send(match stream {
            OutputStream::Stdout => GuestMessage::Stdout { id, data },
            OutputStream::Stderr => GuestMessage::Stderr { id, data },
        });
        let _ = finisher.send(Drain::Progress);
    }
}

/// The end-of-file character a terminal turns into end-of-input for the
/// program reading it (VEOF, Ctrl-D, in the default line discipline).
const TERMINAL_EOF: u8 = 0x04;

fn pump_stdin(
    id: ExecId,
    mut sink: Box<dyn Write + Send>,
    terminal: bool,
    chunks: &mpsc::Receiver<Option<Vec<u8>>>,
    outbox: &Outbox,
) {
    let mut open = true;
    loop {
        match chunks.recv() {
            Ok(Some(data)) => {
                // After EPIPE the command is gone or closed stdin: keep
                // acknowledging so the host's window does not stall.
                if open && sink.write_all(&data).is_err() {
                    open = false;
                }
                outbox.send(GuestMessage::StdinAck {
                    id,
                    bytes: data.len() as u32,
                });
            }
            Ok(None) if terminal && open => {
                let _ = sink.write_all(&[TERMINAL_EOF]);
                return;
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fn reap_forever(children: &Children) {
    loop {
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(peeked) => {
                let Some(pid) = peeked.pid() else { continue };
                // Holding the table lock means no spawn is in progress, so
                // the child cannot be one that `spawn` still has to reap.
                let mut table = lock(&children.table);
                let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => ExitStatus::Code(code),
                    Ok(WaitStatus::Signaled(_, signal, _)) => ExitStatus::Signal(signal as i32),
                    _ => continue,
                };
                if let Some(sender) = table.remove(&pid.as_raw()) {
                    let _ = sender.send(status);
                }
            }
            Err(Errno::ECHILD) => {
                let table = lock(&children.table);
                let _ = children
                    .spawned
                    .wait_timeout(table, Duration::from_millis(100));
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("vmette-guest: waitid failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

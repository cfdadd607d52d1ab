//! Running commands: one exec per request, many at once.
//!
//! As PID 1 the agent inherits every orphan in the VM, so a single reaper
//! thread waits for all children. It must not reap a child that
//! `std::process::Command::spawn` is still waiting on (spawn reaps a child
//! whose `exec` failed itself), so the reaper first *peeks* at an exited
//! child with `WNOWAIT`, then takes the table lock that every spawn holds,
//! and only then reaps. Each exec's status goes to its own finisher thread,
//! which sends `Exited` after the output threads have drained the pipes.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{setsid, Pid};
use vmette_proto::{ExecId, ExecRequest, ExitStatus, GuestMessage, MAX_CHUNK_LEN};

use crate::channel::Outbox;

/// How long the output pipes may stay silent, after the command exited,
/// before the exit status is sent anyway. A background process that keeps
/// them open must not hold the status back for ever; output still flowing
/// (a slow host draining a backlog) keeps the wait going.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// The longest the exit status waits for output after the command exited.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// What the output threads tell the finisher.
enum Drain {
    /// A chunk went out.
    Progress,
    /// The pipe reached end-of-file.
    Done,
}

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

/// What the host can still do to a running exec.
struct Running {
    pgid: Pid,
    stdin: Option<mpsc::Sender<Option<Vec<u8>>>>,
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
        let mut command = Command::new(&request.argv[0]);
        command
            .args(&request.argv[1..])
            .env_clear()
            .envs(DEFAULT_ENV.iter().copied())
            .envs(request.env.iter().map(|(k, v)| (k, v)))
            .current_dir(request.workdir.as_deref().unwrap_or("/"))
            .stdin(if request.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: setsid is async-signal-safe and touches no memory of the
        // parent; it makes the command its own process group so a signal
        // from the host reaches everything it started.
        unsafe {
            command.pre_exec(|| setsid().map(drop).map_err(io::Error::from));
        }

        let (status_tx, status_rx) = mpsc::channel();
        let mut child = {
            let mut table = lock(&self.children.table);
            let child = command.spawn().map_err(|e| spawn_failure(&request, &e))?;
            table.insert(child.id() as i32, status_tx);
            self.children.spawned.notify_one();
            child
        };
        let pid = Pid::from_raw(child.id() as i32);

        let (done_tx, done_rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            let outbox = self.outbox.clone();
            let done = done_tx.clone();
            spawn_named("stdout", move || {
                pump_output(
                    stdout,
                    |data| GuestMessage::Stdout { id, data },
                    &outbox,
                    &done,
                );
                let _ = done.send(Drain::Done);
            });
        }
        if let Some(stderr) = child.stderr.take() {
            let outbox = self.outbox.clone();
            let done = done_tx.clone();
            spawn_named("stderr", move || {
                pump_output(
                    stderr,
                    |data| GuestMessage::Stderr { id, data },
                    &outbox,
                    &done,
                );
                let _ = done.send(Drain::Done);
            });
        }
        drop(done_tx);
        let stdin = child.stdin.take().map(|pipe| {
            let (tx, rx) = mpsc::channel();
            let outbox = self.outbox.clone();
            spawn_named("stdin", move || pump_stdin(id, pipe, &rx, &outbox));
            tx
        });
        lock(&self.running).insert(id, Running { pgid: pid, stdin });

        let outbox = self.outbox.clone();
        let running = Arc::clone(&self.running);
        spawn_named("finisher", move || {
            let status = status_rx.recv().unwrap_or(ExitStatus::Code(255));
            let limit = Instant::now() + DRAIN_LIMIT;
            let mut open_pipes = 2;
            while open_pipes > 0 && Instant::now() < limit {
                match done_rx.recv_timeout(DRAIN_GRACE) {
                    Ok(Drain::Progress) => {}
                    Ok(Drain::Done) => open_pipes -= 1,
                    Err(_) => break,
                }
            }
            lock(&running).remove(&id);
            outbox.send(GuestMessage::Exited { id, status });
        });
        Ok(())
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

fn spawn_named(name: &str, body: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new().name(name.into()).spawn(body) {
        eprintln!("vmette-guest: cannot start a {name} thread: {e}");
    }
}

fn pump_output(
    mut pipe: impl Read,
    frame: impl Fn(Vec<u8>) -> GuestMessage,
    outbox: &Outbox,
    finisher: &mpsc::Sender<Drain>,
) {
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                outbox.send(frame(buf[..n].to_vec()));
                let _ = finisher.send(Drain::Progress);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

fn pump_stdin(
    id: ExecId,
    mut pipe: ChildStdin,
    chunks: &mpsc::Receiver<Option<Vec<u8>>>,
    outbox: &Outbox,
) {
    let mut open = true;
    while let Ok(Some(data)) = chunks.recv() {
        // After EPIPE the command is gone or closed stdin: keep
        // acknowledging so the host's window does not stall.
        if open && pipe.write_all(&data).is_err() {
            open = false;
        }
        outbox.send(GuestMessage::StdinAck {
            id,
            bytes: data.len() as u32,
        });
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

//! Helper processes (the hypervisor, virtiofsd) and the guarantee that none
//! outlives its run.
//!
//! Three layers, because each covers a hole in the others:
//!
//! * [`HelperProcess`] owns a child in its own process group and kills the
//!   group on drop: normal exits, errors, and unwinding.
//! * On Linux, `PR_SET_PDEATHSIG` kills a helper when the thread that
//!   spawned it dies, which covers `SIGKILL` of vmette for helpers whose
//!   credentials do not change (entering a user namespace clears it).
//! * [`Watchdog`] is a small forked process holding the read end of a pipe.
//!   It learns each helper's process group as it is spawned. When the pipe
//!   reaches end-of-file without being disarmed — vmette died, whatever the
//!   signal — it kills those groups and execs `rm -rf` on the run directory.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{mpsc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Most process groups one watchdog tracks: a virtiofsd per share, one for
/// a directory root, the hypervisor, and room to spare.
const MAX_GUARDED: usize = vmette_proto::MAX_SHARES + 8;

/// Guards one run: kills its helpers and removes its run directory if the
/// owning process dies without disarming it.
#[derive(Debug)]
pub struct Watchdog {
    pipe: OwnedFd,
    pid: Pid,
}

impl Watchdog {
    /// Forks the watchdog for a run whose private directory is `run_dir`.
    pub fn spawn(run_dir: &Path) -> io::Result<Watchdog> {
        let remove = RemoveCommand::new(run_dir)?;
        let open_files = open_file_limit();
        let (read_end, write_end) = cloexec_pipe()?;
        // SAFETY: the child runs only async-signal-safe calls on memory
        // prepared before the fork (see `watch`), then execs or `_exit`s; it
        // never returns into Rust code that could touch locks or the heap.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => watch(
                read_end.as_raw_fd(),
                write_end.as_raw_fd(),
                &remove,
                open_files,
            ),
            nix::unistd::ForkResult::Parent { child } => {
                drop(read_end);
                Ok(Watchdog {
                    pipe: write_end,
                    pid: child,
                })
            }
        }
    }

    /// Adds the process group led by `pid` to what the watchdog kills.
    pub fn guard(&self, pid: u32) {
        self.send(pid as i32);
    }

    fn send(&self, value: i32) {
        let bytes = value.to_ne_bytes();
        // A four-byte write to a pipe is atomic. A failure means the
        // watchdog is gone, and then there is nothing left to tell it.
        let _ = nix::unistd::write(&self.pipe, &bytes);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Zero disarms: the owner released everything itself.
        self.send(0);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

/// `rm -rf DIR`, prepared before the fork so the child only has to exec
/// it: the one async-signal-safe way to remove a tree. `DIR` is absolute,
/// so it cannot be taken for an option.
struct RemoveCommand {
    program: CString,
    args: [CString; 3],
}

impl RemoveCommand {
    fn new(dir: &Path) -> io::Result<RemoveCommand> {
        let dir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the run dir"))?;
        Ok(RemoveCommand {
            program: c"/bin/rm".to_owned(),
            args: [c"rm".to_owned(), c"-rf".to_owned(), dir],
        })
    }
}

#[cfg(target_os = "linux")]
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

#[cfg(not(target_os = "linux"))]
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let (read_end, write_end) = nix::unistd::pipe()?;
    fcntl(&read_end, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    fcntl(&write_end, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok((read_end, write_end))
}

/// The highest file descriptor number worth closing in the watchdog.
fn open_file_limit() -> i32 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft.min(1 << 16) as i32)
        .unwrap_or(1024)
}

/// Closes every descriptor from 3 up except `keep`.
///
/// # Safety
///
/// Only for the forked watchdog, which owns no descriptor but `keep`.
unsafe fn close_all_but(keep: RawFd, limit: i32) {
    #[cfg(target_os = "linux")]
    {
        let _ = limit;
        // SAFETY: close_range only closes descriptors.
        unsafe {
            if keep > 3 {
                libc::syscall(libc::SYS_close_range, 3u32, (keep - 1) as u32, 0);
            }
            libc::syscall(libc::SYS_close_range, (keep + 1) as u32, u32::MAX, 0);
        }
    }
    #[cfg(not(target_os = "linux"))]
    for fd in (3..limit).filter(|&fd| fd != keep) {
        // SAFETY: closing a descriptor number is harmless if it is not open.
        unsafe { libc::close(fd) };
    }
}

/// The watchdog's body, in the forked child.
fn watch(read_fd: RawFd, write_fd: RawFd, remove: &RemoveCommand, open_files: i32) -> ! {
    // SAFETY: only async-signal-safe calls on stack memory and strings
    // allocated before the fork.
    unsafe {
        libc::close(write_fd);
        // If vmette started with 0, 1 or 2 closed, the pipe may sit there;
        // move it clear before those become /dev/null.
        let read_fd = if read_fd <= 2 {
            libc::fcntl(read_fd, libc::F_DUPFD, 3)
        } else {
            read_fd
        };
        libc::setpgid(0, 0);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
        }
        // No pipe or socket of the parent's may be kept open by the watchdog.
        close_all_but(read_fd, open_files);

        let mut groups = [0i32; MAX_GUARDED];
        let mut count = 0;
        loop {
            let mut word = [0u8; 4];
            let n = libc::read(read_fd, word.as_mut_ptr().cast(), 4);
            if n == 4 {
                let value = i32::from_ne_bytes(word);
                if value == 0 {
                    libc::_exit(0);
                }
                if count < MAX_GUARDED {
                    groups[count] = value;
                    count += 1;
                }
                continue;
            }
            if n < 0 && nix::errno::Errno::last_raw() == libc::EINTR {
                continue;
            }
            break;
        }
        for &group in &groups[..count] {
            libc::kill(-group, libc::SIGKILL);
        }
        let argv = [
            remove.args[0].as_ptr(),
            remove.args[1].as_ptr(),
            remove.args[2].as_ptr(),
            std::ptr::null(),
        ];
        libc::execv(remove.program.as_ptr(), argv.as_ptr());
        libc::_exit(1)
    }
}

/// A command for the spawner thread, and where its child goes.
type SpawnJob = (Command, mpsc::Sender<(Command, io::Result<Child>)>);

/// Spawns `command` from one thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends,
/// not the process: a helper spawned from a short-lived thread (a thread
/// pool's worker, a request handler) would be killed with it, taking a
/// healthy VM down seconds after it started.
fn spawn_from_lasting_thread(command: &mut Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<SpawnJob>();
        let started = std::thread::Builder::new()
            .name("vmette-spawner".into())
            .spawn(move || {
                for (mut command, reply) in queue {
                    let child = command.spawn();
                    let _ = reply.send((command, child));
                }
            });
        if let Err(e) = started {
            tracing::warn!("cannot start the spawner thread: {e}");
        }
        Mutex::new(jobs)
    });
    let (reply, replied) = mpsc::channel();
    let job = (std::mem::replace(command, Command::new("")), reply);
    let sent = spawner
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send(job);
    match sent {
        Ok(()) => {
            let (returned, child) = replied.recv().map_err(|_| {
                io::Error::other("the spawner thread is gone; cannot start helpers")
            })?;
            *command = returned;
            child
        }
        // No spawner thread could start: as a last resort, from here.
        Err(mpsc::SendError((returned, _))) => {
            *command = returned;
            command.spawn()
        }
    }
}

/// Asks the kernel to kill this (forked) process when its parent dies.
#[cfg(target_os = "linux")]
fn die_with_parent(parent: i32) -> io::Result<()> {
    // SAFETY: prctl, getppid and kill are async-signal-safe.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died before prctl took effect.
        if libc::getppid() != parent {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    Ok(())
}

/// Elsewhere there is no parent-death signal; the watchdog covers it.
#[cfg(not(target_os = "linux"))]
fn die_with_parent(_parent: i32) -> io::Result<()> {
    Ok(())
}

/// A helper process in its own process group, killed with its group when
/// dropped.
#[derive(Debug)]
pub struct HelperProcess {
    name: String,
    child: Child,
    exited: bool,
    /// It exited by itself with status 0.
    succeeded: bool,
}

/// Spawns a host tool that works for this process outside any run (an
/// image packer, say): killed when this process dies, as a helper is, but
/// in this process group, so Ctrl-C reaches it too. The caller owns the
/// child and must wait for it.
pub fn spawn_tool(command: &mut Command) -> io::Result<Child> {
    let parent = std::process::id() as i32;
    // SAFETY: die_with_parent only makes async-signal-safe calls and uses
    // no memory of the parent.
    unsafe {
        command.pre_exec(move || die_with_parent(parent));
    }
    spawn_from_lasting_thread(command)
}

/// Raises this process's soft limit on open files to its hard limit. A
/// VM's network holds a host socket per guest connection, and a daemon
/// serves many VMs, so the usual soft limit of 1024 is soon reached; the
/// hard limit is what the administrator allows. Best effort.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Spawns `command` as a helper of the run that `watchdog` guards: in its
/// own process group (so Ctrl-C on the terminal reaches vmette, which
/// decides what the guest gets), with `PR_SET_PDEATHSIG`, and registered
/// with the watchdog before this returns.
pub fn spawn_helper(
    name: &str,
    command: &mut Command,
    watchdog: &Watchdog,
) -> io::Result<HelperProcess> {
    let parent = std::process::id() as i32;
    command.process_group(0);
    // SAFETY: die_with_parent only makes async-signal-safe calls and uses
    // no memory of the parent.
    unsafe {
        command.pre_exec(move || die_with_parent(parent));
    }
    let child = spawn_from_lasting_thread(command)?;
    watchdog.guard(child.id());
    Ok(HelperProcess {
        name: name.to_string(),
        child,
        exited: false,
        succeeded: false,
    })
}

impl HelperProcess {
    /// The helper's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The helper's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The helper's stdout, when it was spawned with a pipe there.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// `true` once the helper has exited.
    pub fn has_exited(&mut self) -> bool {
        if !self.exited {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = true;
                    self.succeeded = status.success();
                }
                Ok(None) => {}
                Err(_) => self.exited = true,
            }
        }
        self.exited
    }

    /// `true` once the helper has exited by itself with status 0.
    pub fn exited_successfully(&mut self) -> bool {
        self.has_exited() && self.succeeded
    }

    /// Waits up to `timeout` for the helper to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.has_exited() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the helper's whole process group and reaps the helper.
    pub fn kill(&mut self) {
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGKILL);
        if !self.exited {
            let _ = self.child.wait();
            self.exited = true;
        }
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        // The group may hold grandchildren even after the leader exited.
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_kills_helpers_and_removes_the_dir_when_its_owner_vanishes() {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        std::fs::write(dir.join("socket"), b"x").expect("write");
        let watchdog = Watchdog::spawn(&dir).expect("watchdog");
        let mut sleeper = Command::new("sleep");
        sleeper.arg("60").process_group(0);
        let mut child = sleeper.spawn().expect("sleep");
        watchdog.guard(child.id());
        // Simulate the owner's death: close the pipe without disarming.
        let watchdog = std::mem::ManuallyDrop::new(watchdog);
        // SAFETY: the pipe is read out exactly once and `watchdog` is never
        // used or dropped afterwards.
        drop(unsafe { std::ptr::read(&watchdog.pipe) });
        let _ = nix::sys::wait::waitpid(watchdog.pid, None);
        let status = child.wait().expect("wait");
        assert!(!status.success());
        assert!(!dir.exists(), "run dir left behind");
    }

    #[test]
    fn a_disarmed_watchdog_leaves_things_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watchdog = Watchdog::spawn(dir.path()).expect("watchdog");
        drop(watchdog);
        assert!(dir.path().exists());
    }

    #[test]
    fn dropping_a_helper_kills_its_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watchdog = Watchdog::spawn(dir.path()).expect("watchdog");
        let mut command = Command::new("sh");
        command.args(["-c", "sleep 60 & echo $!; wait"]);
        command.stdout(std::process::Stdio::piped());
        let mut helper = spawn_helper("sh", &mut command, &watchdog).expect("spawn");
        let mut line = String::new();
        let stdout = helper.child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("read");
        let grandchild: i32 = line.trim().parse().expect("pid");
        drop(helper);
        // The grandchild was in the group; give the kernel a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{grandchild}/status")).exists() {
            let state =
                std::fs::read_to_string(format!("/proc/{grandchild}/status")).unwrap_or_default();
            if state.contains("State:\tZ") {
                break;
            }
            assert!(Instant::now() < deadline, "grandchild survived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

//! Helpers for the end-to-end tests: every test gets its own temporary
//! directory as `TMPDIR`, so vmette's run directories land there, and after
//! each run the test checks that no process still refers to that directory
//! (qemu and virtiofsd name their sockets in it; the watchdog inherits it
//! in its environment) and that the directory is empty.

#![allow(dead_code)]

pub mod netlab;
pub mod registry;
pub mod store;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Longest any single vmette invocation may take in a test.
pub const RUN_LIMIT: Duration = Duration::from_secs(180);

pub fn vmette_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmette"))
}

/// The engine the `vmette` binary runs VMs on (`VMETTE_ENGINE` or the
/// platform's default), so that engine-specific checks can be chosen.
pub fn engine_name() -> String {
    let output = Command::new(vmette_bin())
        .args(["version", "--json"])
        .output()
        .expect("vmette version");
    let value: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("version --json prints JSON");
    value["engine"].as_str().expect("engine name").to_string()
}

pub struct Sandbox {
    pub tmp: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            tmp: tempfile::Builder::new()
                .prefix("vmette-e2e-")
                .tempdir()
                .expect("create the test's TMPDIR"),
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// A scratch directory for the test's own files, outside TMPDIR.
    pub fn files(&self) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("vmette-e2e-files-")
            .tempdir()
            .expect("create a files directory")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(vmette_bin());
        command
            .args(args)
            .env("TMPDIR", self.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs vmette with `args` to completion and checks it left nothing.
    pub fn run(&self, args: &[&str]) -> Output {
        let child = self.command(args).spawn().expect("spawn vmette");
        let output = wait_with_limit(child, RUN_LIMIT);
        self.assert_clean();
        output
    }

    /// Fails unless, within a few seconds, no process refers to TMPDIR and
    /// TMPDIR is empty.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let holders = processes_referring_to(self.path());
            let entries: Vec<_> = std::fs::read_dir(self.path())
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            if holders.is_empty() && entries.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!("leftovers: processes {holders:?}, files {entries:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Pids whose command line or environment mentions `dir`.
pub fn processes_referring_to(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if status.contains("State:\tZ") {
            continue;
        }
        for file in ["cmdline", "environ"] {
            let bytes = std::fs::read(entry.path().join(file)).unwrap_or_default();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let name = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                found.push((pid, name));
                break;
            }
        }
    }
    found
}

/// Waits for `child`, killing it if it runs past `limit`.
pub fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let status = wait_status(&mut child, limit);
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

pub fn wait_status(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for vmette") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("vmette ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a running child has written to its piped stderr so far, once it
/// has ended (killed first if need be).
pub fn stderr_of(child: &mut Child) -> String {
    let _ = child.kill();
    let _ = child.wait();
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

/// A minimal root file system: a static busybox and a marker file. The
/// busybox must run in the guest: `VMETTE_TEST_BUSYBOX` names one built for
/// the guest's architecture (an arm64 one on a Mac); by default it is the
/// host's busybox-static, which setup.sh installs on Linux.
pub fn busybox_tree(dir: &Path) {
    for sub in ["bin", "dev", "proc", "sys", "tmp", "run", "etc"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    let busybox = std::env::var_os("VMETTE_TEST_BUSYBOX")
        .map(PathBuf::from)
        .or_else(|| {
            ["/bin/busybox", "/usr/bin/busybox"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .expect("a static busybox: setup.sh installs busybox-static, or set VMETTE_TEST_BUSYBOX");
    std::fs::copy(busybox, dir.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "cat", "echo", "ls", "mount", "touch", "sync"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).expect("symlink");
    }
    std::fs::write(dir.join("etc/marker"), "from-the-tree\n").expect("marker");
}

/// Every file under `dir` with its contents, for before/after comparisons.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            if meta.is_dir() {
                stack.push(path.clone());
                out.push((path, Vec::new()));
            } else if meta.is_file() {
                out.push((path.clone(), std::fs::read(&path).expect("read")));
            } else {
                out.push((path, b"<link>".to_vec()));
            }
        }
    }
    out.sort();
    out
}

/// The SHA-256 of the file at `path`, in hex, as `sha256sum` prints it.
pub fn sha256_of(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    stdout(&output)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// vmette commands of a test that share a daemon of their own (its own
/// runtime directory), stopped however the test ends.
pub struct TestDaemon<'a> {
    sandbox: &'a Sandbox,
    runtime: tempfile::TempDir,
}

impl<'a> TestDaemon<'a> {
    pub fn new(sandbox: &'a Sandbox) -> TestDaemon<'a> {
        let runtime = tempfile::Builder::new()
            .prefix("vmette-test-run-")
            .tempdir()
            .expect("runtime dir");
        TestDaemon { sandbox, runtime }
    }

    /// vmette with `args`, talking to this daemon.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = self.sandbox.command(args);
        command.env("XDG_RUNTIME_DIR", self.runtime.path());
        command
    }
}

impl Drop for TestDaemon<'_> {
    fn drop(&mut self) {
        if let Ok(child) = self.command(&["daemon", "stop"]).spawn() {
            let _ = wait_with_limit(child, RUN_LIMIT);
        }
    }
}

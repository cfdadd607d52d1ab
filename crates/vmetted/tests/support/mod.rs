//! The tests' own `vmetted`: a daemon on private directories (its socket
//! directory, and a TMPDIR where its sessions' run directories go), driven
//! with `curl --unix-socket` (a client nobody here wrote), and the checks
//! that it left nothing behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const VMETTED: &str = env!("CARGO_BIN_EXE_vmetted");

/// A daemon of the test's own: its socket directory and TMPDIR (where the
/// sessions' run directories go) are private temporary directories.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub tmp: tempfile::TempDir,
    /// What a daemon started with [`Daemon::start_tcp`] wrote to stderr
    /// after its address, for a failure's message.
    log: Option<std::sync::mpsc::Receiver<String>>,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Daemon {
        let daemon = Daemon::spawned(args, Stdio::null());
        daemon.wait_ready();
        daemon
    }

    /// A daemon on new private directories, not yet known to serve.
    fn spawned(args: &[&str], stderr: Stdio) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("vmetted-sock-")
            .tempdir()
            .expect("dir");
        let tmp = tempfile::Builder::new()
            .prefix("vmetted-tmp-")
            .tempdir()
            .expect("tmp");
        let child = spawn(&dir.path().join("d"), tmp.path(), args, stderr);
        Daemon {
            child,
            dir,
            tmp,
            log: None,
        }
    }

    /// A daemon that also serves loopback TCP on a port it picks: the
    /// daemon, the address it reported and its token.
    pub fn start_tcp(args: &[&str]) -> (Daemon, String, String) {
        let args: Vec<&str> = ["--listen", "127.0.0.1:0"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let mut daemon = Daemon::spawned(&args, Stdio::piped());
        let stderr = daemon.child.stderr.take().expect("stderr");
        let (address, reported) = std::sync::mpsc::channel();
        let (lines, log) = std::sync::mpsc::channel();
        // Read to the end, so the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                match line.strip_prefix("vmetted: serving http://") {
                    Some(rest) => {
                        let _ =
                            address.send(rest.split_whitespace().next().unwrap_or("").to_string());
                    }
                    None => {
                        let _ = lines.send(line);
                    }
                }
            }
        });
        daemon.log = Some(log);
        let address = reported
            .recv_timeout(Duration::from_secs(30))
            .expect("the TCP address");
        daemon.wait_ready();
        let token = std::fs::read_to_string(daemon.socket_dir().join("token")).expect("token");
        (daemon, address, token.trim().to_string())
    }

    /// What a TCP daemon wrote to stderr so far, after its address.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .map(|log| log.try_iter().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after 30 s).
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A new daemon on the same directories, after the old one died.
    pub fn restart(&mut self) {
        self.child = spawn(&self.socket_dir(), self.tmp.path(), &[], Stdio::null());
        self.wait_ready();
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("d")
    }

    pub fn socket(&self) -> PathBuf {
        self.socket_dir().join("vmetted.sock")
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if curl(&self.socket(), &["http://vmette/v1/status"])
                .status
                .success()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("vmetted did not serve within 30 s");
    }

    /// A JSON request; the status and the body.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let url = format!("http://vmette{path}");
        let mut args = vec!["-X", method, "-w", "\n%{http_code}", url.as_str()];
        if let Some(body) = body {
            args.extend(["-H", "content-type: application/json", "-d", body]);
        }
        let output = curl(&self.socket(), &args);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("status line");
        let value = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
        };
        (code.trim().parse().expect("status"), value)
    }

    /// An exec's events from `after`, until the stream ends or `limit`.
    pub fn events(
        &self,
        session: &str,
        exec: u64,
        after: u64,
        limit: Duration,
    ) -> Vec<(u64, String, Value)> {
        let url = format!("http://vmette/v1/sessions/{session}/execs/{exec}/events");
        let header = format!("last-event-id: {after}");
        let max = format!("{}", limit.as_secs_f64());
        let output = curl(
            &self.socket(),
            &["-N", "--max-time", &max, "-H", &header, &url],
        );
        parse_sse(&String::from_utf8_lossy(&output.stdout))
    }

    pub fn exec(&self, session: &str, body: &str) -> u64 {
        let (code, value) = self.call("POST", &format!("/v1/sessions/{session}/execs"), Some(body));
        assert_eq!(code, 201, "{value}");
        value["id"].as_u64().expect("exec id")
    }

    /// The exec's stdout, stderr and exit code, read to its end.
    pub fn run(&self, session: &str, body: &str) -> (Vec<u8>, Vec<u8>, i64) {
        let exec = self.exec(session, body);
        collect(&self.events(session, exec, 0, Duration::from_secs(120)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn spawn(socket_dir: &Path, tmp: &Path, args: &[&str], stderr: Stdio) -> Child {
    Command::new(VMETTED)
        .arg("--socket-dir")
        .arg(socket_dir)
        .args(args)
        .env("TMPDIR", tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn vmetted")
}

pub fn curl(socket: &Path, args: &[&str]) -> Output {
    Command::new("curl")
        .arg("-sS")
        .arg("--unix-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("curl")
}

pub fn parse_sse(text: &str) -> Vec<(u64, String, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let (mut id, mut kind, mut data) = (0, String::new(), Value::Null);
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = v.parse().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("event: ") {
                kind = v.to_string();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = serde_json::from_str(v).unwrap_or(Value::Null);
            }
        }
        if !kind.is_empty() {
            out.push((id, kind, data));
        }
    }
    out
}

pub fn decode(data: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(data["data"].as_str().expect("data"))
        .expect("base64")
}

pub fn collect(events: &[(u64, String, Value)]) -> (Vec<u8>, Vec<u8>, i64) {
    let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), -1);
    for (_, kind, data) in events {
        match kind.as_str() {
            "stdout" => out.extend(decode(data)),
            "stderr" => err.extend(decode(data)),
            "exit" | "failed" => code = data["exit_code"].as_i64().expect("exit code"),
            other => panic!("unexpected event {other}: {data}"),
        }
    }
    (out, err, code)
}

/// Pids whose command line or environment mentions `dir`.
pub fn processes_referring_to(dir: &Path) -> Vec<String> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .is_none()
        {
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
                found.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
                break;
            }
        }
    }
    found
}

/// The command lines of live VMs (qemu-system processes) that mention
/// `dir`.
pub fn vms_referring_to(dir: &Path) -> Vec<String> {
    processes_referring_to(dir)
        .into_iter()
        .filter(|cmdline| {
            let program = cmdline.split(' ').next().unwrap_or_default();
            Path::new(program)
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("qemu-system"))
        })
        .collect()
}

pub fn assert_clean(tmp: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let holders = processes_referring_to(tmp);
        let entries: Vec<_> = std::fs::read_dir(tmp)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if holders.is_empty() && entries.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leftovers: processes {holders:?}, files {entries:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

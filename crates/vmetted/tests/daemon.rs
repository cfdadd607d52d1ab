//! `vmetted` on real VMs and a real socket, driven by `curl --unix-socket`
//! (a client nobody here wrote): sessions and execs with their events as
//! Server-Sent Events, stdin, reconnection with `Last-Event-ID`, errors and
//! limits; the socket's modes and the lock; SIGKILL of the daemon leaving
//! nothing behind; and connections from other users refused before any
//! response; Python clients (httpx, websockets) for the attach WebSocket,
//! and a load test with clients that hang up mid-stream.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

use support::{assert_clean, collect, curl, vms_referring_to, Daemon, VMETTED};

#[test]
fn sessions_and_execs_over_the_socket() {
    let daemon = Daemon::start(&["--max-sessions", "1"]);
    let dir = std::fs::metadata(daemon.socket_dir()).expect("dir");
    assert_eq!(dir.mode() & 0o777, 0o700);
    let socket = std::fs::metadata(daemon.socket()).expect("socket");
    assert_eq!(socket.mode() & 0o777, 0o600);

    let (code, created) = daemon.call("POST", "/v1/sessions", Some(r#"{"name":"t"}"#));
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    let (code, refused) = daemon.call("POST", "/v1/sessions", Some("{}"));
    assert_eq!(code, 429, "{refused}");
    assert!(refused["error"]["message"]
        .as_str()
        .expect("message")
        .contains("sessions"));
    let (code, list) = daemon.call("GET", "/v1/sessions", None);
    assert_eq!(code, 200);
    assert_eq!(list[0]["id"], id.as_str());

    for i in 0..20 {
        let body = format!(
            r#"{{"argv":["sh","-c","echo out-{i}; echo err-{i} >&2; exit {}"]}}"#,
            i % 5
        );
        let (out, err, code) = daemon.run("t", &body);
        assert_eq!(
            (out, err, code),
            (
                format!("out-{i}\n").into_bytes(),
                format!("err-{i}\n").into_bytes(),
                i % 5
            )
        );
    }

    let started = Instant::now();
    let execs: Vec<u64> = (0..4)
        .map(|i| {
            daemon.exec(
                "t",
                &format!(r#"{{"argv":["sh","-c","sleep 2; echo done-{i}"]}}"#),
            )
        })
        .collect();
    for (i, exec) in execs.into_iter().enumerate() {
        let (out, _, code) = collect(&daemon.events("t", exec, 0, Duration::from_secs(60)));
        assert_eq!((out, code), (format!("done-{i}\n").into_bytes(), 0));
    }
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "the four execs did not run at once"
    );

    // Stdin in, then closed.
    let cat = daemon.exec("t", r#"{"argv":["cat"],"stdin":true}"#);
    let stdin = format!("http://vmette/v1/sessions/t/execs/{cat}/stdin");
    let sent = curl(
        &daemon.socket(),
        &["-X", "POST", "--data-binary", "hello\n", &stdin],
    );
    assert!(sent.status.success());
    let (code, _) = daemon.call(
        "POST",
        &format!("/v1/sessions/t/execs/{cat}/stdin/close"),
        None,
    );
    assert_eq!(code, 204);
    let (out, _, code) = collect(&daemon.events("t", cat, 0, Duration::from_secs(60)));
    assert_eq!((out, code), (b"hello\n".to_vec(), 0));

    // A client that leaves mid-stream and comes back misses nothing; one
    // that asks for what another already took is told what it missed.
    let ticker = daemon.exec(
        "t",
        r#"{"argv":["sh","-c","for i in 1 2 3 4 5 6; do echo tick-$i; sleep 0.5; done"]}"#,
    );
    let first = daemon.events("t", ticker, 0, Duration::from_millis(1500));
    assert!(!first.is_empty(), "no event in the first 1.5 s");
    let last = first.last().expect("event").0;
    let rest = daemon.events("t", ticker, last, Duration::from_secs(60));
    let mut all = first.clone();
    all.extend(rest);
    let (out, _, code) = collect(&all);
    assert_eq!(code, 0);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "tick-1\ntick-2\ntick-3\ntick-4\ntick-5\ntick-6\n"
    );

    // Errors: JSON, one sentence, the right status.
    let (code, body) = daemon.call("GET", "/v1/nowhere", None);
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (code, _) = daemon.call("GET", "/v1/sessions/vm-0000000000000000", None);
    assert_eq!(code, 404);
    let (code, _) = daemon.call("POST", "/v1/sessions/t/execs", Some(r#"{"argv":"#));
    assert!((400..500).contains(&code), "malformed JSON got {code}");
    let (code, _) = daemon.call("POST", "/v1/sessions/t/execs", Some(r#"{"argv":[]}"#));
    assert_eq!(code, 422);
    let big = format!(r#"{{"argv":["echo","{}"]}}"#, "x".repeat(100_000));
    let (code, _) = daemon.call("POST", "/v1/sessions/t/execs", Some(&big));
    assert_eq!(code, 413);
    let huge_header = format!("x-big: {}", "y".repeat(64 * 1024));
    let output = curl(
        &daemon.socket(),
        &[
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            "-H",
            &huge_header,
            "http://vmette/v1/status",
        ],
    );
    let status = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        status.starts_with('4') || status == "000",
        "oversized header got {status}"
    );
    let (code, body) = daemon.call("GET", "/v1/sessions/t/execs/abc/events", None);
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (code, body) = daemon.call("PATCH", "/v1/status", None);
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (code, _) = daemon.call("POST", "/v1/sessions", Some(r#"{"scratch_mib":99999999}"#));
    assert!(code == 422 || code == 429, "a huge scratch disk got {code}");
    // A Last-Event-ID no event had neither breaks the daemon nor costs
    // anyone output.
    let late = daemon.exec("t", r#"{"argv":["echo","late"]}"#);
    let lying = daemon.events("t", late, u64::MAX, Duration::from_secs(60));
    let (out, _, code) = collect(&lying);
    assert_eq!((out, code), (b"late\n".to_vec(), 0));
    // The session is unaffected by all that.
    let (out, _, code) = daemon.run("t", r#"{"argv":["echo","still"]}"#);
    assert_eq!((out, code), (b"still\n".to_vec(), 0));

    // A second daemon on the same directory is refused, with one sentence.
    let second = Command::new(VMETTED)
        .arg("--socket-dir")
        .arg(daemon.socket_dir())
        .output()
        .expect("second vmetted");
    assert_eq!(second.status.code(), Some(125));
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(message.contains("another vmetted"), "{message}");

    let (code, ended) = daemon.call("DELETE", "/v1/sessions/t", None);
    assert_eq!(code, 200, "{ended}");
    let (code, _) = daemon.call("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(code, 404);
    let tmp = daemon.tmp.path().to_path_buf();
    drop(daemon);
    assert_clean(&tmp);
}

#[test]
fn sigkill_of_the_daemon_leaves_nothing_and_a_new_one_serves_at_once() {
    let mut daemon = Daemon::start(&[]);
    for _ in 0..2 {
        let (code, body) = daemon.call("POST", "/v1/sessions", Some("{}"));
        assert_eq!(code, 201, "{body}");
    }
    let tmp = daemon.tmp.path().to_path_buf();
    assert!(
        vms_referring_to(&tmp).len() >= 2,
        "two VMs should be running"
    );
    daemon.child.kill().expect("SIGKILL");
    daemon.child.wait().expect("reap");
    assert_clean(&tmp);

    // The stale socket and lock are taken over at once.
    assert!(
        daemon.socket().exists(),
        "the dead daemon's socket is still there"
    );
    let started = Instant::now();
    daemon.restart();
    assert!(started.elapsed() < Duration::from_secs(5));
    let (code, status) = daemon.call("GET", "/v1/status", None);
    assert_eq!((code, status["sessions"].as_u64()), (200, Some(0)));
}

const OWNER: &str = "vmette-e2e";
const STRANGER: &str = "vmette-e2e2";

fn ensure_user(name: &str) {
    let exists = Command::new("id")
        .arg(name)
        .output()
        .expect("id")
        .status
        .success();
    if !exists {
        let made = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", name])
            .status()
            .expect("useradd");
        assert!(made.success());
    }
}

#[test]
fn other_users_are_refused_before_any_response() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the other-user checks need root to create users; skipped");
        return;
    }
    ensure_user(OWNER);
    ensure_user(STRANGER);
    let base = tempfile::Builder::new()
        .prefix("vmetted-users-")
        .tempdir()
        .expect("tmp");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = base.path().join("sock");
    std::fs::create_dir(&dir).expect("mkdir");
    let chown = Command::new("chown")
        .arg(OWNER)
        .arg(&dir)
        .status()
        .expect("chown");
    assert!(chown.success());
    // A copy the other user can execute wherever the build lives (a
    // checkout in a private directory, say). It only serves; no session is
    // created, so it needs no VM assets.
    let vmetted = base.path().join("vmetted");
    std::fs::copy(VMETTED, &vmetted).expect("copy vmetted");
    let mut child = Command::new("runuser")
        .args(["-u", OWNER, "--"])
        .arg(&vmetted)
        .arg("--socket-dir")
        .arg(dir.join("d"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("runuser vmetted");
    let socket = dir.join("d/vmetted.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "vmetted as {OWNER} did not bind");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));

    // Root passes file permissions, but not the peer check.
    let output = curl(&socket, &["-w", "%{http_code}", "http://vmette/v1/status"]);
    let code = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(code, "000", "root got an HTTP response: {code}");
    assert!(!output.status.success());

    // A second user, with the modes opened up for the test, is refused too.
    for path in [dir.join("d"), socket.clone()] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("open up");
    }
    let output = Command::new("runuser")
        .args([
            "-u",
            STRANGER,
            "--",
            "curl",
            "-sS",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(&socket)
        .arg("http://vmette/v1/status")
        .output()
        .expect("curl as another user");
    let code = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(code, "000", "another user got an HTTP response: {code}");

    // The daemon's own user is served.
    let output = Command::new("runuser")
        .args(["-u", OWNER, "--", "curl", "-sS", "--unix-socket"])
        .arg(&socket)
        .arg("http://vmette/v1/status")
        .output()
        .expect("curl as the owner");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("\"version\""),
        "{output:?}"
    );
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

#[test]
fn files_and_trees_over_the_socket() {
    let daemon = Daemon::start(&[]);
    let (code, body) = daemon.call("POST", "/v1/sessions", Some(r#"{"name":"f"}"#));
    assert_eq!(code, 201, "{body}");
    let work = tempfile::tempdir().expect("tmp");

    // 10 MiB up and down, byte for byte.
    let data: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i * 31 + i / 7919) as u8)
        .collect();
    let upload = work.path().join("up.bin");
    std::fs::write(&upload, &data).expect("write");
    let file_url = "http://vmette/v1/sessions/f/files?path=/srv/data/big.bin&mode=600";
    let sent = curl(
        &daemon.socket(),
        &[
            "-X",
            "PUT",
            "--data-binary",
            &format!("@{}", upload.display()),
            "-w",
            "%{http_code}",
            file_url,
        ],
    );
    assert!(
        String::from_utf8_lossy(&sent.stdout).ends_with("201"),
        "{sent:?}"
    );
    let download = work.path().join("down.bin");
    let got = curl(
        &daemon.socket(),
        &[
            "-o",
            &download.display().to_string(),
            "http://vmette/v1/sessions/f/files?path=/srv/data/big.bin",
        ],
    );
    assert!(got.status.success(), "{got:?}");
    assert!(
        std::fs::read(&download).expect("read") == data,
        "the file came back changed"
    );
    let (code, stat) = daemon.call(
        "GET",
        "/v1/sessions/f/files/stat?path=/srv/data/big.bin",
        None,
    );
    assert_eq!(code, 200);
    assert_eq!(
        (
            stat["kind"].as_str(),
            stat["size"].as_u64(),
            stat["mode"].as_str()
        ),
        (Some("file"), Some(10 << 20), Some("600"))
    );

    // A tree both ways as tar, made and unpacked by the system's tar.
    let source = work.path().join("src");
    for i in 0..30 {
        let dir = source.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join(format!("f{i}")),
            format!("file {i}\n").repeat(i + 1),
        )
        .expect("write");
    }
    std::os::unix::fs::symlink("d0/f0", source.join("link")).expect("symlink");
    let tar_in = work.path().join("in.tar");
    let packed = Command::new("tar")
        .arg("-C")
        .arg(&source)
        .arg("-cf")
        .arg(&tar_in)
        .arg(".")
        .status()
        .expect("tar");
    assert!(packed.success());
    let sent = curl(
        &daemon.socket(),
        &[
            "-X",
            "PUT",
            "--data-binary",
            &format!("@{}", tar_in.display()),
            "-w",
            "%{http_code}",
            "http://vmette/v1/sessions/f/tree?path=/srv/tree",
        ],
    );
    assert!(
        String::from_utf8_lossy(&sent.stdout).ends_with("201"),
        "{sent:?}"
    );
    let (code, listing) = daemon.call("GET", "/v1/sessions/f/files/list?path=/srv/tree", None);
    assert_eq!(code, 200);
    let names: Vec<_> = listing["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(names, ["d0", "d1", "d2", "link"]);
    let tar_out = work.path().join("out.tar");
    let got = curl(
        &daemon.socket(),
        &[
            "-o",
            &tar_out.display().to_string(),
            "http://vmette/v1/sessions/f/tree?path=/srv/tree",
        ],
    );
    assert!(got.status.success());
    let back = work.path().join("back");
    std::fs::create_dir(&back).expect("mkdir");
    let unpacked = Command::new("tar")
        .arg("-C")
        .arg(&back)
        .arg("-xf")
        .arg(&tar_out)
        .status()
        .expect("tar");
    assert!(unpacked.success());
    let diff = Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&source)
        .arg(&back)
        .output()
        .expect("diff");
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );

    // mkdir, delete, and typed errors.
    let (code, _) = daemon.call(
        "POST",
        "/v1/sessions/f/files/mkdir?path=/srv/a/b&parents=true",
        None,
    );
    assert_eq!(code, 204);
    let (code, _) = daemon.call(
        "DELETE",
        "/v1/sessions/f/files?path=/srv/a&recursive=true",
        None,
    );
    assert_eq!(code, 204);
    let (code, body) = daemon.call("GET", "/v1/sessions/f/files/stat?path=/srv/a", None);
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (code, body) = daemon.call("GET", "/v1/sessions/f/files?path=/srv/tree", None);
    assert_eq!(code, 409, "a directory is not a file");
    assert_eq!(body["error"]["code"], "is_a_directory", "{body}");
    let (code, _) = daemon.call("GET", "/v1/sessions/f/files?path=relative", None);
    assert_eq!(code, 422);
    let (code, _) = daemon.call("GET", "/v1/sessions/f/files", None);
    assert_eq!(code, 400, "the path is required");
    let (out, _, code) = daemon.run("f", r#"{"argv":["cat","/srv/tree/d1/f1"]}"#);
    assert_eq!((out, code), (b"file 1\nfile 1\n".to_vec(), 0));
}

/// Runs one of the Python clients in `tests/` (their packages come from
/// `setup.sh --with-test-tools`) and checks that it printed `done`; its
/// output, for whoever reads the test's.
fn python_client(script: &str, args: &[&OsStr], done: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let output = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "{} failed: {stdout}{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(done), "{stdout}");
    stdout
}

#[test]
fn a_python_client_with_httpx_works() {
    let daemon = Daemon::start(&[]);
    python_client(
        "client.py",
        &[daemon.socket().as_os_str()],
        "python client: ok",
    );
}

/// The `curl` commands of `docs/api.md`, in order, continuation lines
/// joined: every line of an `sh` block that runs curl.
fn documented_commands() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md"))
        .expect("docs/api.md");
    let (mut commands, mut in_sh, mut pending) = (Vec::new(), false, String::new());
    for line in doc.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let line = line.trim();
        if let Some(start) = line.strip_suffix('\\') {
            pending.push_str(start);
            continue;
        }
        pending.push_str(line);
        if pending.contains("curl ") {
            commands.push(std::mem::take(&mut pending));
        }
        pending.clear();
    }
    commands
}

#[test]
fn every_curl_example_in_the_api_doc_works() {
    let daemon = Daemon::start(&[]);
    let work = tempfile::tempdir().expect("tmp");
    std::fs::write(work.path().join("input.txt"), "one\ntwo\nthree\n").expect("write");
    std::fs::write(work.path().join("report.pdf"), b"%PDF-1.4 not really\n").expect("write");
    std::fs::create_dir_all(work.path().join("src/lib")).expect("mkdir");
    std::fs::write(work.path().join("src/lib/main.rs"), "fn main() {}\n").expect("write");
    std::fs::create_dir(work.path().join("back")).expect("mkdir");
    let commands = documented_commands();
    assert!(
        commands.len() >= 15,
        "only {} curl examples found",
        commands.len()
    );
    for command in &commands {
        // -f: an HTTP error is a failed example.
        let checked = command.replace("curl ", "curl -sSf ");
        let output = Command::new("bash")
            .args(["-o", "pipefail", "-c", &checked])
            .env("S", daemon.socket())
            .current_dir(work.path())
            .output()
            .expect("bash");
        assert!(
            output.status.success(),
            "{command}\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(work.path().join("back/lib/main.rs")).expect("unpacked"),
        "fn main() {}\n"
    );
}

#[test]
fn the_memory_budget_holds_and_idle_sessions_are_evicted() {
    let daemon = Daemon::start(&["--max-memory", "700", "--idle-timeout", "3s"]);
    let (code, first) = daemon.call("POST", "/v1/sessions", Some(r#"{"memory_mib":512}"#));
    assert_eq!(code, 201, "{first}");
    let (code, refused) = daemon.call("POST", "/v1/sessions", Some(r#"{"memory_mib":512}"#));
    assert_eq!(code, 429, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("MiB"),
        "{refused}"
    );
    // Idle for the timeout, then swept: gone, and its memory free again.
    let id = first["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, _) = daemon.call("GET", &format!("/v1/sessions/{id}"), None);
        if code == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle session was not evicted"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let (_, status) = daemon.call("GET", "/v1/status", None);
    assert_eq!(status["memory_mib"].as_u64(), Some(0), "{status}");
}

#[test]
fn malformed_http_gets_a_4xx_and_harms_no_one() {
    use std::io::{Read, Write};
    let daemon = Daemon::start(&[]);
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /v1/status HTTP/9.9\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"POST /v1/sessions HTTP/1.1\r\nHost: v\r\nContent-Length: -5\r\n\r\n",
    ] {
        let mut stream = std::os::unix::net::UnixStream::connect(daemon.socket()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(garbage).expect("write");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{:?} got {answer}",
            String::from_utf8_lossy(garbage)
        );
    }
    let (code, status) = daemon.call("GET", "/v1/status", None);
    assert_eq!(code, 200, "{status}");
}

#[test]
fn loopback_tcp_needs_the_token() {
    for refused in ["0.0.0.0:0", "192.168.1.5:0", "[::]:0"] {
        let dir = tempfile::tempdir().expect("dir");
        let output = Command::new(VMETTED)
            .arg("--socket-dir")
            .arg(dir.path().join("d"))
            .args(["--listen", refused])
            .output()
            .expect("vmetted");
        assert_eq!(output.status.code(), Some(125), "{refused}");
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(message.contains("not a loopback address"), "{message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    }

    let (daemon, address, token) = Daemon::start_tcp(&[]);
    let token_file = daemon.socket_dir().join("token");
    assert_eq!(
        std::fs::metadata(&token_file).expect("token").mode() & 0o777,
        0o600
    );
    let url = format!("http://{address}/v1/status");
    let status_of = |extra: &[&str]| {
        let output = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    assert_eq!(status_of(&[]), "401", "no token");
    assert_eq!(
        status_of(&["-H", "Authorization: Bearer wrong"]),
        "401",
        "a wrong token"
    );
    let bearer = format!("Authorization: Bearer {}", token.trim());
    assert_eq!(status_of(&["-H", &bearer]), "200", "the right token");
    assert_eq!(
        status_of(&["-H", &bearer, "-H", "Origin: http://evil.example"]),
        "403",
        "a foreign origin"
    );
    let over_tcp = Command::new("curl")
        .args(["-sS", "-H", &bearer, &url])
        .output()
        .expect("curl");
    let over_tcp: Value = serde_json::from_slice(&over_tcp.stdout).expect("JSON");
    let over_unix = curl(&daemon.socket(), &["http://vmette/v1/status"]);
    let over_unix: Value = serde_json::from_slice(&over_unix.stdout).expect("JSON");
    assert_eq!(over_tcp, over_unix, "the same answers on both listeners");
}

#[test]
fn a_websocket_client_attaches() {
    let (mut daemon, address, token) = Daemon::start_tcp(&[]);
    let socket = daemon.socket();
    python_client(
        "attach.py",
        &[socket.as_os_str(), address.as_ref(), token.as_ref()],
        "attach client: ok",
    );
    daemon.stop();
    assert_clean(daemon.tmp.path());
}

#[test]
fn the_daemon_stays_flat_under_load_and_dropped_clients() {
    let daemon = Daemon::start(&[]);
    let pid = daemon.child.id().to_string();
    python_client(
        "load.py",
        &[daemon.socket().as_os_str(), pid.as_ref()],
        "load: ok",
    );
}

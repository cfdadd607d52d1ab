//! The verbs that work through vmetted, on real VMs: `create` (which
//! starts the daemon on demand, once, however many CLIs race), `exec`
//! alone and four at once, `cp` of a file and a tree both ways, `ps
//! --json`, `stop`, `daemon stop`, and one-sentence failures with 125.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::{code, stderr, stdout, Sandbox};

/// A private runtime directory, so the test has a daemon of its own.
struct Runtime {
    dir: tempfile::TempDir,
}

impl Runtime {
    fn new() -> Runtime {
        Runtime {
            dir: tempfile::Builder::new()
                .prefix("vmette-verbs-run-")
                .tempdir()
                .expect("runtime dir"),
        }
    }

    fn command(&self, sandbox: &Sandbox, args: &[&str]) -> Command {
        let mut command = sandbox.command(args);
        command.env("XDG_RUNTIME_DIR", self.dir.path());
        command
    }

    fn run(&self, sandbox: &Sandbox, args: &[&str]) -> Output {
        let child = self.command(sandbox, args).spawn().expect("spawn vmette");
        support::wait_with_limit(child, support::RUN_LIMIT)
    }

    fn daemons(&self) -> usize {
        support::processes_referring_to(self.dir.path())
            .iter()
            .filter(|(_, cmdline)| cmdline.contains("vmetted"))
            .count()
    }
}

fn ok(output: &Output) -> String {
    assert_eq!(code(output), 0, "stderr: {}", stderr(output));
    stdout(output)
}

fn assert_one_sentence(output: &Output) {
    assert_eq!(code(output), 125, "{output:?}");
    let message = stderr(output);
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    assert!(message.starts_with("vmette: "), "{message}");
}

#[test]
fn sandboxes_through_the_daemon() {
    let sandbox = Sandbox::new();
    let runtime = Runtime::new();

    // Two CLIs at once with no daemon: one daemon starts.
    let racers: Vec<_> = (0..2)
        .map(|_| runtime.command(&sandbox, &["ps"]).spawn().expect("spawn"))
        .collect();
    for racer in racers {
        let output = support::wait_with_limit(racer, support::RUN_LIMIT);
        ok(&output);
    }
    assert_eq!(
        runtime.daemons(),
        1,
        "racing CLIs started more than one daemon"
    );

    let id = ok(&runtime.run(&sandbox, &["create", "--name", "box"]));
    let id = id
        .lines()
        .last()
        .expect("the id is the last line")
        .to_string();
    assert!(id.starts_with("vm-"), "{id}");

    for i in 0..20 {
        let line = format!("echo out-{i}; echo err-{i} >&2; exit {}", i % 5);
        let output = runtime.run(&sandbox, &["exec", "box", "--", "sh", "-c", &line]);
        assert_eq!(code(&output), i % 5);
        assert_eq!(stdout(&output), format!("out-{i}\n"));
        assert_eq!(stderr(&output), format!("err-{i}\n"));
    }
    let started = std::time::Instant::now();
    let four: Vec<_> = (0..4)
        .map(|i| {
            let line = format!("sleep 2; echo done-{i}");
            runtime
                .command(&sandbox, &["exec", &id, "--", "sh", "-c", &line])
                .spawn()
                .expect("spawn")
        })
        .collect();
    for (i, child) in four.into_iter().enumerate() {
        let output = support::wait_with_limit(child, support::RUN_LIMIT);
        assert_eq!(ok(&output), format!("done-{i}\n"));
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(9),
        "the execs did not run at once"
    );

    // Piped stdin reaches the command, with its end.
    let mut child = runtime
        .command(&sandbox, &["exec", "box", "--", "wc", "-c"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(&[b'x'; 300_000]).expect("write");
    }
    let output = support::wait_with_limit(child, support::RUN_LIMIT);
    assert_eq!(ok(&output).trim(), "300000");

    // cp: a 10 MiB file and a tree, both ways, byte for byte.
    let files = sandbox.files();
    let data: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let big = files.path().join("big.bin");
    std::fs::write(&big, &data).expect("write");
    ok(&runtime.run(&sandbox, &["cp", &big.display().to_string(), "box:/tmp/"]));
    let back = files.path().join("back.bin");
    ok(&runtime.run(
        &sandbox,
        &["cp", "box:/tmp/big.bin", &back.display().to_string()],
    ));
    assert!(
        std::fs::read(&back).expect("read") == data,
        "the file came back changed"
    );

    let tree = files.path().join("tree");
    for i in 0..40 {
        let dir = tree.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("f{i}")), format!("{i}\n").repeat(i)).expect("write");
    }
    std::os::unix::fs::symlink("d0/f0", tree.join("link")).expect("symlink");
    ok(&runtime.run(
        &sandbox,
        &["cp", &tree.display().to_string(), "box:/srv/tree"],
    ));
    let listed = runtime.run(
        &sandbox,
        &[
            "exec",
            "box",
            "--",
            "sh",
            "-c",
            "find /srv/tree -type f | wc -l",
        ],
    );
    assert_eq!(ok(&listed).trim(), "40");
    let out = files.path().join("out");
    ok(&runtime.run(
        &sandbox,
        &["cp", "box:/srv/tree", &out.display().to_string()],
    ));
    let diff = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(&tree)
        .arg(&out)
        .output()
        .expect("diff");
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );

    // ps --json parses and lists the sandbox.
    let listing: serde_json::Value =
        serde_json::from_str(&ok(&runtime.run(&sandbox, &["ps", "--json"]))).expect("JSON");
    let sessions = listing.as_array().expect("array");
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["id"], id.as_str());
    assert_eq!(sessions[0]["name"], "box");

    // One sentence and 125 for an unknown sandbox and a bad flag.
    assert_one_sentence(&runtime.run(&sandbox, &["exec", "nobody", "--", "true"]));
    assert_one_sentence(&runtime.run(&sandbox, &["create", "--memory", "lots"]));
    assert_one_sentence(&runtime.run(&sandbox, &["create", "--no-such-flag"]));
    assert_one_sentence(&runtime.run(&sandbox, &["cp", "/etc/hostname", "/tmp/x"]));

    // The run flags' shares: read-only unless :rw, enforced by the host.
    let shared = files.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::write(shared.join("given"), "from the host\n").expect("write");
    let rw = format!("{}:/rw:rw", shared.display());
    let ro = format!("{}:/ro", shared.display());
    ok(&runtime.run(
        &sandbox,
        &["create", "--name", "shares", "--share", &rw, "--share", &ro],
    ));
    let line =
        "cat /ro/given; echo made > /rw/made; echo nope > /ro/nope 2>/dev/null || echo refused";
    let output = runtime.run(&sandbox, &["exec", "shares", "--", "sh", "-c", line]);
    assert_eq!(ok(&output), "from the host\nrefused\n");
    assert_eq!(
        std::fs::read_to_string(shared.join("made")).expect("made"),
        "made\n"
    );
    assert!(!shared.join("nope").exists());
    ok(&runtime.run(&sandbox, &["stop", "shares"]));

    ok(&runtime.run(&sandbox, &["stop", "box"]));
    let listing: serde_json::Value =
        serde_json::from_str(&ok(&runtime.run(&sandbox, &["ps", "--json"]))).expect("JSON");
    assert_eq!(listing.as_array().map(Vec::len), Some(0));

    ok(&runtime.run(&sandbox, &["daemon", "stop"]));
    assert_eq!(runtime.daemons(), 0);
    let status = runtime.run(&sandbox, &["daemon", "status", "--json"]);
    assert_eq!(code(&status), 1, "the daemon is stopped");
    sandbox.assert_clean();
    assert!(!Path::new(&runtime.dir.path().join("vmette/vmetted.sock")).exists());
}

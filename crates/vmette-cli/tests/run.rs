//! End-to-end tests of `vmette run` (issue 3): each boots a real microVM
//! with the project's kernel, initramfs and guest agent, and checks that it
//! left no process or file behind.
//!
//! They drive the `vmette` binary, so they run unchanged on any engine:
//! `VMETTE_ENGINE` selects it (`qemu` on Linux, `vz` on macOS).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{code, stderr, stdout, Sandbox};

#[test]
fn uname_reports_the_guest_kernel_not_the_hosts() {
    let sandbox = Sandbox::new();
    let output = sandbox.run(&["run", "--", "uname", "-r"]);
    assert_eq!(code(&output), 0, "stderr: {}", stderr(&output));
    let guest = stdout(&output).trim().to_string();
    let cache = vmette::assets::Cache::locate().expect("cache");
    let kernel = vmette::assets::kernel::cached(&cache)
        .expect("read cache")
        .expect("set-up fetched a kernel");
    assert_eq!(guest, kernel.release);
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("host release");
    assert_ne!(guest, host.trim());
}

#[test]
fn exit_codes_pass_through() {
    let sandbox = Sandbox::new();
    let output = sandbox.run(&["run", "--", "sh", "-c", "exit 7"]);
    assert_eq!(code(&output), 7);
    let output = sandbox.run(&["run", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(code(&output), 137);
}

#[test]
fn a_missing_command_exits_127() {
    let sandbox = Sandbox::new();
    let output = sandbox.run(&["run", "--", "no-such-command-here"]);
    assert_eq!(code(&output), 127);
    assert!(stderr(&output).contains("not found"), "{}", stderr(&output));
}

#[test]
fn timeout_kills_the_vm_and_exits_124() {
    let sandbox = Sandbox::new();
    let started = Instant::now();
    let output = sandbox.run(&["run", "--timeout", "3s", "--", "sleep", "60"]);
    assert_eq!(code(&output), 124, "stderr: {}", stderr(&output));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_stdin_that_never_closes_does_not_defeat_the_timeout() {
    let sandbox = Sandbox::new();
    let mut command = sandbox.command(&["run", "--timeout", "3s", "--", "cat"]);
    command.stdin(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().expect("spawn");
    // Hold the write end open and silent for the whole run.
    let held_stdin = child.stdin.take();
    let status = support::wait_status(&mut child, Duration::from_secs(60));
    drop(held_stdin);
    assert_eq!(status.code(), Some(124));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    sandbox.assert_clean();
}

#[test]
fn stdout_and_stderr_stay_separate() {
    let sandbox = Sandbox::new();
    let output = sandbox.run(&["run", "--", "sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(code(&output), 0);
    assert_eq!(stdout(&output), "out\n");
    assert_eq!(stderr(&output), "err\n");
}

#[test]
fn output_arrives_while_the_command_runs() {
    let sandbox = Sandbox::new();
    let mut child = sandbox
        .command(&["run", "--", "sh", "-c", "echo first; sleep 4; echo second"])
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("read");
    let first_at = Instant::now();
    assert_eq!(first, "first");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "exited before the first line"
    );
    let second = lines.next().expect("a line").expect("read");
    assert_eq!(second, "second");
    let status = support::wait_status(&mut child, Duration::from_secs(60));
    assert!(status.success());
    assert!(
        first_at.elapsed() >= Duration::from_secs(3),
        "the first line came only {:?} before the end",
        first_at.elapsed()
    );
    sandbox.assert_clean();
}

#[test]
fn stdin_is_forwarded_with_its_end() {
    let sandbox = Sandbox::new();
    let mut command = sandbox.command(&["run", "--", "cat"]);
    command.stdin(Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(b"hi\n").expect("write");
    drop(input);
    let output = support::wait_with_limit(child, support::RUN_LIMIT);
    assert_eq!(code(&output), 0);
    assert_eq!(stdout(&output), "hi\n");
    sandbox.assert_clean();
}

#[test]
fn large_stdin_flows_through_the_window() {
    let sandbox = Sandbox::new();
    let mut command = sandbox.command(&["run", "--", "wc", "-c"]);
    command.stdin(Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    let mut input = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..48 {
            input.write_all(&chunk).expect("write");
        }
    });
    let output = support::wait_with_limit(child, support::RUN_LIMIT);
    writer.join().expect("writer");
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), (48 * 64 * 1024).to_string());
    sandbox.assert_clean();
}

#[test]
fn sh_runs_a_shell_line() {
    let sandbox = Sandbox::new();
    let output = sandbox.run(&["run", "--sh", "echo $HOME | wc -c"]);
    assert_eq!(code(&output), 0);
    assert_eq!(stdout(&output).trim(), "6");
}

#[test]
fn env_and_workdir_reach_the_command() {
    let sandbox = Sandbox::new();
    let output = sandbox.run(&[
        "run",
        "--env",
        "GREETING=hello world",
        "--workdir",
        "/usr/share",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), "hello world\n/usr/share\n");
}

#[test]
fn host_environment_does_not_leak_into_the_guest() {
    let sandbox = Sandbox::new();
    let mut command = sandbox.command(&["run", "--", "sh", "-c", "echo ${SECRET_TOKEN:-unset}"]);
    command.env("SECRET_TOKEN", "hunter2");
    let output = support::wait_with_limit(command.spawn().expect("spawn"), support::RUN_LIMIT);
    assert_eq!(stdout(&output), "unset\n");
    sandbox.assert_clean();
}

#[test]
fn shares_are_read_only_by_default_even_after_a_guest_remount() {
    let sandbox = Sandbox::new();
    let files = sandbox.files();
    std::fs::write(files.path().join("f"), "hello\n").expect("write");
    let before = support::snapshot(files.path());
    let share = format!("{}:/data", files.path().display());
    let output = sandbox.run(&[
        "run",
        "--share",
        &share,
        "--",
        "sh",
        "-c",
        "cat /data/f; echo x > /data/new 2>/dev/null || echo refused; \
         mount -o remount,rw /data && echo remounted; \
         echo y > /data/f 2>/dev/null || echo still-refused",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.starts_with("hello\nrefused\n"), "{text}");
    assert!(
        text.contains("remounted"),
        "the guest could not even try: {text}"
    );
    assert!(text.ends_with("still-refused\n"), "{text}");
    assert_eq!(
        support::snapshot(files.path()),
        before,
        "the host directory changed"
    );
}

#[test]
fn rw_shares_write_through_to_the_host() {
    let sandbox = Sandbox::new();
    let files = sandbox.files();
    let share = format!("{}:/out:rw", files.path().display());
    let output = sandbox.run(&[
        "run",
        "--share",
        &share,
        "--",
        "sh",
        "-c",
        "echo made > /out/new",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let written = std::fs::read_to_string(files.path().join("new")).expect("the file landed");
    assert_eq!(written, "made\n");
}

#[test]
fn disks_are_attached_by_serial_and_writable_unless_ro() {
    let sandbox = Sandbox::new();
    let files = sandbox.files();
    let image = files.path().join("disk.img");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..8].copy_from_slice(b"DISKDATA");
    std::fs::write(&image, &bytes).expect("image");
    let disk = image.display().to_string();
    let output = sandbox.run(&[
        "run", "--disk", &disk, "--", "sh", "-c",
        "head -c 8 /dev/disk/by-id/virtio-vmette-disk0; \
         printf WRITTEN | dd of=/dev/disk/by-id/virtio-vmette-disk0 bs=1 seek=512 conv=notrunc 2>/dev/null",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), "DISKDATA");
    let after = std::fs::read(&image).expect("read");
    assert_eq!(&after[512..519], b"WRITTEN");

    let read_only = format!("{disk}:ro");
    let output = sandbox.run(&[
        "run", "--disk", &read_only, "--", "sh", "-c",
        "printf NOPE | dd of=/dev/disk/by-id/virtio-vmette-disk0 bs=1 seek=1024 conv=notrunc 2>/dev/null || echo refused",
    ]);
    assert_eq!(stdout(&output), "refused\n", "{}", stderr(&output));
    let after = std::fs::read(&image).expect("read");
    assert_eq!(&after[1024..1028], &[0u8; 4]);
}

#[test]
fn scratch_disk_holds_the_root_writes() {
    let sandbox = Sandbox::new();
    let output = sandbox.run(&[
        "run",
        "--scratch",
        "64M",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/big bs=1M count=40 2>/dev/null && ls -l /big | awk '{print $5}'; \
         df -k / | awk 'NR==2 {print $2}'",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("41943040"), "{text}");
    // The overlay's size is the scratch disk's, not a share of guest memory.
    let blocks: u64 = lines.next().and_then(|l| l.parse().ok()).expect("df size");
    assert!(
        (50_000..70_000).contains(&blocks),
        "overlay size {blocks} KiB"
    );
}

#[test]
fn directory_rootfs_is_protected_unless_rootfs_rw() {
    let sandbox = Sandbox::new();
    let files = sandbox.files();
    let tree = files.path().join("tree");
    support::busybox_tree(&tree);
    let before = support::snapshot(&tree);
    let root = tree.display().to_string();
    let output = sandbox.run(&[
        "run",
        "--rootfs",
        &root,
        "--",
        "sh",
        "-c",
        "cat /etc/marker; echo new > /etc/new; cat /etc/new",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), "from-the-tree\nnew\n");
    assert_eq!(
        support::snapshot(&tree),
        before,
        "the overlay leaked to the host"
    );

    let output = sandbox.run(&[
        "run",
        "--rootfs",
        &root,
        "--rootfs-rw",
        "--",
        "sh",
        "-c",
        "echo kept > /etc/new",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(
        std::fs::read_to_string(tree.join("etc/new")).expect("new"),
        "kept\n"
    );
}

#[test]
fn image_rootfs_is_never_written() {
    let sandbox = Sandbox::new();
    let files = sandbox.files();
    let tree = files.path().join("tree");
    support::busybox_tree(&tree);
    let image = files.path().join("root.erofs");
    let status = std::process::Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(&tree)
        .status()
        .expect("mkfs.erofs from setup.sh");
    assert!(status.success());
    let before = std::fs::read(&image).expect("image");
    let root = image.display().to_string();
    let output = sandbox.run(&[
        "run",
        "--rootfs",
        &root,
        "--",
        "sh",
        "-c",
        "cat /etc/marker; echo x > /etc/marker; cat /etc/marker",
    ]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(stdout(&output), "from-the-tree\nx\n");
    assert_eq!(std::fs::read(&image).expect("image"), before);
}

#[test]
fn bad_input_exits_125_with_one_sentence_and_starts_nothing() {
    let sandbox = Sandbox::new();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--kernel", "/nonexistent/vmlinuz", "--", "true"],
            "kernel",
        ),
        (
            &["run", "--share", "/nonexistent/dir:/data", "--", "true"],
            "share",
        ),
        (&["run", "--env", "NOEQUALS", "--", "true"], "--env"),
        (&["run", "--share", "/tmp", "--", "true"], "--share"),
        (&["run", "--memory", "0", "--", "true"], "memory"),
        (&["run", "--frobnicate", "--", "true"], "--frobnicate"),
        (&["run", "--timeout", "soon", "--", "true"], "--timeout"),
        (&["run"], "command"),
    ];
    for (args, topic) in cases {
        let output = sandbox.run(args);
        let message = stderr(&output);
        assert_eq!(code(&output), 125, "{args:?}: {message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{args:?}: {message}");
        assert!(
            message.contains(topic),
            "{args:?} should name {topic}: {message}"
        );
        assert!(stdout(&output).is_empty());
    }
}

#[test]
fn ctrl_c_reaches_the_guest_command_first() {
    let sandbox = Sandbox::new();
    let mut child = sandbox
        .command(&[
            "run",
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.1; done",
        ])
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("line").expect("read"), "ready");
    // SAFETY: kill() with a pid we own has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = support::wait_status(&mut child, Duration::from_secs(60));
    assert_eq!(rest, vec!["got-int".to_string()]);
    assert_eq!(status.code(), Some(3));
    sandbox.assert_clean();
}

#[test]
fn kill_9_of_vmette_leaves_nothing_behind() {
    let sandbox = Sandbox::new();
    let files = sandbox.files();
    let share = format!("{}:/data", files.path().display());
    let mut child = sandbox
        .command(&[
            "run",
            "--share",
            &share,
            "--scratch",
            "32M",
            "--",
            "sh",
            "-c",
            "echo ready; sleep 60",
        ])
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("line").expect("read"), "ready");
    if support::engine_name() == "qemu" {
        // The helpers this test must see die.
        let running = support::processes_referring_to(sandbox.path());
        assert!(
            running.iter().any(|(_, cmd)| cmd.contains("qemu-system"))
                && running.iter().any(|(_, cmd)| cmd.contains("virtiofsd")),
            "expected qemu and virtiofsd while running: {running:?}"
        );
    }
    child.kill().expect("SIGKILL vmette");
    let _ = child.wait();
    sandbox.assert_clean();
}

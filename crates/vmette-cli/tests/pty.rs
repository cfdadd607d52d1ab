//! `vmette shell` on a real terminal: tmux plays the person at the
//! keyboard (`send-keys`) and reads the screen (`capture-pane`). The shell
//! shows a prompt, evaluates what is typed, follows a window resize, takes
//! Ctrl-C for its foreground command without dying, and exits with its own
//! code; the host terminal's settings are the same afterwards, also when
//! the VM is killed from outside.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::Sandbox;

const PROMPT: &str = "root@vmette:/#";

/// A tmux server of the test's own, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(script: &Path) -> Tmux {
        let tmux = Tmux {
            socket: format!("vmette-pty-{}-{}", std::process::id(), rand_suffix()),
        };
        tmux.ok(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "100",
            "-y",
            "30",
            &format!("sh {}", script.display()),
        ]);
        tmux
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux (installed by setup.sh --with-test-tools)");
        assert!(output.status.success(), "tmux {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.ok(&args);
    }

    fn screen(&self) -> String {
        self.ok(&["capture-pane", "-t", "t", "-p"])
    }

    /// Waits until the screen satisfies `what`.
    fn wait_for(&self, what: impl Fn(&str) -> bool, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen();
            if what(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn prompts(screen: &str) -> usize {
    screen
        .lines()
        .filter(|line| line.starts_with(PROMPT))
        .count()
}

/// A script for the pane: the host terminal's settings before and after
/// `vmette shell`, and its exit status.
fn pane_script(sandbox: &Sandbox, files: &Path) -> std::path::PathBuf {
    script_around(sandbox, files, "", "VMETTE shell", "")
}

/// A pane script that records the terminal's settings around `main` (with
/// `VMETTE` standing for the binary, run with the sandbox's TMPDIR) and its
/// exit status; `before` and `after` run around all that.
fn script_around(
    sandbox: &Sandbox,
    files: &Path,
    before: &str,
    main: &str,
    after: &str,
) -> std::path::PathBuf {
    let script = files.join("pane.sh");
    let vmette = format!(
        "TMPDIR={} XDG_RUNTIME_DIR={}/run {}",
        sandbox.path().display(),
        files.display(),
        support::vmette_bin().display()
    );
    let [before, main, after] = [before, main, after].map(|line| line.replace("VMETTE", &vmette));
    std::fs::write(
        &script,
        format!(
            "{before}\nstty -g > {files}/before\n{main}\necho $? > {files}/status\nstty -g > {files}/after\n{after}\necho PANE-DONE\nsleep 600\n",
            files = files.display(),
        ),
    )
    .expect("write the pane script");
    script
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn an_interactive_shell_behaves_like_one() {
    let sandbox = Sandbox::new();
    let files = sandbox.files();
    let tmux = Tmux::start(&pane_script(&sandbox, files.path()));
    let boot = Duration::from_secs(120);
    let step = Duration::from_secs(30);

    tmux.wait_for(|s| prompts(s) == 1, boot);
    tmux.keys(&["echo $((6*7))", "Enter"]);
    let screen = tmux.wait_for(|s| prompts(s) == 2, step);
    assert!(screen.lines().any(|l| l == "42"), "{screen}");

    tmux.keys(&["stty size", "Enter"]);
    let screen = tmux.wait_for(|s| prompts(s) == 3, step);
    assert!(screen.lines().any(|l| l == "30 100"), "{screen}");
    tmux.ok(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux.keys(&["stty size", "Enter"]);
    let screen = tmux.wait_for(|s| prompts(s) == 4, step);
    assert!(
        screen.lines().any(|l| l == "40 120"),
        "the guest's terminal did not follow the resize:\n{screen}"
    );

    tmux.keys(&["sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_secs(1));
    tmux.keys(&["C-c"]);
    tmux.wait_for(|s| prompts(s) == 5, step);
    tmux.keys(&["echo still-here", "Enter"]);
    let screen = tmux.wait_for(|s| prompts(s) == 6, step);
    assert!(
        screen.lines().any(|l| l == "still-here"),
        "Ctrl-C ended more than sleep:\n{screen}"
    );

    tmux.keys(&["exit 3", "Enter"]);
    tmux.wait_for(|s| s.contains("PANE-DONE"), step);
    assert_eq!(read(&files.path().join("status")).trim(), "3");
    let before = read(&files.path().join("before"));
    assert!(!before.is_empty());
    assert_eq!(
        before,
        read(&files.path().join("after")),
        "the host terminal's settings changed"
    );
    drop(tmux);
    sandbox.assert_clean();
}

#[test]
fn exec_it_through_the_daemon_behaves_like_a_shell() {
    let sandbox = Sandbox::new();
    let files = sandbox.files();
    let script = script_around(
        &sandbox,
        files.path(),
        "VMETTE create --name pty > /dev/null",
        "VMETTE exec -it pty -- bash -l",
        "VMETTE daemon stop",
    );
    let tmux = Tmux::start(&script);
    let step = Duration::from_secs(30);

    tmux.wait_for(|s| prompts(s) == 1, Duration::from_secs(120));
    tmux.keys(&["echo $((6*7))", "Enter"]);
    let screen = tmux.wait_for(|s| prompts(s) == 2, step);
    assert!(screen.lines().any(|l| l == "42"), "{screen}");
    tmux.ok(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux.keys(&["stty size", "Enter"]);
    let screen = tmux.wait_for(|s| prompts(s) == 3, step);
    assert!(screen.lines().any(|l| l == "40 120"), "{screen}");
    tmux.keys(&["sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_secs(1));
    tmux.keys(&["C-c"]);
    tmux.wait_for(|s| prompts(s) == 4, step);
    tmux.keys(&["exit 3", "Enter"]);
    tmux.wait_for(|s| s.contains("PANE-DONE"), Duration::from_secs(60));
    assert_eq!(read(&files.path().join("status")).trim(), "3");
    assert_eq!(
        read(&files.path().join("before")),
        read(&files.path().join("after")),
        "the host terminal's settings changed"
    );
    drop(tmux);
    sandbox.assert_clean();
}

#[test]
fn the_terminal_is_restored_when_the_vm_is_killed_from_outside() {
    let sandbox = Sandbox::new();
    let files = sandbox.files();
    let tmux = Tmux::start(&pane_script(&sandbox, files.path()));
    tmux.wait_for(|s| prompts(s) == 1, Duration::from_secs(120));

    let qemu: Vec<u32> = support::processes_referring_to(sandbox.path())
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect();
    if support::engine_name() == "qemu" {
        assert!(!qemu.is_empty(), "no QEMU process found for the shell");
    }
    for pid in qemu {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    tmux.wait_for(|s| s.contains("PANE-DONE"), Duration::from_secs(30));
    assert_eq!(read(&files.path().join("status")).trim(), "125");
    assert_eq!(
        read(&files.path().join("before")),
        read(&files.path().join("after")),
        "the host terminal was left in raw mode"
    );
    drop(tmux);
    sandbox.assert_clean();
}

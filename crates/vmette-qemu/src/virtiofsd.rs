//! One `virtiofsd` per share. It serves a single QEMU connection and exits
//! when QEMU disconnects. `--readonly` makes the host refuse every write,
//! whatever the guest mounts or remounts.
//!
//! As root it runs directly. As an ordinary user it runs inside a user
//! namespace where the user is root (`unshare --map-root-user`), with the
//! user's subordinate ids mapped too when `/etc/subuid` grants any
//! (`--map-auto`), so the guest can `chown` to other ids.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmette_core::engine::{EngineError, ShareSpec};
use vmette_core::process::{spawn_helper, HelperProcess, Watchdog};

use vmette_core::assets::host_tool;

use crate::find;

/// How long virtiofsd gets to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// Starts virtiofsd for `share`, listening on `socket`, and waits for the
/// socket to appear.
pub fn start(
    share: &ShareSpec,
    socket: &Path,
    log: &Path,
    watchdog: &Watchdog,
) -> Result<HelperProcess, EngineError> {
    let program = find("virtiofsd", "VMETTE_VIRTIOFSD").ok_or_else(|| EngineError::Spawn {
        program: "virtiofsd".into(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "not installed; run ./setup.sh or `cargo install virtiofsd --locked`",
        ),
    })?;
    let mut command = if host_tool::is_root() {
        Command::new(&program)
    } else {
        let mut wrapper =
            Command::new(host_tool::locate("unshare").unwrap_or_else(|| "unshare".into()));
        wrapper.arg("--map-root-user");
        if has_subordinate_ids() {
            wrapper.arg("--map-auto");
        }
        wrapper.arg("--").arg(&program);
        wrapper
    };
    command
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", share.path.display()))
        .args(["--sandbox=namespace", "--log-level=error"]);
    if share.read_only {
        command.arg("--readonly");
    }
    let log_file = File::create(log).map_err(|source| EngineError::Io {
        context: "cannot create the virtiofsd log".into(),
        source,
    })?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    let mut helper =
        spawn_helper("virtiofsd", &mut command, watchdog).map_err(|source| EngineError::Spawn {
            program: program.display().to_string(),
            source,
        })?;

    let deadline = Instant::now() + SOCKET_WAIT;
    while !socket.exists() {
        if helper.has_exited() {
            return Err(EngineError::EarlyExit {
                program: "virtiofsd".into(),
                output: std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            });
        }
        if Instant::now() >= deadline {
            return Err(EngineError::EarlyExit {
                program: "virtiofsd".into(),
                output: format!("no socket after {SOCKET_WAIT:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(helper)
}

/// Whether `/etc/subuid` grants this user subordinate ids.
fn has_subordinate_ids() -> bool {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let name = user_name(uid);
    std::fs::read_to_string("/etc/subuid")
        .map(|text| {
            text.lines().any(|line| {
                let owner = line.split(':').next().unwrap_or_default();
                owner == uid.to_string() || Some(owner) == name.as_deref()
            })
        })
        .unwrap_or(false)
}

fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id == uid.to_string()).then(|| name.to_string())
    })
}

/// Where virtiofsd's log for share `index` goes.
pub fn log_path(run_dir: &Path, index: usize) -> PathBuf {
    run_dir.join(format!("virtiofsd{index}.log"))
}

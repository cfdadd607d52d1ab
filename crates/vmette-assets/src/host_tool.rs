//! Finds host programs, including the ones Debian keeps in `sbin`, which is
//! not on an ordinary user's `PATH` (`mkfs.ext4`), and the ones set-up puts
//! in `/usr/local/bin` (`virtiofsd`).

use std::path::PathBuf;

const EXTRA_DIRS: &[&str] = &["/usr/local/bin", "/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The path of `program`: from `PATH` first, then the usual system
/// directories. `None` when it is nowhere.
pub fn locate(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// True when this process runs as root, so tools need no user namespace.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_not_nonsense() {
        assert!(locate("sh").is_some());
        assert!(locate("no-such-program-vmette").is_none());
    }
}

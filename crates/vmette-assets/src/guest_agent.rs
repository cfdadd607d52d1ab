//! Finds the static `vmette-guest` binary that becomes the VM's `/init`.

use std::path::{Path, PathBuf};

use crate::AssetError;

/// Environment variable naming the agent binary explicitly.
pub const ENV_VAR: &str = "VMETTE_GUEST_AGENT";

/// The Rust target the agent is built for on this host architecture.
pub fn target_triple() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "aarch64-unknown-linux-musl"
    } else {
        "x86_64-unknown-linux-musl"
    }
}

/// Looks for the agent: `$VMETTE_GUEST_AGENT`; in `../lib/vmette/` of an
/// installed prefix; and in the cargo target directory the executable was
/// built in (for development). A candidate must be a static executable:
/// a host build of the agent (cargo builds one for the workspace) cannot
/// run as PID 1 of an initramfs with no dynamic loader.
pub fn locate() -> Result<PathBuf, AssetError> {
    let mut candidates = Vec::new();
    if let Some(explicit) = std::env::var_os(ENV_VAR).filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(explicit));
    } else if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.extend(candidates_near(dir));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file() && is_static_executable(p))
        .cloned()
        .ok_or_else(|| AssetError::GuestAgentMissing {
            searched: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn candidates_near(exe_dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![exe_dir.join("../lib/vmette/vmette-guest")];
    // target/<profile>/vmette or target/<profile>/deps/test-binary
    for up in [exe_dir.parent(), exe_dir.parent().and_then(Path::parent)]
        .into_iter()
        .flatten()
    {
        out.push(up.join(target_triple()).join("release-guest/vmette-guest"));
    }
    out
}

/// True for an ELF executable without a program interpreter.
fn is_static_executable(path: &Path) -> bool {
    use object::read::elf::{ElfFile64, ProgramHeader};
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let Ok(elf) = ElfFile64::<object::Endianness>::parse(&*bytes) else {
        return false;
    };
    let endian = elf.endian();
    !elf.elf_program_headers()
        .iter()
        .any(|header| header.p_type(endian) == object::elf::PT_INTERP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamically_linked_binaries_are_not_agents() {
        // This test binary itself is dynamically linked.
        let me = std::env::current_exe().expect("current exe");
        assert!(!is_static_executable(&me));
        assert!(!is_static_executable(Path::new("/nonexistent")));
    }

    #[test]
    fn looks_in_the_cargo_target_dir_for_development_builds() {
        let found = candidates_near(Path::new("/w/target/release/deps"));
        assert!(
            found.contains(&PathBuf::from(
                "/w/target/x86_64-unknown-linux-musl/release-guest/vmette-guest"
            )) || cfg!(target_arch = "aarch64")
        );
        assert!(!found.contains(&PathBuf::from("/w/target/release/deps/vmette-guest")));
    }
}

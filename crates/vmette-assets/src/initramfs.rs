//! Builds the initramfs every vmette VM boots: the static guest agent as
//! `/init`, the kernel modules it needs, and the order to load them in.
//!
//! The archive is an uncompressed `newc` cpio (the kernel unpacks it faster
//! than a compressed one under emulation) and is cached under a hash of the
//! agent's bytes, the kernel release and the module list, so a new agent or
//! kernel produces a new archive and an unchanged one is reused.

use std::collections::{HashMap, HashSet};

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::kernel::Kernel;
use crate::modinfo;
use crate::{AssetError, Cache};

/// The modules every guest loads, dependencies left out: disks, the
/// control port, virtio-fs and the root file systems. Engines add the ones
/// their devices need (the virtio transport, vsock).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_blk",
    "virtio_console",
    "virtiofs",
    "erofs",
    "squashfs",
    "overlay",
];

/// The network device's driver, loaded only by guests that have a network
/// (`vmette/modules.net`), dependencies left out.
pub const NETWORK_MODULES: &[&str] = &["virtio_net"];

/// Bump when the archive's layout changes, to invalidate cached archives.
const LAYOUT_VERSION: &str = "vmette-initramfs-2";

/// Everything that goes into an initramfs.
struct Inputs<'a> {
    kernel: &'a Kernel,
    agent: Vec<u8>,
    wanted: Vec<&'a str>,
}

impl<'a> Inputs<'a> {
    fn read(
        kernel: &'a Kernel,
        agent: &Path,
        extra_modules: &[&'a str],
    ) -> Result<Self, AssetError> {
        Ok(Inputs {
            kernel,
            agent: fs::read(agent)
                .map_err(AssetError::io(format!("cannot read {}", agent.display())))?,
            wanted: GUEST_MODULES.iter().chain(extra_modules).copied().collect(),
        })
    }

    /// The cache file named by the hash of everything that goes in.
    fn cache_path(&self, cache: &Cache) -> PathBuf {
        let mut hasher = Sha256::new();
        hasher.update(LAYOUT_VERSION);
        hasher.update(&self.agent);
        hasher.update(self.kernel.release.as_bytes());
        hasher.update(
            self.kernel
                .modules
                .as_deref()
                .map(|d| d.as_os_str().as_encoded_bytes())
                .unwrap_or(b"-"),
        );
        hasher.update(self.wanted.join(",").as_bytes());
        let key = hex::encode(hasher.finalize());
        cache
            .root()
            .join("initramfs")
            .join(format!("{}.cpio", &key[..32]))
    }

    /// The archive's bytes.
    fn archive(&self) -> Result<Vec<u8>, AssetError> {
        let (modules, network) = match self.kernel.modules.as_deref() {
            Some(tree) => {
                let always = resolve_load_order(tree, &self.wanted)?;
                let wanted: Vec<&str> =
                    self.wanted.iter().chain(NETWORK_MODULES).copied().collect();
                let network: Vec<_> = resolve_load_order(tree, &wanted)?
                    .into_iter()
                    .filter(|(name, _)| !always.iter().any(|(loaded, _)| loaded == name))
                    .collect();
                (always, network)
            }
            None => (Vec::new(), Vec::new()),
        };
        let mut archive = Archive::default();
        for dir in ["dev", "proc", "sys", "lib", "lib/modules", "vmette", "tmp"] {
            archive.directory(dir);
        }
        archive.char_device("dev/console", 5, 1);
        archive.file("init", 0o755, &self.agent);
        for (list, modules) in [
            ("vmette/modules", &modules),
            ("vmette/modules.net", &network),
        ] {
            let mut order = String::new();
            for (name, file) in modules {
                let bytes = fs::read(file)
                    .map_err(AssetError::io(format!("cannot read {}", file.display())))?;
                archive.file(&format!("lib/modules/{name}.ko"), 0o644, &bytes);
                order.push_str(&format!("{name}.ko\n"));
            }
            archive.file(list, 0o644, order.as_bytes());
        }
        Ok(archive.finish())
    }
}

/// The cached initramfs for `agent` and `kernel` with [`GUEST_MODULES`]
/// and `extra_modules`, built if missing.
pub fn ensure(
    cache: &Cache,
    kernel: &Kernel,
    agent: &Path,
    extra_modules: &[&str],
) -> Result<PathBuf, AssetError> {
    let inputs = Inputs::read(kernel, agent, extra_modules)?;
    let path = inputs.cache_path(cache);
    if path.is_file() {
        return Ok(path);
    }
    let bytes = inputs.archive()?;
    let dir = cache.dir("initramfs")?;
    let mut temp = tempfile::NamedTempFile::new_in(&dir)
        .map_err(AssetError::io("cannot create the initramfs"))?;
    temp.write_all(&bytes)
        .map_err(AssetError::io("cannot write the initramfs"))?;
    // Like the kernel and image beside it, readable by anyone who may read
    // the cache: it holds nothing secret.
    fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o644))
        .map_err(AssetError::io("cannot set the initramfs's permissions"))?;
    temp.persist(&path).map_err(|e| AssetError::Io {
        context: format!("cannot store {}", path.display()),
        source: e.error,
    })?;
    Ok(path)
}

/// Where the initramfs for `agent` and `kernel` with [`GUEST_MODULES`] and
/// `extra_modules` is kept, whether it was built yet or not.
pub fn path_for(
    cache: &Cache,
    kernel: &Kernel,
    agent: &Path,
    extra_modules: &[&str],
) -> Result<PathBuf, AssetError> {
    Ok(Inputs::read(kernel, agent, extra_modules)?.cache_path(cache))
}

/// Orders `wanted` and everything they depend on so that each module comes
/// after its dependencies. Modules built into the kernel (listed in its
/// `modules.builtin`) need no loading and are left out.
fn resolve_load_order(tree: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, AssetError> {
    let index = modinfo::index(tree);
    let mut order = Vec::new();
    let mut seen = modinfo::builtin(tree);
    for name in wanted {
        visit(
            &modinfo::canonical(name),
            tree,
            &index,
            &mut seen,
            &mut order,
        )?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    tree: &Path,
    index: &HashMap<String, PathBuf>,
    seen: &mut HashSet<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<(), AssetError> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    let path = index.get(name).ok_or_else(|| AssetError::ModuleMissing {
        name: name.to_string(),
        dir: tree.to_path_buf(),
    })?;
    for dep in modinfo::depends(path)? {
        visit(&dep, tree, index, seen, order)?;
    }
    order.push((name.to_string(), path.clone()));
    Ok(())
}

/// A `newc` cpio archive built in memory.
#[derive(Default)]
struct Archive {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Archive {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_inode += 1;
        let name_len = name.len() + 1;
        let fields = [
            self.next_inode,
            mode,
            0,
            0,
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name_len as u32,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn directory(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100000 | permissions, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_well_formed() {
        let mut archive = Archive::default();
        archive.directory("dev");
        archive.file("init", 0o755, b"abc");
        let bytes = archive.finish();
        assert!(bytes.len().is_multiple_of(4));
        assert_eq!(&bytes[..6], b"070701");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("TRAILER!!!"));
        // The file entry's header: mode 0100755 and size 3.
        let init = text.find("init").expect("init entry");
        let header = &text[init - 110..init];
        assert_eq!(&header[14..22], "000081ed");
        assert_eq!(&header[54..62], "00000003");
        assert_eq!(&header[94..102], "00000005");
    }

    #[test]
    fn builtin_modules_need_no_file() {
        let tree = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            tree.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio-mmio.ko\n",
        )
        .expect("write");
        let order = resolve_load_order(tree.path(), &["virtio_mmio"]).expect("builtin");
        assert!(order.is_empty());
    }

    #[test]
    fn missing_modules_are_named() {
        let empty = tempfile::tempdir().expect("tempdir");
        let error = resolve_load_order(empty.path(), &["virtio_blk"]).expect_err("missing");
        assert!(matches!(error, AssetError::ModuleMissing { name, .. } if name == "virtio_blk"));
    }
}

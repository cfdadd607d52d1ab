//! What the cache holds, and pruning what no run will use again: kernels
//! older than the newest one, initramfs archives built for an earlier
//! agent or kernel, and the leftovers of interrupted downloads and builds.

use std::fs;
use std::path::{Path, PathBuf};

use crate::kernel::{self, Kernel};
use crate::{guest_agent, initramfs, AssetError, Cache};

/// What a cache entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    /// An unpacked kernel package.
    Kernel,
    /// An initramfs archive.
    Initramfs,
    /// A root file system image.
    Image,
    /// A download or build that never finished.
    Unfinished,
}

impl AssetKind {
    /// The kind's name, as `vmette cache list` prints it.
    pub fn name(self) -> &'static str {
        match self {
            AssetKind::Kernel => "kernel",
            AssetKind::Initramfs => "initramfs",
            AssetKind::Image => "image",
            AssetKind::Unfinished => "unfinished",
        }
    }
}

/// One entry of the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    /// What it is.
    pub kind: AssetKind,
    /// Where it is.
    pub path: PathBuf,
    /// How many bytes its files take.
    pub bytes: u64,
}

/// Every entry of the cache, by kind and then path.
pub fn list(cache: &Cache) -> Vec<Asset> {
    let mut assets = Vec::new();
    for (dir, kind) in [
        ("kernel", AssetKind::Kernel),
        ("initramfs", AssetKind::Initramfs),
        ("images", AssetKind::Image),
    ] {
        let Ok(entries) = fs::read_dir(cache.root().join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let unfinished = name.starts_with('.')
                || (kind == AssetKind::Kernel && !path.join(".complete").is_file());
            assets.push(Asset {
                kind: if unfinished {
                    AssetKind::Unfinished
                } else {
                    kind
                },
                bytes: tree_size(&path),
                path,
            });
        }
    }
    assets.sort_by(|a, b| (a.kind.name(), &a.path).cmp(&(b.kind.name(), &b.path)));
    assets
}

/// Removes what no run will use again and returns it. Kept: the newest
/// kernel of this architecture, the initramfs of that kernel with the
/// guest agent found now and `engine_modules`, every image, and every
/// kernel of another architecture. When the agent cannot be found, every
/// initramfs is kept, since which one is current cannot be told.
pub fn prune(
    cache: &Cache,
    engine_modules: &[&str],
    dry_run: bool,
) -> Result<Vec<Asset>, AssetError> {
    let current_kernel = kernel::cached(cache)?;
    let current_tree = current_kernel.as_ref().and_then(tree_of);
    let current_initramfs = match (&current_kernel, guest_agent::locate()) {
        (Some(kernel), Ok(agent)) => {
            Some(initramfs::path_for(cache, kernel, &agent, engine_modules)?)
        }
        _ => None,
    };
    let flavour = kernel::meta_package().trim_start_matches("linux-image");

    let mut removed = Vec::new();
    for asset in list(cache) {
        let stale = match asset.kind {
            AssetKind::Unfinished => true,
            AssetKind::Kernel => {
                asset.path.to_string_lossy().ends_with(flavour)
                    && current_tree.as_deref() != Some(asset.path.as_path())
            }
            AssetKind::Initramfs => current_initramfs
                .as_deref()
                .is_some_and(|current| current != asset.path),
            AssetKind::Image => false,
        };
        if !stale {
            continue;
        }
        if !dry_run {
            let result = if asset.path.is_dir() {
                fs::remove_dir_all(&asset.path)
            } else {
                fs::remove_file(&asset.path)
            };
            result.map_err(AssetError::io(format!(
                "cannot remove {}",
                asset.path.display()
            )))?;
        }
        removed.push(asset);
    }
    Ok(removed)
}

/// The unpacked package a kernel came from (`<tree>/boot/vmlinuz-*`).
fn tree_of(kernel: &Kernel) -> Option<PathBuf> {
    kernel.image.parent()?.parent().map(Path::to_path_buf)
}

/// Bytes of the regular files under `path` (or of `path` itself).
pub(crate) fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return if meta.is_file() { meta.len() } else { 0 };
    }
    fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| tree_size(&e.path())).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_tree(cache: &Cache, package: &str, release: &str) -> PathBuf {
        let tree = cache.root().join("kernel").join(package);
        fs::create_dir_all(tree.join("boot")).expect("mkdir");
        fs::write(tree.join("boot").join(format!("vmlinuz-{release}")), b"k").expect("kernel");
        fs::write(tree.join(".complete"), package).expect("marker");
        tree
    }

    #[test]
    fn lists_every_kind_and_flags_unfinished_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::at(dir.path());
        kernel_tree(&cache, "linux-image-1-cloud-amd64", "1-cloud-amd64");
        fs::create_dir_all(cache.root().join("kernel/.fetch-abc")).expect("mkdir");
        fs::create_dir_all(cache.root().join("initramfs")).expect("mkdir");
        fs::write(cache.root().join("initramfs/x.cpio"), b"12345").expect("cpio");
        let kinds: Vec<(AssetKind, u64)> = list(&cache).iter().map(|a| (a.kind, a.bytes)).collect();
        assert!(kinds.contains(&(AssetKind::Initramfs, 5)));
        assert!(kinds.iter().any(|(k, _)| *k == AssetKind::Unfinished));
        assert!(kinds.iter().any(|(k, _)| *k == AssetKind::Kernel));
    }

    #[test]
    fn prune_keeps_the_newest_kernel_and_images_and_removes_leftovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::at(dir.path());
        let flavour = kernel::meta_package().trim_start_matches("linux-image-");
        let old = kernel_tree(&cache, &format!("linux-image-1-{flavour}"), "1");
        let new = kernel_tree(&cache, &format!("linux-image-2-{flavour}"), "2");
        let foreign = kernel_tree(&cache, "linux-image-2-cloud-other", "2");
        let unfinished = cache.root().join("images/.build-xyz");
        fs::create_dir_all(&unfinished).expect("mkdir");
        let image = cache.root().join("images/debian-bookworm-minbase.erofs");
        fs::write(&image, b"image").expect("image");

        let preview = prune(&cache, &[], true).expect("dry run");
        assert!(
            old.exists() && unfinished.exists(),
            "a dry run removes nothing"
        );
        let removed: Vec<PathBuf> = prune(&cache, &[], false)
            .expect("prune")
            .into_iter()
            .map(|a| a.path)
            .collect();
        assert_eq!(
            removed,
            preview.into_iter().map(|a| a.path).collect::<Vec<_>>()
        );
        assert!(!old.exists());
        assert!(!unfinished.exists());
        assert!(new.exists() && foreign.exists() && image.exists());
    }
}

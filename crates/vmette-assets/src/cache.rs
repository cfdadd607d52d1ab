use std::path::{Path, PathBuf};

use crate::AssetError;

/// The vmette cache directory: `$VMETTE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/vmette`, else `~/.cache/vmette`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// The cache at its standard place for this user.
    pub fn locate() -> Result<Cache, AssetError> {
        let from_env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let root = if let Some(dir) = from_env("VMETTE_CACHE_DIR") {
            PathBuf::from(dir)
        } else if let Some(dir) = from_env("XDG_CACHE_HOME") {
            PathBuf::from(dir).join("vmette")
        } else if let Some(home) = from_env("HOME") {
            PathBuf::from(home).join(".cache").join("vmette")
        } else {
            return Err(AssetError::NoCacheDir);
        };
        Ok(Cache { root })
    }

    /// A cache rooted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A subdirectory, created if missing.
    pub(crate) fn dir(&self, name: &str) -> Result<PathBuf, AssetError> {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(AssetError::io(format!("cannot create {}", dir.display())))?;
        Ok(dir)
    }

    /// Total bytes of regular files under the cache.
    pub fn size_bytes(&self) -> u64 {
        crate::inventory::tree_size(&self.root)
    }
}

//! The content-addressed store under the cache directory:
//!
//! ```text
//! store/blobs/sha256/HEX   verified blobs: manifests, configs, layers
//! store/roots/KEY.sqfs     read-only roots, one per set of layers
//! store/refs/HASH.json     a name (docker.io/library/python:3.12,
//!                          file:///…/root.tar) and the image it names
//! store/tmp/               work in progress, renamed into place when done
//! ```
//!
//! Everything is written to `tmp/` first and renamed, so a reader sees a
//! whole file or none.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ImageError;

/// What the store knows of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The name it was stored under.
    pub name: String,
    /// Digest of its manifest (of the file, for a tarball).
    pub digest: String,
    /// Digest of its config blob; `None` for a tarball.
    pub config: Option<String>,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// Key of its root under `roots/`.
    pub root: String,
    /// Size, inode and change time of a tarball when it was converted,
    /// so an unchanged file is not hashed again.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// The image store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store under `cache`, its directories created if missing.
    pub fn open(cache: &vmette_core::assets::Cache) -> Result<Store, ImageError> {
        let store = Store {
            root: cache.root().join("store"),
        };
        for dir in ["blobs/sha256", "roots", "refs", "tmp"] {
            let path = store.root.join(dir);
            fs::create_dir_all(&path).map_err(ImageError::store(format!(
                "cannot create {}",
                path.display()
            )))?;
        }
        Ok(store)
    }

    /// Path of a blob, present or not.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("blobs/sha256").join(hex)
    }

    /// Path of a root, present or not.
    pub fn root_path(&self, key: &str) -> PathBuf {
        self.root.join("roots").join(format!("{key}.sqfs"))
    }

    /// A new temporary file in the store, removed unless persisted.
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile, ImageError> {
        tempfile::Builder::new()
            .prefix(".part-")
            .tempfile_in(self.root.join("tmp"))
            .map_err(ImageError::store("cannot create a file in the image store"))
    }

    /// Moves a finished temporary file to `target`.
    pub fn persist(&self, file: tempfile::NamedTempFile, target: &Path) -> Result<(), ImageError> {
        file.persist(target)
            .map(drop)
            .map_err(|e| ImageError::Store {
                context: format!("cannot store {}", target.display()),
                source: e.error,
            })
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        let hash = hex::encode(Sha256::digest(name.as_bytes()));
        self.root.join("refs").join(format!("{hash}.json"))
    }

    /// The image stored under `name`, if it and its root are all there.
    pub fn lookup(&self, name: &str) -> Option<ImageRecord> {
        let text = fs::read(self.ref_path(name)).ok()?;
        let record: ImageRecord = serde_json::from_slice(&text).ok()?;
        let whole = record.name == name
            && self.root_path(&record.root).is_file()
            && record
                .config
                .as_deref()
                .is_none_or(|c| self.blob_path(c).is_file());
        whole.then_some(record)
    }

    /// Records `record` under its name, replacing what was there.
    pub fn record(&self, record: &ImageRecord) -> Result<(), ImageError> {
        let mut file = self.temp_file()?;
        let json = serde_json::to_vec_pretty(record).map_err(|e| ImageError::Store {
            context: "cannot encode an image record".into(),
            source: std::io::Error::other(e),
        })?;
        file.write_all(&json)
            .map_err(ImageError::store("cannot write an image record"))?;
        self.persist(file, &self.ref_path(&record.name))
    }
}

/// The key of the root that `layers` (bottom first) make.
pub fn root_key(layers: &[String]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"vmette root v1\n");
    for layer in layers {
        hash.update(layer.as_bytes());
        hash.update(b"\n");
    }
    hex::encode(hash.finalize())
}

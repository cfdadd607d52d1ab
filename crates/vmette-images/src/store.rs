//! The content-addressed store under the cache directory:
//!
//! ```text
//! store/blobs/sha256/HEX   verified blobs: manifests, configs, layers
//! store/roots/KEY.sqfs     read-only roots, one per set of layers
//! store/refs/HASH.json     a name (docker.io/library/python:3.12,
//!                          file:///…/root.tar, preset:python) and the
//!                          image it names; its mtime is the last use
//! store/tmp/               work in progress, renamed into place when done
//! store/lock               the store's lock (below)
//! ```
//!
//! Many processes use one store at once (runs, pulls, a daemon's sessions,
//! a prune), so nothing relies on one process's view of it:
//!
//! * Everything is written to `tmp/` first and renamed, so a reader sees a
//!   whole file or none; two pulls of one image rename identical files
//!   onto one name and leave one copy.
//! * `lock` is held shared by every reader and writer while it works, and
//!   exclusively by whatever removes (`rmi`, `prune`, the sweep of
//!   `tmp/`), so nothing is removed under a pull that is about to record
//!   it, nor between a run's lookup and its lease.
//! * Each file or build directory in `tmp/` is locked by the process that
//!   writes it; the sweep removes only those whose writer is gone (killed
//!   half-way), so the next pull restarts cleanly and leaves nothing.
//! * A run holds a shared lock on its root ([`RootLease`]) for as long as
//!   its VM lives; a removal skips a root it cannot lock exclusively.

use std::fs::{self, File, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ImageError;

/// Largest ref file read back; ours are a few hundred bytes.
const RECORD_LIMIT: u64 = 1 << 20;

/// What the store knows of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The name it was stored under.
    pub name: String,
    /// Digest of its manifest (of the file, for a tarball; of the recipe,
    /// for a preset).
    pub digest: String,
    /// Digest of its config blob; `None` for a tarball or a preset.
    pub config: Option<String>,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// Key of its root under `roots/`.
    pub root: String,
    /// What the source was when it was stored (a tarball's size, inode and
    /// change time; a preset's recipe), so an unchanged source is not
    /// read or built again.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// When it was stored, seconds since the epoch.
    #[serde(default)]
    pub stored: u64,
}

/// The image store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A hold on the store's lock, shared or exclusive; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// A VM's hold on its root: a shared lock on the file, so that no removal
/// frees it while the VM reads it. Released on drop.
#[derive(Debug)]
pub struct RootLease {
    _file: File,
}

/// A build directory in `tmp/`, removed on drop, and locked while it lives
/// so that the sweep leaves it alone.
#[derive(Debug)]
pub struct WorkDir {
    dir: tempfile::TempDir,
    // Dropped after the directory is removed, so the sweep never sees it
    // unlocked.
    _lock: File,
}

impl WorkDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// One thing a removal freed (or would not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removed {
    /// `image`, `root`, `blob` or `temp`.
    pub kind: &'static str,
    /// The image's name, the root's key, the blob's digest, or the file.
    pub name: String,
    /// Bytes it took on disk.
    pub bytes: u64,
}

/// What a removal did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Removal {
    /// What was removed.
    pub freed: Vec<Removed>,
    /// Roots kept because a VM uses them.
    pub in_use: Vec<Removed>,
}

impl Removal {
    /// Bytes freed in all.
    pub fn freed_bytes(&self) -> u64 {
        self.freed.iter().map(|r| r.bytes).sum()
    }
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

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn lock_file(&self) -> Result<File, ImageError> {
        let path = self.root.join("lock");
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ImageError::store(format!("cannot open {}", path.display())))
    }

    /// The lock, shared: for reading the store, or adding to it.
    pub fn shared(&self) -> Result<StoreLock, ImageError> {
        let file = self.lock_file()?;
        file.lock_shared()
            .map_err(ImageError::store("cannot lock the image store"))?;
        Ok(StoreLock { _file: file })
    }

    /// The lock, shared, for a process about to write: when no one else
    /// uses the store, what killed writers left in `tmp/` is swept first.
    pub fn writing(&self) -> Result<StoreLock, ImageError> {
        let file = self.lock_file()?;
        if file.try_lock().is_ok() {
            self.sweep();
        }
        // Turning an exclusive lock into a shared one may let another
        // process in between; nothing here depends on who comes first.
        file.lock_shared()
            .map_err(ImageError::store("cannot lock the image store"))?;
        Ok(StoreLock { _file: file })
    }

    /// The lock, exclusive: for removing. `waiting` is called once if
    /// another process holds the lock (a pull, say) and this must wait.
    pub fn exclusive(&self, waiting: &dyn Fn()) -> Result<StoreLock, ImageError> {
        let file = self.lock_file()?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                waiting();
                file.lock()
                    .map_err(ImageError::store("cannot lock the image store"))?;
            }
            Err(TryLockError::Error(e)) => {
                return Err(ImageError::Store {
                    context: "cannot lock the image store".into(),
                    source: e,
                })
            }
        }
        Ok(StoreLock { _file: file })
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

    /// A new temporary file in the store, locked by this process and
    /// removed unless persisted.
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile, ImageError> {
        // Made and locked under the store's lock, so the sweep (which
        // holds it exclusively) never takes it for a dead writer's.
        let _held = self.shared()?;
        let file = tempfile::Builder::new()
            .prefix(".part-")
            .tempfile_in(self.root.join("tmp"))
            .map_err(ImageError::store("cannot create a file in the image store"))?;
        file.as_file().try_lock().map_err(|e| ImageError::Store {
            context: "cannot lock a file in the image store".into(),
            source: std::io::Error::other(e),
        })?;
        Ok(file)
    }

    /// A new build directory in the store, removed on drop.
    pub fn work_dir(&self) -> Result<WorkDir, ImageError> {
        let _held = self.shared()?;
        let dir = tempfile::Builder::new()
            .prefix(".build-")
            .tempdir_in(self.root.join("tmp"))
            .map_err(ImageError::store(
                "cannot create a directory in the image store",
            ))?;
        let lock = File::create(dir.path().join("lock"))
            .map_err(ImageError::store("cannot create a file in the image store"))?;
        lock.try_lock().map_err(|e| ImageError::Store {
            context: "cannot lock a directory in the image store".into(),
            source: std::io::Error::other(e),
        })?;
        Ok(WorkDir { dir, _lock: lock })
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

    /// Moves a finished temporary file to `target` unless a file is there
    /// already, which is then kept (and this one dropped).
    pub fn persist_new(
        &self,
        file: tempfile::NamedTempFile,
        target: &Path,
    ) -> Result<(), ImageError> {
        match file.persist_noclobber(target) {
            Ok(_) => Ok(()),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(ImageError::Store {
                context: format!("cannot store {}", target.display()),
                source: e.error,
            }),
        }
    }

    /// Removes what writers that are gone left in `tmp/`. The caller holds
    /// the store's lock exclusively.
    fn sweep(&self) -> Vec<Removed> {
        let mut removed = Vec::new();
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return removed;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // Nothing here is followed or opened but a writer's own kind
            // of entry: a FIFO would block the open, a symlink lead out.
            let Ok(kind) = fs::symlink_metadata(&path).map(|m| m.file_type()) else {
                continue;
            };
            let is_dir = kind.is_dir();
            let abandoned = if is_dir {
                // A build directory without its lock file is one whose
                // writer died before making it.
                open_regular(&path.join("lock"), false).is_none_or(|f| f.try_lock().is_ok())
            } else if kind.is_file() {
                open_regular(&path, false).is_some_and(|f| f.try_lock().is_ok())
            } else {
                true
            };
            if !abandoned {
                continue;
            }
            let bytes = crate::disk_usage(&path);
            let gone = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match gone {
                Ok(()) => removed.push(Removed {
                    kind: "temp",
                    name: path.display().to_string(),
                    bytes,
                }),
                Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
            }
        }
        removed
    }

    /// A lease on the root at `path` for a VM that will read it.
    pub fn lease(&self, path: &Path) -> Result<RootLease, ImageError> {
        let file = open_regular(path, false).ok_or_else(|| ImageError::Store {
            context: format!("cannot open {}", path.display()),
            source: std::io::Error::other("it is not a regular file"),
        })?;
        file.lock_shared()
            .map_err(ImageError::store(format!("cannot lock {}", path.display())))?;
        Ok(RootLease { _file: file })
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        let hash = hex::encode(Sha256::digest(name.as_bytes()));
        self.root.join("refs").join(format!("{hash}.json"))
    }

    /// The record in `path`, if it is one whose names are all a store's
    /// own (a root key and digests of hex), so that a tampered ref cannot
    /// lead a removal out of the store.
    fn read_record(path: &Path) -> Option<ImageRecord> {
        let mut text = Vec::new();
        open_regular(path, false)?
            .take(RECORD_LIMIT)
            .read_to_end(&mut text)
            .ok()?;
        let record: ImageRecord = serde_json::from_slice(&text).ok()?;
        let sound = is_hex64(&record.root)
            && record
                .layers
                .iter()
                .chain(&record.config)
                .chain([&record.digest])
                .all(|d| d.strip_prefix("sha256:").is_some_and(is_hex64));
        sound.then_some(record)
    }

    /// The image stored under `name`, if it and its root are all there.
    pub fn lookup(&self, name: &str) -> Option<ImageRecord> {
        let record = Store::read_record(&self.ref_path(name))?;
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
        let mut record = record.clone();
        record.stored = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut file = self.temp_file()?;
        let json = serde_json::to_vec_pretty(&record).map_err(|e| ImageError::Store {
            context: "cannot encode an image record".into(),
            source: std::io::Error::other(e),
        })?;
        file.write_all(&json)
            .map_err(ImageError::store("cannot write an image record"))?;
        self.persist(file, &self.ref_path(&record.name))
    }

    /// Notes that the image `name` was used now.
    pub fn touch(&self, name: &str) {
        let used = open_regular(&self.ref_path(name), true)
            .ok_or_else(|| std::io::Error::other("not a regular file"))
            .and_then(|file| file.set_modified(SystemTime::now()));
        if let Err(e) = used {
            tracing::debug!("cannot note the use of {name}: {e}");
        }
    }

    /// When the image `name` was last used (or stored).
    pub fn last_used(&self, name: &str) -> Option<SystemTime> {
        fs::metadata(self.ref_path(name)).ok()?.modified().ok()
    }

    /// Every image recorded, by name.
    pub fn records(&self) -> Vec<ImageRecord> {
        let mut records: Vec<ImageRecord> = fs::read_dir(self.root.join("refs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| Store::read_record(&entry.path()))
            .filter(|record| self.ref_path(&record.name).exists())
            .collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    /// Bytes the image takes: its root and every blob it names.
    pub fn image_bytes(&self, record: &ImageRecord) -> u64 {
        let blobs = self.blobs_of(record);
        let blob_bytes: u64 = blobs
            .iter()
            .map(|d| crate::disk_usage(&self.blob_path(d)))
            .sum();
        blob_bytes + crate::disk_usage(&self.root_path(&record.root))
    }

    fn blobs_of(&self, record: &ImageRecord) -> Vec<String> {
        let mut blobs = record.layers.clone();
        blobs.extend(record.config.iter().cloned());
        if self.blob_path(&record.digest).is_file() && !blobs.contains(&record.digest) {
            blobs.push(record.digest.clone());
        }
        blobs
    }

    /// Removes the image `name`; its root and blobs go too unless another
    /// image names them or a VM uses the root (then a later
    /// [`Store::prune`] frees them). `None` if no such image is stored.
    pub fn remove(&self, name: &str, waiting: &dyn Fn()) -> Result<Option<Removal>, ImageError> {
        let _held = self.exclusive(waiting)?;
        let Some(record) = Store::read_record(&self.ref_path(name)).filter(|r| r.name == name)
        else {
            return Ok(None);
        };
        let bytes = crate::disk_usage(&self.ref_path(name));
        fs::remove_file(self.ref_path(name))
            .map_err(ImageError::store(format!("cannot remove {name}")))?;
        let mut removal = Removal::default();
        removal.freed.push(Removed {
            kind: "image",
            name: name.to_string(),
            bytes,
        });
        let others = self.records();
        self.free_unreferenced(
            &others,
            Some(std::slice::from_ref(&record.root)),
            Some(&self.blobs_of(&record)),
            &mut removal,
        );
        Ok(Some(removal))
    }

    /// Frees what no image names: roots (unless a VM uses them), blobs and
    /// abandoned work. With `all`, every image whose root no VM uses goes
    /// first, presets included.
    pub fn prune(&self, all: bool, waiting: &dyn Fn()) -> Result<Removal, ImageError> {
        let _held = self.exclusive(waiting)?;
        let mut removal = Removal {
            freed: self.sweep(),
            in_use: Vec::new(),
        };
        let mut kept = Vec::new();
        for record in self.records() {
            if !all || self.in_use(&self.root_path(&record.root)) {
                kept.push(record);
                continue;
            }
            let path = self.ref_path(&record.name);
            let bytes = crate::disk_usage(&path);
            match fs::remove_file(&path) {
                Ok(()) => removal.freed.push(Removed {
                    kind: "image",
                    name: record.name.clone(),
                    bytes,
                }),
                Err(e) => {
                    tracing::warn!("cannot remove {}: {e}", path.display());
                    kept.push(record);
                }
            }
        }
        self.free_unreferenced(&kept, None, None, &mut removal);
        Ok(removal)
    }

    /// Removes roots and blobs that no record in `kept` names, among
    /// `roots` and `blobs` (every one in the store when `None`).
    fn free_unreferenced(
        &self,
        kept: &[ImageRecord],
        roots: Option<&[String]>,
        blobs: Option<&[String]>,
        removal: &mut Removal,
    ) {
        let named_roots: Vec<&str> = kept.iter().map(|r| r.root.as_str()).collect();
        let named_blobs: Vec<String> = kept.iter().flat_map(|r| self.blobs_of(r)).collect();
        let root_keys: Vec<String> = match roots {
            Some(keys) => keys.to_vec(),
            None => list_names(&self.root.join("roots"))
                .into_iter()
                .filter_map(|n| n.strip_suffix(".sqfs").map(String::from))
                .collect(),
        };
        for key in root_keys {
            if named_roots.contains(&key.as_str()) {
                continue;
            }
            let path = self.root_path(&key);
            if !path.exists() {
                continue;
            }
            let entry = Removed {
                kind: "root",
                name: key,
                bytes: crate::disk_usage(&path),
            };
            if self.in_use(&path) {
                removal.in_use.push(entry);
            } else if let Err(e) = fs::remove_file(&path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            } else {
                removal.freed.push(entry);
            }
        }
        let digests: Vec<String> = match blobs {
            Some(digests) => digests.to_vec(),
            None => list_names(&self.root.join("blobs/sha256"))
                .into_iter()
                .map(|hex| format!("sha256:{hex}"))
                .collect(),
        };
        for digest in digests {
            if named_blobs.contains(&digest) {
                continue;
            }
            let path = self.blob_path(&digest);
            let bytes = crate::disk_usage(&path);
            if fs::remove_file(&path).is_ok() {
                removal.freed.push(Removed {
                    kind: "blob",
                    name: digest,
                    bytes,
                });
            }
        }
    }

    /// Whether a VM holds a lease on the root at `path`.
    fn in_use(&self, path: &Path) -> bool {
        open_regular(path, false)
            .is_some_and(|file| matches!(file.try_lock(), Err(TryLockError::WouldBlock)))
    }
}

/// `path` opened if it is a regular file: symlinks are not followed and a
/// FIFO does not block the open.
fn open_regular(path: &Path, write: bool) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    file.metadata().ok()?.is_file().then_some(file)
}

fn is_hex64(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn list_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("a cache");
        let store = Store::open(&vmette_core::assets::Cache::at(dir.path())).expect("a store");
        (dir, store)
    }

    #[test]
    fn the_sweep_takes_only_what_no_writer_holds_and_follows_nothing() {
        let (dir, store) = store();
        let tmp = store.path().join("tmp");
        let outside = dir.path().join("outside");
        fs::write(&outside, b"keep me").expect("an outside file");
        std::os::unix::fs::symlink(&outside, tmp.join(".part-link")).expect("a symlink");
        let fifo = std::ffi::CString::new(tmp.join(".part-fifo").to_str().expect("utf-8"))
            .expect("a path");
        // SAFETY: mkfifo reads a NUL-terminated path and touches nothing else.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        fs::write(tmp.join(".part-dead"), b"half").expect("a dead writer's file");
        fs::create_dir(tmp.join(".build-dead")).expect("a dead build");
        let live = store.temp_file().expect("a live temp file");
        let building = store.work_dir().expect("a live build");

        let removal = store.prune(false, &|| {}).expect("prune");
        let temps = removal.freed.iter().filter(|r| r.kind == "temp").count();
        assert_eq!(temps, 4, "{removal:?}");
        assert_eq!(fs::read(&outside).expect("outside"), b"keep me");
        assert!(live.path().exists() && building.path().exists());
        drop((live, building));
        assert!(entries(&tmp).is_empty(), "{:?}", entries(&tmp));
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .expect("a directory")
            .flatten()
            .map(|e| e.path())
            .collect()
    }

    #[test]
    fn a_record_naming_anything_but_store_keys_is_not_read() {
        let (_dir, store) = store();
        let record = |root: &str, layer: &str| ImageRecord {
            name: "x".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            config: None,
            layers: vec![layer.to_string()],
            root: root.to_string(),
            fingerprint: None,
            stored: 0,
        };
        let good = record(&"b".repeat(64), &format!("sha256:{}", "c".repeat(64)));
        store.record(&good).expect("record");
        assert_eq!(store.records().len(), 1);
        for bad in [
            record("../../etc/passwd", &good.layers[0]),
            record(&good.root, "sha256:../../../../etc/passwd"),
            record(&"B".repeat(64), &good.layers[0]),
        ] {
            store.record(&bad).expect("record");
            assert!(store.records().is_empty(), "{bad:?} was read");
        }
    }
}

//! Root file systems for vmette VMs, from wherever users keep them: OCI
//! images in a registry, tarballs, directories and ready file-system
//! images; and the content-addressed store that keeps what was fetched.
//!
//! [`Images`] implements the core's [`vmette_core::ImageProvider`], so the
//! core never learns where a root came from. It resolves a word by one
//! precedence (see [`Images::resolve_word`]):
//!
//! 1. a path (written with `./`, `../`, `/` or `~/`): a directory, a
//!    tarball (`.tar`, gzip or zstd, found by its bytes) or a file-system
//!    image;
//! 2. a preset name: `debian` is the default image;
//! 3. a name in the local store (`python:3.12` as
//!    `docker.io/library/python:3.12`);
//! 4. a registry reference, pulled into the store (unless offline).
//!
//! An image's layers are flattened top-down into one tar stream
//! ([`layers`]) and packed by `tar2sqfs` into one read-only squashfs root
//! per set of layers (`squash.rs`): the host never unpacks a file, so owners,
//! set-id bits, xattrs and hard links survive for an ordinary user, and no
//! device node is made.

#![warn(missing_docs)]

mod arrivals;
mod auth;
mod error;
pub mod layers;
mod manifest;
mod reference;
mod registry;
mod squash;
mod store;
mod tarball;

use std::path::{Path, PathBuf};

use arrivals::Arrivals;

pub use auth::Credentials;
pub use error::ImageError;
pub use layers::Limits;
pub use reference::ImageName;
pub use registry::STALL_TIMEOUT;
pub use store::{ImageRecord, Store};
use vmette_core::{ImageConfig, ResolvedImage, ResolvedRoot};

/// The preset that names the default image.
pub const DEFAULT_PRESET: &str = "debian";

/// Receives a pull's progress, per layer, for a front end to show.
pub trait PullProgress: Sync {
    /// A layer of `size` bytes starts downloading.
    fn layer_started(&self, digest: &str, size: u64);
    /// `received` bytes of it are in.
    fn layer_advanced(&self, digest: &str, received: u64);
    /// It is stored; `cached` if it already was.
    fn layer_done(&self, digest: &str, size: u64, cached: bool);
    /// The root is being packed, from the top layer down, while lower
    /// layers may still be downloading.
    fn packing(&self);
}

/// A [`PullProgress`] that shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl PullProgress for Quiet {
    fn layer_started(&self, _: &str, _: u64) {}
    fn layer_advanced(&self, _: &str, _: u64) {}
    fn layer_done(&self, _: &str, _: u64, _: bool) {}
    fn packing(&self) {}
}

/// How [`Images`] may fetch.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Use the store only; a missing image is an error.
    pub offline: bool,
    /// Registries (`host[:port]`) reached over plain HTTP. Loopback
    /// registries always are.
    pub insecure_registries: Vec<String>,
    /// Bounds on what an image or tarball may expand to.
    pub limits: Limits,
    /// Largest tarball file accepted, bytes.
    pub tarball_limit: u64,
}

/// Default cap on a tarball's size on disk.
const DEFAULT_TARBALL_LIMIT: u64 = 16 << 30;

impl Default for Settings {
    /// Pulls allowed, HTTPS but for loopback, the default limits.
    fn default() -> Settings {
        Settings {
            offline: false,
            insecure_registries: Vec::new(),
            limits: Limits::default(),
            tarball_limit: DEFAULT_TARBALL_LIMIT,
        }
    }
}

/// Where an image came from and what the store holds of it.
#[derive(Debug, Clone)]
pub struct Found {
    /// The root.
    pub root: ResolvedRoot,
    /// How it wants its commands run.
    pub config: ImageConfig,
    /// The store's record, for images that came through it.
    pub record: Option<ImageRecord>,
}

/// The image provider: presets, the store, registries and local files.
pub struct Images {
    cache: vmette_core::assets::Cache,
    settings: Settings,
    progress: Box<dyn PullProgress + Send>,
}

impl Images {
    /// Images kept in `cache`, fetched as `settings` allow.
    pub fn new(cache: vmette_core::assets::Cache, settings: Settings) -> Images {
        Images {
            cache,
            settings,
            progress: Box::new(Quiet),
        }
    }

    /// Images in the user's cache, with default settings.
    pub fn locate() -> Result<Images, ImageError> {
        let cache = vmette_core::assets::Cache::locate().map_err(|e| ImageError::Store {
            context: "cannot find the cache directory".into(),
            source: std::io::Error::other(e),
        })?;
        Ok(Images::new(cache, Settings::default()))
    }

    /// Reports pulls to `progress`.
    pub fn with_progress(mut self, progress: impl PullProgress + Send + 'static) -> Images {
        self.progress = Box::new(progress);
        self
    }

    /// The store, opened (and created) on demand.
    pub fn store(&self) -> Result<Store, ImageError> {
        Store::open(&self.cache)
    }

    /// Resolves `word` by the crate's precedence: path, preset, store,
    /// registry.
    pub fn resolve_word(
        &self,
        word: &str,
        steps: &dyn vmette_core::assets::Progress,
    ) -> Result<Found, ImageError> {
        if let Some(path) = as_path(word) {
            return self.resolve_path(word, &path);
        }
        if word == DEFAULT_PRESET {
            return Ok(Found {
                root: ResolvedRoot::Default,
                config: ImageConfig::default(),
                record: None,
            });
        }
        let name = ImageName::parse(word)?;
        let store = self.store()?;
        if let Some(found) = self.stored(&store, &name.canonical())? {
            return Ok(found);
        }
        if self.settings.offline {
            return Err(ImageError::NotStored {
                reference: name.canonical(),
            });
        }
        steps.step(&format!("pulling {}", name.canonical()));
        self.pull_into(&store, &name)
    }

    /// Pulls `reference` into the store (again, even if it is there: the
    /// tag may have moved); blobs already stored are not fetched again.
    pub fn pull(&self, reference: &str) -> Result<Found, ImageError> {
        let name = ImageName::parse(reference)?;
        if self.settings.offline {
            return Err(ImageError::NotStored {
                reference: name.canonical(),
            });
        }
        let store = self.store()?;
        self.pull_into(&store, &name)
    }

    fn pull_into(&self, store: &Store, name: &ImageName) -> Result<Found, ImageError> {
        let access = registry::Access {
            insecure: &self.settings.insecure_registries,
            layer_limit: self.settings.limits.expanded_bytes,
        };
        let reference = name.canonical();
        let arrivals = Arrivals::default();
        // The packer starts on the top layer while the pull goes on below.
        let (pulled, packed) = std::thread::scope(|scope| {
            let packer = scope.spawn(|| {
                let layers = arrivals.layers()?;
                self.progress.packing();
                let key = store::root_key(&layers);
                let paths: Vec<PathBuf> = layers.iter().map(|d| store.blob_path(d)).collect();
                let ready = |index: usize| arrivals.wait(&layers[index]);
                let root = squash::pack_when_ready(
                    store,
                    &key,
                    &paths,
                    self.settings.limits,
                    &reference,
                    &ready,
                );
                Some(root.map(|root| (root, key, layers)))
            });
            let pulled = registry::pull(store, name, &access, &*self.progress, &arrivals);
            arrivals.close();
            let packed = packer.join().unwrap_or_else(|_| {
                Some(Err(ImageError::Pack {
                    reference: reference.clone(),
                    reason: "the packer failed".into(),
                }))
            });
            (pulled, packed)
        });
        let pulled = pulled?;
        let (root, key, layers) = match packed {
            Some(packed) => packed?,
            None => {
                return Err(ImageError::Pack {
                    reference,
                    reason: "the pull ended before its layers were known".into(),
                })
            }
        };
        let record = ImageRecord {
            name: reference,
            digest: pulled.manifest_digest,
            config: Some(pulled.manifest.config.digest.clone()),
            root: key,
            layers,
            fingerprint: None,
        };
        store.record(&record)?;
        Ok(Found {
            root: ResolvedRoot::Image(root),
            config: pulled.config.image_config(),
            record: Some(record),
        })
    }

    fn stored(&self, store: &Store, name: &str) -> Result<Option<Found>, ImageError> {
        let Some(record) = store.lookup(name) else {
            return Ok(None);
        };
        let config = match &record.config {
            Some(digest) => {
                let bytes = std::fs::read(store.blob_path(digest))
                    .map_err(ImageError::store("cannot read a stored config"))?;
                manifest::parse_config(&bytes)
                    .map_err(|reason| ImageError::Refused {
                        reference: name.to_string(),
                        reason,
                    })?
                    .image_config()
            }
            None => ImageConfig::default(),
        };
        Ok(Some(Found {
            root: ResolvedRoot::Image(store.root_path(&record.root)),
            config,
            record: Some(record),
        }))
    }

    fn resolve_path(&self, word: &str, path: &Path) -> Result<Found, ImageError> {
        let metadata = std::fs::metadata(path).map_err(|e| ImageError::File {
            path: word.to_string(),
            reason: format!("cannot use it as a root: {e}"),
        })?;
        let plain = |root| Found {
            root,
            config: ImageConfig::default(),
            record: None,
        };
        if metadata.is_dir() {
            return Ok(plain(ResolvedRoot::Directory(path.to_path_buf())));
        }
        if tarball::looks_like_tarball(path) {
            let store = self.store()?;
            return tarball::convert(&store, word, path, &self.settings).map(|(root, record)| {
                Found {
                    root: ResolvedRoot::Image(root),
                    config: ImageConfig::default(),
                    record: Some(record),
                }
            });
        }
        Ok(plain(ResolvedRoot::Image(path.to_path_buf())))
    }
}

/// `word` as a path, if it is written as one (`~/` expanded).
pub fn as_path(word: &str) -> Option<PathBuf> {
    if let Some(rest) = word.strip_prefix("~/") {
        let home = std::env::var_os("HOME")?;
        return Some(PathBuf::from(home).join(rest));
    }
    let pathlike = word.starts_with("./") || word.starts_with("../") || word.starts_with('/');
    pathlike.then(|| PathBuf::from(word))
}

impl vmette_core::ImageProvider for Images {
    fn resolve(
        &self,
        name: &str,
        progress: &dyn vmette_core::assets::Progress,
    ) -> Result<ResolvedImage, Box<dyn std::error::Error + Send + Sync>> {
        let found = self.resolve_word(name, progress)?;
        Ok(ResolvedImage {
            root: found.root,
            config: found.config,
        })
    }
}

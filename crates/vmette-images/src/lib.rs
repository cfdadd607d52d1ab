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
//!    image; an `http://` or `https://` URL of a tarball;
//! 2. a preset ([`preset`]): a bare name with no tag, registry or
//!    namespace (`python`, `node`, `toolbox`; `debian` is the default
//!    image), built from Debian packages at first use;
//! 3. a name in the local store (`python:3.12` as
//!    `docker.io/library/python:3.12`);
//! 4. a registry reference, pulled into the store (unless offline).
//!
//! The store ([`Store`]) is shared by every vmette process of the user at
//! once; its module says how pulls, runs and prunes keep out of each
//! other's way.
//!
//! An image's layers are flattened top-down into one tar stream
//! ([`layers`]) and packed by `tar2sqfs` into one read-only squashfs root
//! per set of layers (`squash.rs`): the host never unpacks a file, so owners,
//! set-id bits, xattrs and hard links survive for an ordinary user, and no
//! device node is made.

#![warn(missing_docs)]

mod arrivals;
mod auth;
mod download;
mod error;
mod inventory;
pub mod layers;
mod manifest;
pub mod preset;
mod reference;
mod registry;
mod squash;
mod store;
mod tarball;

use std::path::{Path, PathBuf};

use arrivals::Arrivals;

pub use auth::Credentials;
pub use error::ImageError;
pub use inventory::{Inspected, Listed, Origin};
pub use layers::Limits;
pub use preset::{Preset, PRESETS};
pub use reference::ImageName;
pub use registry::STALL_TIMEOUT;
pub use store::{ImageRecord, Removal, Removed, RootLease, Store, StoreLock};
use vmette_core::{ImageConfig, ImageLease, ResolvedImage, ResolvedRoot};

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
    /// Largest tarball file accepted, bytes (a download's too).
    pub tarball_limit: u64,
    /// The sha256 a downloaded tarball must have (`--sha256`), as
    /// `HEX` or `sha256:HEX`.
    pub expected_sha256: Option<String>,
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
            expected_sha256: None,
        }
    }
}

/// Where an image came from and what the store holds of it.
#[derive(Debug)]
pub struct Found {
    /// The root.
    pub root: ResolvedRoot,
    /// How it wants its commands run.
    pub config: ImageConfig,
    /// The store's record, for images that came through it.
    pub record: Option<ImageRecord>,
    /// The hold on a stored root, which keeps prunes from freeing it;
    /// keep it as long as a VM reads the root.
    pub lease: Option<RootLease>,
}

impl Found {
    fn plain(root: ResolvedRoot) -> Found {
        Found {
            root,
            config: ImageConfig::default(),
            record: None,
            lease: None,
        }
    }
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

    /// Resolves `word` by the crate's precedence: path or URL, preset,
    /// store, registry. A stored root comes with its lease.
    pub fn resolve_word(
        &self,
        word: &str,
        steps: &dyn vmette_core::assets::Progress,
    ) -> Result<Found, ImageError> {
        if let Some(path) = as_path(word) {
            return self.resolve_path(word, &path);
        }
        if download::is_url(word) {
            return self.downloaded(word, false, steps);
        }
        self.refuse_pin(word)?;
        if let Some(preset) = preset::named(word) {
            if preset.is_default() {
                return Ok(Found::plain(ResolvedRoot::Default));
            }
            return self.preset(preset, steps);
        }
        let name = ImageName::parse(word)?;
        let store = self.store()?;
        {
            let held = store.shared()?;
            if let Some(found) = self.stored(&store, &name.canonical(), &held)? {
                return Ok(found);
            }
        }
        if self.settings.offline {
            return Err(ImageError::NotStored {
                reference: name.canonical(),
            });
        }
        steps.step(&format!("pulling {}", name.canonical()));
        self.pull_into(&store, &name)
    }

    /// Builds `preset` now unless its recipe is stored; returns its
    /// record.
    pub fn build_preset(
        &self,
        preset: &Preset,
        steps: &dyn vmette_core::assets::Progress,
    ) -> Result<Option<ImageRecord>, ImageError> {
        if preset.is_default() {
            return Ok(None);
        }
        let found = self.preset(preset, steps)?;
        Ok(found.record)
    }

    /// The tarball at `url`, downloaded unless stored (or `again`).
    fn downloaded(
        &self,
        url: &str,
        again: bool,
        steps: &dyn vmette_core::assets::Progress,
    ) -> Result<Found, ImageError> {
        let store = self.store()?;
        let held = store.writing()?;
        let (_, record) = download::fetch(&store, url, &self.settings, again, steps)?;
        steps.finish();
        self.leased(&store, record, ImageConfig::default(), &held)
    }

    /// Refuses `--sha256` for `word`, which is not a tarball: it pins only
    /// tarballs, and anywhere else would be a check silently not made.
    fn refuse_pin(&self, word: &str) -> Result<(), ImageError> {
        if self.settings.expected_sha256.is_none() {
            return Ok(());
        }
        Err(ImageError::Refused {
            reference: word.to_string(),
            reason: "--sha256 pins only a tarball (a file or an http(s) URL); a registry image is pinned by its digest (NAME@sha256:…)".into(),
        })
    }

    fn preset(
        &self,
        preset: &Preset,
        steps: &dyn vmette_core::assets::Progress,
    ) -> Result<Found, ImageError> {
        let store = self.store()?;
        {
            let held = store.shared()?;
            if let Some(record) = preset.stored(&store) {
                return self.leased(&store, record, preset.image_config(), &held);
            }
        }
        if self.settings.offline {
            return Err(ImageError::Preset {
                name: preset.name.to_string(),
                reason: format!(
                    "it is not built yet, and --offline forbids fetching its packages; build it first with `vmette setup --presets {}`",
                    preset.name
                ),
            });
        }
        let held = store.writing()?;
        // Another process may have built it while this one waited.
        let record = match preset.stored(&store) {
            Some(record) => record,
            None => preset.build(&store, self.settings.limits, steps)?,
        };
        self.leased(&store, record, preset.image_config(), &held)
    }

    /// `record`'s root with a lease on it, taken while `_held` keeps
    /// removals out; its use noted.
    fn leased(
        &self,
        store: &Store,
        record: ImageRecord,
        config: ImageConfig,
        _held: &StoreLock,
    ) -> Result<Found, ImageError> {
        let root = store.root_path(&record.root);
        let lease = store.lease(&root)?;
        store.touch(&record.name);
        Ok(Found {
            root: ResolvedRoot::Image(root),
            config,
            record: Some(record),
            lease: Some(lease),
        })
    }

    /// Pulls `reference` into the store (again, even if it is there: the
    /// tag may have moved); blobs already stored are not fetched again.
    /// A URL is downloaded again.
    pub fn pull(&self, reference: &str) -> Result<Found, ImageError> {
        if download::is_url(reference) {
            return self.downloaded(reference, true, &vmette_core::assets::Silent);
        }
        self.refuse_pin(reference)?;
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
        let held = store.writing()?;
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
        let (_, key, layers) = match packed {
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
            stored: 0,
        };
        store.record(&record)?;
        self.leased(store, record, pulled.config.image_config(), &held)
    }

    fn stored(
        &self,
        store: &Store,
        name: &str,
        held: &StoreLock,
    ) -> Result<Option<Found>, ImageError> {
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
        self.leased(store, record, config, held).map(Some)
    }

    fn resolve_path(&self, word: &str, path: &Path) -> Result<Found, ImageError> {
        let metadata = std::fs::metadata(path).map_err(|e| ImageError::File {
            path: word.to_string(),
            reason: format!("cannot use it as a root: {e}"),
        })?;
        let tarball = !metadata.is_dir() && tarball::looks_like_tarball(path);
        if !tarball {
            self.refuse_pin(word)?;
        }
        if metadata.is_dir() {
            return Ok(Found::plain(ResolvedRoot::Directory(path.to_path_buf())));
        }
        if tarball {
            let store = self.store()?;
            let held = store.writing()?;
            let (_, record) = tarball::convert(&store, word, path, &self.settings)?;
            return self.leased(&store, record, ImageConfig::default(), &held);
        }
        Ok(Found::plain(ResolvedRoot::Image(path.to_path_buf())))
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
            lease: found.lease.map(ImageLease::new),
        })
    }
}

/// Bytes `path` takes on disk: its blocks, not its length (a sparse file
/// takes less), every file under it for a directory.
pub(crate) fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = metadata.blocks().saturating_mul(512);
    if !metadata.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| disk_usage(&entry.path()))
        .fold(own, u64::saturating_add)
}

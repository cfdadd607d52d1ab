//! What the store holds, for people and programs: the images (`vmette
//! images`), one image in detail (`vmette inspect`), and removing them
//! (`vmette rmi`, `vmette prune`).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use vmette_core::assets::image as default_image;
use vmette_core::ImageConfig;

use crate::store::{ImageRecord, Removal};
use crate::{download, manifest, preset, ImageError, ImageName, Images, Store};

/// Where an image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// Built by vmette from Debian packages.
    Preset {
        /// The Debian suite.
        suite: String,
        /// Packages on top of `minbase`.
        packages: Vec<String>,
    },
    /// Pulled from a registry.
    Registry {
        /// The registry's host.
        registry: String,
        /// The repository in it.
        repository: String,
    },
    /// Converted from a tarball on this host.
    Tarball {
        /// The file.
        path: String,
    },
    /// Downloaded from a URL.
    Download {
        /// The URL.
        url: String,
    },
}

/// One line of `vmette images`.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// The name to run it by.
    pub reference: String,
    /// Whether it is a preset.
    pub preset: bool,
    /// Its digest (of the manifest, the tarball, or a preset's recipe).
    pub digest: Option<String>,
    /// Bytes it takes on disk, root and blobs; blobs shared with other
    /// images count for each.
    pub bytes: u64,
    /// When it was made: its config's `created`, else when it was stored.
    pub created: Option<String>,
    /// When it was stored, seconds since the epoch.
    pub stored_at: Option<u64>,
    /// When a run last used it, seconds since the epoch.
    pub last_used_at: Option<u64>,
}

/// A layer of an inspected image.
#[derive(Debug, Clone, Serialize)]
pub struct InspectedLayer {
    /// Its digest.
    pub digest: String,
    /// Bytes it takes in the store (0 once pruned).
    pub bytes: u64,
}

/// `vmette inspect`: everything the store knows of one image.
#[derive(Debug, Clone, Serialize)]
pub struct Inspected {
    /// What [`Listed`] says of it.
    #[serde(flatten)]
    pub listed: Listed,
    /// The name it is stored under.
    pub stored_as: String,
    /// Where it came from.
    pub origin: Origin,
    /// Operating system and architecture.
    pub platform: Option<String>,
    /// How its commands run.
    pub config: InspectedConfig,
    /// Its layers, bottom first.
    pub layers: Vec<InspectedLayer>,
    /// Its read-only root.
    pub root: PathBuf,
}

/// An image's run config, as `vmette inspect` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InspectedConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=VALUE`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub workdir: Option<String>,
    /// `User`.
    pub user: Option<String>,
}

impl From<ImageConfig> for InspectedConfig {
    fn from(config: ImageConfig) -> InspectedConfig {
        InspectedConfig {
            entrypoint: config.entrypoint,
            cmd: config.cmd,
            env: config
                .env
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            workdir: config.workdir,
            user: config.user,
        }
    }
}

fn seconds(time: SystemTime) -> Option<u64> {
    time.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

impl Images {
    /// The name `word` is stored under: `preset:NAME` for a preset, the
    /// URL, `file://` and the canonical path of a tarball, or the
    /// canonical reference.
    pub fn stored_name(&self, word: &str) -> Result<String, ImageError> {
        if let Some(preset) = preset::named(word) {
            return Ok(preset.record_name());
        }
        // The names `vmette images` shows are taken as they are.
        let listed = word.starts_with("file://") || word.starts_with("preset:");
        if download::is_url(word) || listed {
            return Ok(word.to_string());
        }
        if let Some(path) = crate::as_path(word) {
            // A tarball may be gone since it was converted; its image is
            // still named by where it was.
            let absolute = std::fs::canonicalize(&path)
                .or_else(|_| std::path::absolute(&path))
                .map_err(|e| ImageError::File {
                    path: word.to_string(),
                    reason: e.to_string(),
                })?;
            return Ok(format!("file://{}", absolute.display()));
        }
        Ok(ImageName::parse(word)?.canonical())
    }

    /// Every image: the default image if it is built, then the store's.
    pub fn list(&self) -> Result<Vec<Listed>, ImageError> {
        let store = self.store()?;
        let _held = store.shared()?;
        let mut listed: Vec<Listed> = self.default_listed().into_iter().collect();
        listed.extend(
            store
                .records()
                .iter()
                .map(|record| self.listed(&store, record)),
        );
        Ok(listed)
    }

    /// Bytes every file of the store takes on disk, each counted once.
    pub fn store_bytes(&self) -> Result<u64, ImageError> {
        Ok(crate::disk_usage(self.store()?.path()))
    }

    fn default_listed(&self) -> Option<Listed> {
        let path = default_image::default_image_path(&self.cache);
        let metadata = std::fs::metadata(&path).ok()?;
        let stored = metadata.modified().ok().and_then(seconds);
        Some(Listed {
            reference: crate::DEFAULT_PRESET.to_string(),
            preset: true,
            digest: None,
            bytes: crate::disk_usage(&path),
            created: None,
            stored_at: stored,
            last_used_at: metadata.accessed().ok().and_then(seconds),
        })
    }

    fn listed(&self, store: &Store, record: &ImageRecord) -> Listed {
        let preset_name = record.name.strip_prefix("preset:");
        Listed {
            reference: preset_name.unwrap_or(&record.name).to_string(),
            preset: preset_name.is_some(),
            digest: Some(record.digest.clone()),
            bytes: store.image_bytes(record),
            created: config_file(store, record).and_then(|c| c.created),
            stored_at: (record.stored > 0).then_some(record.stored),
            last_used_at: store.last_used(&record.name).and_then(seconds),
        }
    }

    /// What the store knows of `word`'s image; `None` if it holds none.
    pub fn inspect(&self, word: &str) -> Result<Option<Inspected>, ImageError> {
        let store = self.store()?;
        let _held = store.shared()?;
        let name = self.stored_name(word)?;
        if let Some(preset) = preset::named(word).filter(|p| p.is_default()) {
            return Ok(self.default_listed().map(|listed| Inspected {
                listed,
                stored_as: name,
                origin: preset_origin(preset),
                platform: Some(format!("linux/{}", manifest::host_architecture())),
                config: InspectedConfig::default(),
                layers: Vec::new(),
                root: default_image::default_image_path(&self.cache),
            }));
        }
        let Some(record) = store.lookup(&name) else {
            return Ok(None);
        };
        let config_file = config_file(&store, &record);
        let stored_preset = name.strip_prefix("preset:").and_then(preset::named);
        let origin = if let Some(preset) = stored_preset {
            preset_origin(preset)
        } else if let Some(path) = name.strip_prefix("file://") {
            Origin::Tarball { path: path.into() }
        } else if download::is_url(&name) {
            Origin::Download { url: name.clone() }
        } else {
            let parsed = ImageName::parse(&name)?;
            Origin::Registry {
                registry: parsed.registry().to_string(),
                repository: parsed.repository().to_string(),
            }
        };
        let config = match (&config_file, stored_preset) {
            (Some(file), _) => file.image_config(),
            (None, Some(preset)) => preset.image_config(),
            (None, None) => ImageConfig::default(),
        };
        let platform = match &config_file {
            Some(file) => Some(format!("{}/{}", file.os, file.architecture)),
            None => Some(format!("linux/{}", manifest::host_architecture())),
        };
        Ok(Some(Inspected {
            listed: self.listed(&store, &record),
            stored_as: name,
            origin,
            platform,
            config: config.into(),
            layers: record
                .layers
                .iter()
                .map(|digest| InspectedLayer {
                    digest: digest.clone(),
                    bytes: crate::disk_usage(&store.blob_path(digest)),
                })
                .collect(),
            root: store.root_path(&record.root),
        }))
    }

    /// Removes `word`'s image (see [`Store::remove`]); `None` if the store
    /// holds none. `waiting` is called if another process must finish
    /// first.
    pub fn remove(&self, word: &str, waiting: &dyn Fn()) -> Result<Option<Removal>, ImageError> {
        if preset::named(word).is_some_and(|p| p.is_default()) {
            return Err(ImageError::File {
                path: word.to_string(),
                reason: "the default image is kept with the boot assets; `vmette cache` lists it and `vmette setup --rebuild-image` builds it again".into(),
            });
        }
        let name = self.stored_name(word)?;
        self.store()?.remove(&name, waiting)
    }

    /// Frees what no image names, and with `all` every image no VM uses
    /// (see [`Store::prune`]).
    pub fn prune(&self, all: bool, waiting: &dyn Fn()) -> Result<Removal, ImageError> {
        self.store()?.prune(all, waiting)
    }
}

fn preset_origin(preset: &preset::Preset) -> Origin {
    Origin::Preset {
        suite: default_image::SUITE.to_string(),
        packages: [default_image::BASE_PACKAGES, preset.packages]
            .concat()
            .iter()
            .map(|p| p.to_string())
            .collect(),
    }
}

fn config_file(store: &Store, record: &ImageRecord) -> Option<manifest::ConfigFile> {
    let digest = record.config.as_ref()?;
    let bytes = std::fs::read(store.blob_path(digest)).ok()?;
    manifest::parse_config(&bytes).ok()
}

//! Presets: images vmette builds itself from Debian packages with
//! `mmdebstrap`, at first use, so that `python` or `node` runs with no
//! registry reachable, only the Debian mirror set-up already uses.
//!
//! A preset is stored like a pulled image, under the name `preset:NAME`
//! with the digest of its recipe (suite, packages, this module's version);
//! a changed recipe is built again. `debian` is the default image, which
//! the boot assets build and keep (see `vmette_assets::image`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use sha2::{Digest, Sha256};
use vmette_core::assets::{image as default_image, Progress};
use vmette_core::ImageConfig;

use crate::layers::Limits;
use crate::store::{root_key, ImageRecord, Store};
use crate::{squash, ImageError};

/// Bumped whenever a change here changes what a recipe builds.
const RECIPE_VERSION: u32 = 1;

/// Lines of `mmdebstrap`'s output kept for an error message.
const OUTPUT_TAIL: usize = 12;

/// An image vmette builds from Debian packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// Its name, as a run gives it.
    pub name: &'static str,
    /// Packages on top of Debian `minbase`.
    pub packages: &'static [&'static str],
    /// The command of a run that gives none.
    pub cmd: &'static [&'static str],
    /// What it is for.
    pub about: &'static str,
}

/// Every preset, `debian` (the default image) first.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: crate::DEFAULT_PRESET,
        packages: &[],
        cmd: &[],
        about: "Debian minbase: the default image",
    },
    Preset {
        name: "python",
        packages: &["python3", "python3-pip", "python3-venv"],
        cmd: &["python3"],
        about: "Python 3 with pip and venv",
    },
    Preset {
        name: "node",
        packages: &["nodejs", "npm"],
        cmd: &["node"],
        about: "Node.js with npm",
    },
    Preset {
        name: "toolbox",
        packages: &[
            "curl",
            "ca-certificates",
            "iproute2",
            "bind9-dnsutils",
            "openssl",
            "python3",
        ],
        cmd: &["bash"],
        about: "network tools: curl, dig, ip, openssl, python3",
    },
];

/// The preset `word` names: a bare name, without tag, registry or
/// namespace (`python`, not `python:3.12` nor `library/python`).
pub fn named(word: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == word)
}

impl Preset {
    /// Whether it is the default image, which the boot assets keep.
    pub fn is_default(&self) -> bool {
        self.name == crate::DEFAULT_PRESET
    }

    /// The name its image is stored under.
    pub fn record_name(&self) -> String {
        format!("preset:{}", self.name)
    }

    /// The digest of what it is built from.
    pub fn recipe_digest(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(format!(
            "vmette preset v{RECIPE_VERSION}\nsuite {}\nvariant minbase\n",
            default_image::SUITE
        ));
        for package in [default_image::BASE_PACKAGES, self.packages].concat() {
            hash.update(format!("package {package}\n"));
        }
        format!("sha256:{}", hex::encode(hash.finalize()))
    }

    /// How its commands run.
    pub fn image_config(&self) -> ImageConfig {
        ImageConfig {
            cmd: self.cmd.iter().map(|s| s.to_string()).collect(),
            ..ImageConfig::default()
        }
    }

    /// The stored image of this recipe, if there is one.
    pub fn stored(&self, store: &Store) -> Option<ImageRecord> {
        store
            .lookup(&self.record_name())
            .filter(|r| r.digest == self.recipe_digest())
    }

    /// Builds it into `store` and records it; `progress` hears each of
    /// `mmdebstrap`'s steps. The caller holds the store's lock for writing.
    pub fn build(
        &self,
        store: &Store,
        limits: Limits,
        progress: &dyn Progress,
    ) -> Result<ImageRecord, ImageError> {
        let failed = |reason: String| ImageError::Preset {
            name: self.name.to_string(),
            reason,
        };
        let work = store.work_dir()?;
        let scratch = work.path().join("tmp");
        std::fs::create_dir(&scratch)
            .map_err(ImageError::store("cannot create a build directory"))?;
        let tarball = work.path().join("root.tar");
        progress.step(&format!(
            "building the {} preset from Debian packages",
            self.name
        ));
        self.bootstrap(&scratch, &tarball, progress)
            .map_err(failed)?;
        progress.step(&format!("packing the {} preset", self.name));
        let digest = self.recipe_digest();
        let key = root_key(&[self.record_name(), digest.clone()]);
        squash::pack(store, &key, &[tarball], limits, self.name)?;
        let record = ImageRecord {
            name: self.record_name(),
            digest: digest.clone(),
            config: None,
            layers: Vec::new(),
            root: key,
            fingerprint: Some(digest),
            stored: 0,
        };
        store.record(&record)?;
        progress.finish();
        Ok(record)
    }

    /// Runs `mmdebstrap` into the tarball `target`, its `I:` lines shown
    /// as steps; the failure is the tool's last lines.
    fn bootstrap(
        &self,
        scratch: &Path,
        target: &Path,
        progress: &dyn Progress,
    ) -> Result<(), String> {
        let mut command = default_image::mmdebstrap(self.packages, scratch, target, false);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = vmette_core::process::spawn_tool(&mut command)
            .map_err(|e| format!("cannot run mmdebstrap ({e}); install it (./setup.sh does)"))?;
        let mut tail = std::collections::VecDeque::with_capacity(OUTPUT_TAIL);
        if let Some(stderr) = child.stderr.take() {
            for line in BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).trim().to_string();
                if let Some(step) = line.strip_prefix("I: ") {
                    progress.step(&format!("building the {} preset: {step}", self.name));
                }
                if tail.len() == OUTPUT_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
        let status = child
            .wait()
            .map_err(|e| format!("cannot wait for mmdebstrap: {e}"))?;
        if status.success() {
            return Ok(());
        }
        let said: Vec<String> = tail.into_iter().filter(|l| !l.is_empty()).collect();
        Err(format!(
            "mmdebstrap failed ({status}): {}",
            said.join(" / ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_names_are_presets() {
        assert_eq!(named("python").map(|p| p.name), Some("python"));
        assert!(named("python:3.12").is_none());
        assert!(named("library/python").is_none());
        assert!(named("docker.io/library/node").is_none());
        assert!(named("Python").is_none());
        assert!(named("debian").is_some_and(Preset::is_default));
    }

    #[test]
    fn recipes_differ_by_packages_and_name_the_store_entry() {
        let digests: Vec<String> = PRESETS.iter().map(Preset::recipe_digest).collect();
        for (i, a) in digests.iter().enumerate() {
            assert!(a.starts_with("sha256:") && a.len() == 71);
            assert!(digests[i + 1..].iter().all(|b| b != a));
        }
        let python = named("python").expect("python");
        assert_eq!(python.recipe_digest(), python.recipe_digest());
        assert_eq!(python.record_name(), "preset:python");
        assert_eq!(python.image_config().cmd, vec!["python3".to_string()]);
    }
}

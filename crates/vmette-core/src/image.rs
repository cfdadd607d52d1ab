//! Images named by a word (`debian`, `python:3.12-slim`, a team's private
//! reference): the [`ImageProvider`] trait that turns a name into a root,
//! and the Docker rules by which an image's config shapes the command.
//!
//! The core never learns where a root came from. A front end plugs in a
//! provider (the `vmette` facade plugs in `vmette-images`' store) and calls
//! [`Config::resolve_image`] before booting.

use std::path::PathBuf;
use std::sync::Arc;

use crate::assets::Progress;
use crate::{Config, Error, Rootfs};

/// The runtime part of an image's config, as the OCI image spec names it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageConfig {
    /// `Entrypoint`: the program and first arguments of every run.
    pub entrypoint: Vec<String>,
    /// `Cmd`: the default arguments (or command, with no entrypoint).
    pub cmd: Vec<String>,
    /// `Env`, in the image's order.
    pub env: Vec<(String, String)>,
    /// `WorkingDir`.
    pub workdir: Option<String>,
    /// `User`: `name`, `uid`, `name:group` or `uid:gid`.
    pub user: Option<String>,
}

/// What every command in a VM starts from unless it says otherwise: the
/// image's `Env`, `WorkingDir` and `User`. [`crate::ExecSpec`]s override
/// them per key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecDefaults {
    /// Environment under every exec's own.
    pub env: Vec<(String, String)>,
    /// Working directory of execs that name none.
    pub workdir: Option<String>,
    /// User of execs that name none.
    pub user: Option<String>,
}

/// An image a provider found or fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The root, as a file system image or the default image.
    pub root: ResolvedRoot,
    /// How the image wants its commands run.
    pub config: ImageConfig,
    /// Keeps the root from being removed while a VM uses it.
    pub lease: Option<ImageLease>,
}

/// A provider's hold on a root it handed out (a shared lock on the file,
/// say), kept by [`Config::image_lease`] and then by every VM booted from
/// that config until the VM is gone, so that a prune of the provider's
/// store never frees a root in use. Released when the last clone drops.
#[derive(Clone)]
pub struct ImageLease(Arc<dyn Send + Sync>);

impl ImageLease {
    /// A lease that holds `hold` until the last clone is dropped.
    pub fn new(hold: impl Send + Sync + 'static) -> ImageLease {
        ImageLease(Arc::new(hold))
    }
}

impl std::fmt::Debug for ImageLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageLease")
    }
}

/// Two leases are equal when they are clones of one hold.
impl PartialEq for ImageLease {
    fn eq(&self, other: &ImageLease) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ImageLease {}

/// Where a resolved image's root is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedRoot {
    /// The default image ([`Rootfs::Default`]).
    Default,
    /// A read-only file system image.
    Image(PathBuf),
    /// A host directory, shared read-only under a throwaway overlay.
    Directory(PathBuf),
}

/// Turns image names into roots. Implementations decide the precedence of
/// presets, stored images and registries, and may fetch; errors are
/// sentences that name the reference.
pub trait ImageProvider: Send + Sync {
    /// The image `name` stands for, fetched or built if need be.
    fn resolve(
        &self,
        name: &str,
        progress: &dyn Progress,
    ) -> Result<ResolvedImage, Box<dyn std::error::Error + Send + Sync>>;
}

impl Config {
    /// This config with a [`Rootfs::Named`] root resolved by `images`, and
    /// the image's config applied by Docker's rules:
    ///
    /// * the command runs as `entrypoint + args`, where the entrypoint is
    ///   [`Config::entrypoint`] if set, else the image's `Entrypoint`, and
    ///   the args are [`Config::command`] if given, else the image's `Cmd`
    ///   (dropped when the entrypoint was replaced);
    /// * the image's `Env`, `WorkingDir` and `User` become
    ///   [`Config::exec_defaults`], under the run's own and every exec's.
    ///
    /// Other roots take no image config; an entrypoint still applies. The
    /// result has no entrypoint left to apply, so resolving twice is
    /// resolving once.
    pub fn resolve_image(
        &self,
        images: &dyn ImageProvider,
        progress: &dyn Progress,
    ) -> Result<Config, Error> {
        let mut config = self.clone();
        let image = match &self.rootfs {
            Rootfs::Named(name) => {
                let resolved = images.resolve(name, progress).map_err(Error::Image)?;
                config.rootfs = match resolved.root {
                    ResolvedRoot::Default => Rootfs::Default,
                    ResolvedRoot::Image(path) => Rootfs::Image(path),
                    ResolvedRoot::Directory(path) => Rootfs::Directory {
                        path,
                        writable: false,
                    },
                };
                config.image_lease = resolved.lease;
                resolved.config
            }
            _ => ImageConfig::default(),
        };
        config.command = command_for(self, &image);
        config.entrypoint = None;
        config.exec_defaults = ExecDefaults {
            env: image.env,
            workdir: image.workdir,
            user: image.user,
        };
        Ok(config)
    }
}

fn command_for(config: &Config, image: &ImageConfig) -> Vec<String> {
    let mut command = config
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.entrypoint.clone());
    if !config.command.is_empty() {
        command.extend(config.command.iter().cloned());
    } else if config.entrypoint.is_none() {
        command.extend(image.cmd.iter().cloned());
    }
    command
}

impl ExecDefaults {
    /// `spec` with these defaults under its own settings.
    pub(crate) fn apply(&self, spec: &crate::ExecSpec) -> crate::ExecSpec {
        let mut spec = spec.clone();
        let own = std::mem::take(&mut spec.env);
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(key, _)| !own.iter().any(|(k, _)| k == key))
            .cloned()
            .collect();
        env.extend(own);
        spec.env = env;
        if spec.workdir.is_none() {
            spec.workdir.clone_from(&self.workdir);
        }
        if spec.user.is_none() {
            spec.user.clone_from(&self.user);
        }
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExecSpec;

    struct Fixed(ImageConfig);

    impl ImageProvider for Fixed {
        fn resolve(
            &self,
            _name: &str,
            _progress: &dyn Progress,
        ) -> Result<ResolvedImage, Box<dyn std::error::Error + Send + Sync>> {
            Ok(ResolvedImage {
                root: ResolvedRoot::Image("/store/root.sqfs".into()),
                config: self.0.clone(),
                lease: Some(ImageLease::new(())),
            })
        }
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn resolved(command: &str, entrypoint: Option<&str>) -> Config {
        let image = Fixed(ImageConfig {
            entrypoint: words("/entry.sh --flag"),
            cmd: words("serve --port 80"),
            env: vec![("PATH".into(), "/usr/bin".into()), ("A".into(), "1".into())],
            workdir: Some("/app".into()),
            user: Some("app".into()),
        });
        let mut config = Config::new(words(command));
        config.rootfs = Rootfs::Named("img".into());
        config.entrypoint = entrypoint.map(words);
        config
            .resolve_image(&image, &crate::assets::Silent)
            .expect("a fixed provider resolves")
    }

    #[test]
    fn entrypoint_and_cmd_follow_dockers_rules() {
        assert_eq!(
            resolved("", None).command,
            words("/entry.sh --flag serve --port 80")
        );
        assert_eq!(resolved("x y", None).command, words("/entry.sh --flag x y"));
        assert_eq!(resolved("", Some("/bin/sh")).command, words("/bin/sh"));
        assert_eq!(
            resolved("-c true", Some("/bin/sh")).command,
            words("/bin/sh -c true")
        );
        let config = resolved("", None);
        assert_eq!(config.rootfs, Rootfs::Image("/store/root.sqfs".into()));
    }

    #[test]
    fn the_resolved_config_holds_the_providers_lease() {
        let config = resolved("", None);
        let lease = config.image_lease.clone();
        assert!(lease.is_some());
        assert_eq!(config.clone().image_lease, lease);
        assert_eq!(Config::default_machine().image_lease, None);
    }

    #[test]
    fn image_defaults_sit_under_each_execs_own() {
        let defaults = resolved("", None).exec_defaults;
        let mut spec = ExecSpec::new(["env"]);
        spec.env = vec![("A".into(), "2".into())];
        let applied = defaults.apply(&spec);
        assert_eq!(
            applied.env,
            vec![("PATH".into(), "/usr/bin".into()), ("A".into(), "2".into())]
        );
        assert_eq!(applied.workdir.as_deref(), Some("/app"));
        assert_eq!(applied.user.as_deref(), Some("app"));
        spec.workdir = Some("/tmp".into());
        spec.user = Some("0".into());
        let applied = defaults.apply(&spec);
        assert_eq!(applied.workdir.as_deref(), Some("/tmp"));
        assert_eq!(applied.user.as_deref(), Some("0"));
    }

    #[test]
    fn other_roots_keep_the_command_and_take_an_entrypoint() {
        let mut config = Config::new(["-c", "true"]);
        config.entrypoint = Some(words("/bin/sh"));
        let resolved = config
            .resolve_image(&Fixed(ImageConfig::default()), &crate::assets::Silent)
            .expect("nothing to resolve");
        assert_eq!(resolved.command, words("/bin/sh -c true"));
        assert_eq!(resolved.rootfs, Rootfs::Default);
    }
}

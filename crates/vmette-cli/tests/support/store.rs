//! A vmette sandbox with an image store of its own, for the image and
//! store tests.

use std::path::Path;
use std::process::Output;

use super::registry;
use super::{code, stderr, stdout, Sandbox};

/// A sandbox with a store of its own.
pub struct Images {
    pub sandbox: Sandbox,
    _cache: tempfile::TempDir,
    pub cache_path: std::path::PathBuf,
    pub store: std::path::PathBuf,
}

impl Images {
    pub fn new() -> Images {
        let (cache, store) = registry::private_cache();
        Images {
            sandbox: Sandbox::new(),
            cache_path: cache.path().to_path_buf(),
            _cache: cache,
            store,
        }
    }

    pub fn run_with(&self, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let output = self.run_live(args, env);
        self.sandbox.assert_clean();
        output
    }

    /// Runs vmette, leaving what it started (a daemon) running.
    pub fn run_live(&self, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let mut command = self.sandbox.command(args);
        command.env("VMETTE_CACHE_DIR", &self.cache_path);
        command.env_remove("DOCKER_CONFIG");
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn vmette");
        super::wait_with_limit(child, super::RUN_LIMIT)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[])
    }

    pub fn roots(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.store.join("roots"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Stops the test's daemon however the test ends.
pub struct StopsDaemon<'a> {
    pub images: &'a Images,
    pub runtime: &'a Path,
}

impl Drop for StopsDaemon<'_> {
    fn drop(&mut self) {
        let _ = self
            .images
            .run_live(&["daemon", "stop"], &[("XDG_RUNTIME_DIR", self.runtime)]);
    }
}

/// The stdout of a run that succeeded.
pub fn ok(output: &Output) -> String {
    assert_eq!(code(output), 0, "stderr: {}", stderr(output));
    stdout(output)
}

/// A vmette failure before the command: exit 125 and one sentence.
pub fn refused(output: &Output) -> String {
    let message = stderr(output);
    assert_eq!(code(output), 125, "{message}");
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    message
}

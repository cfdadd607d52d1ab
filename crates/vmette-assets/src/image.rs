//! The default root image: Debian bookworm `minbase` (plus `mount` and
//! `procps`) built with `mmdebstrap` and packed into a read-only erofs
//! image. The guest mounts it as the lower layer of an overlay, so one
//! image serves every VM and none of them can change it.
//!
//! As root, `mmdebstrap` writes a directory directly. As an ordinary user it
//! runs in `unshare` mode and writes a tarball; the tree is then unpacked
//! and packed inside a user namespace mapped with the user's subordinate
//! ids, so file ownership inside the image is still right. Device nodes
//! cannot be made there and are left out: the guest mounts devtmpfs over
//! `/dev` anyway.

use std::fs;
use std::path::{Path, PathBuf};

use crate::command::{run, tool};
use crate::host_tool::is_root;
use crate::{AssetError, Cache, Progress};

/// File name of the default image in the cache's `images/` directory.
pub const DEFAULT_IMAGE: &str = "debian-bookworm-minbase.erofs";

/// Debian suite of the default image (and of every preset built on it).
pub const SUITE: &str = "bookworm";

/// Packages added to `minbase`: `mount` for remounts and `procps` for `ps`.
pub const BASE_PACKAGES: &[&str] = &["mount", "procps"];

/// Path of the default image, whether it exists yet or not.
pub fn default_image_path(cache: &Cache) -> PathBuf {
    cache.root().join("images").join(DEFAULT_IMAGE)
}

/// The default image, built first if it is missing.
pub fn ensure_default(cache: &Cache, progress: &dyn Progress) -> Result<PathBuf, AssetError> {
    let path = default_image_path(cache);
    if path.is_file() {
        return Ok(path);
    }
    build_default(cache, progress)?;
    Ok(path)
}

/// Builds the default image, replacing any existing one.
pub fn build_default(cache: &Cache, progress: &dyn Progress) -> Result<PathBuf, AssetError> {
    let images = cache.dir("images")?;
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&images)
        .map_err(AssetError::io("cannot create a build directory"))?;
    let image = work.path().join(DEFAULT_IMAGE);
    // mmdebstrap's own temporary files (a gpg home among them, which it
    // does not always remove) go where the build directory's removal
    // takes them, never into the caller's TMPDIR.
    let scratch = work.path().join("tmp");
    fs::create_dir(&scratch).map_err(AssetError::io("cannot create a build directory"))?;
    progress.step(&format!(
        "building Debian {SUITE} minbase with mmdebstrap (takes a minute)"
    ));
    if is_root() {
        let tree = work.path().join("tree");
        run(&mut mmdebstrap(&[], &scratch, &tree, true))?;
        progress.step("packing the erofs image");
        run(tool("mkfs.erofs").arg("--quiet").arg(&image).arg(&tree))?;
        remove_tree(&tree)?;
    } else {
        let tarball = work.path().join("rootfs.tar");
        run(&mut mmdebstrap(&[], &scratch, &tarball, true))?;
        progress.step("packing the erofs image");
        run(tool("unshare")
            .args(["--map-auto", "--map-root-user", "--", "sh", "-euc"])
            .arg("mkdir tree && tar --exclude='./dev/*' -xf rootfs.tar -C tree && mkfs.erofs --quiet image.erofs tree && rm -rf tree")
            .current_dir(work.path()))?;
        fs::rename(work.path().join("image.erofs"), &image)
            .map_err(AssetError::io("cannot move the packed image"))?;
    }
    let target = images.join(DEFAULT_IMAGE);
    fs::rename(&image, &target)
        .map_err(AssetError::io(format!("cannot store {}", target.display())))?;
    progress.finish();
    Ok(target)
}

/// The `mmdebstrap` command that builds Debian [`SUITE`] `minbase` with
/// [`BASE_PACKAGES`] and `packages` into `target` (a directory, or a
/// tarball when it ends in `.tar`), its temporary files in `scratch`;
/// `quiet` keeps its `I:` progress lines off stderr.
/// As root it builds directly; as an ordinary user in a user namespace
/// mapped with the user's subordinate ids (`unshare` mode), where only a
/// tarball keeps the owners right.
pub fn mmdebstrap(
    packages: &[&str],
    scratch: &Path,
    target: &Path,
    quiet: bool,
) -> std::process::Command {
    let mode = if is_root() { "root" } else { "unshare" };
    let mut command = tool("mmdebstrap");
    command.env("TMPDIR", scratch);
    if quiet {
        command.arg("--quiet");
    }
    command
        .arg("--variant=minbase")
        .arg(format!("--mode={mode}"))
        .arg(format!(
            "--include={}",
            [BASE_PACKAGES, packages].concat().join(",")
        ))
        .arg(SUITE)
        .arg(target);
    command
}

fn remove_tree(tree: &Path) -> Result<(), AssetError> {
    fs::remove_dir_all(tree).map_err(AssetError::io(format!("cannot remove {}", tree.display())))
}

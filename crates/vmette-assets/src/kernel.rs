//! Debian's cloud kernel: fetched by package name, unpacked into the cache.
//!
//! `apt-cache depends linux-image-cloud-<arch>` names the current image
//! package; `apt-get download` fetches it as any user and `dpkg-deb -x`
//! unpacks it, so nothing is installed on the host. The package has no
//! `modules.dep`; [`crate::initramfs`] reads dependencies from the modules.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::command::{run, tool};
use crate::{AssetError, Cache, Progress};

/// A kernel image and the module tree built with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The kernel release, as `uname -r` prints it in the guest.
    pub release: String,
    /// The bootable image (`vmlinuz`).
    pub image: PathBuf,
    /// `lib/modules/<release>` of the same kernel, when known.
    pub modules: Option<PathBuf>,
}

/// The Debian meta-package that always depends on the current cloud kernel.
pub fn meta_package() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "linux-image-cloud-arm64"
    } else {
        "linux-image-cloud-amd64"
    }
}

/// Marker written once a package is completely unpacked.
const COMPLETE: &str = ".complete";

/// The cloud kernel in the cache, fetching it first if there is none.
pub fn ensure(cache: &Cache, progress: &dyn Progress) -> Result<Kernel, AssetError> {
    if let Some(kernel) = cached(cache)? {
        return Ok(kernel);
    }
    fetch(cache, progress)
}

/// The newest completely unpacked kernel in the cache, if any.
pub fn cached(cache: &Cache) -> Result<Option<Kernel>, AssetError> {
    let dir = cache.root().join("kernel");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(None);
    };
    // Only kernels of this host's architecture: a cache may also hold
    // another architecture's kernel (for tests of the macOS guest).
    let flavour = meta_package().trim_start_matches("linux-image");
    let mut trees: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(COMPLETE).is_file())
        .filter(|p| p.to_string_lossy().ends_with(flavour))
        .collect();
    trees.sort();
    match trees.pop() {
        Some(tree) => from_tree(&tree).map(Some),
        None => Ok(None),
    }
}

/// Downloads and unpacks the current cloud kernel package.
pub fn fetch(cache: &Cache, progress: &dyn Progress) -> Result<Kernel, AssetError> {
    let meta = meta_package();
    progress.step(&format!("resolving {meta}"));
    let output = run(tool("apt-cache").args(["depends", meta]))?;
    let package = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|dep| dep.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| AssetError::NoKernelPackage {
            meta: meta.to_string(),
        })?;

    let kernels = cache.dir("kernel")?;
    let target = kernels.join(&package);
    if target.join(COMPLETE).is_file() {
        return from_tree(&target);
    }
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&kernels)
        .map_err(AssetError::io("cannot create a download directory"))?;
    progress.step(&format!("downloading {package}"));
    run(tool("apt-get")
        .args(["download", "-q", &package])
        .current_dir(work.path()))?;
    let deb = fs::read_dir(work.path())
        .map_err(AssetError::io("cannot list the download directory"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|ext| ext == "deb"))
        .ok_or_else(|| AssetError::NoKernelPackage {
            meta: meta.to_string(),
        })?;
    progress.step(&format!("unpacking {package}"));
    let tree = work.path().join("tree");
    run(tool("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    fs::write(tree.join(COMPLETE), package.as_bytes())
        .map_err(AssetError::io("cannot mark the kernel complete"))?;
    if target.exists() {
        fs::remove_dir_all(&target).map_err(AssetError::io(format!(
            "cannot replace {}",
            target.display()
        )))?;
    }
    fs::rename(&tree, &target).map_err(AssetError::io(format!(
        "cannot move the kernel to {}",
        target.display()
    )))?;
    progress.finish();
    from_tree(&target)
}

/// The kernel in an unpacked kernel package (`boot/vmlinuz-*`,
/// `lib/modules/*`).
pub fn from_tree(tree: &Path) -> Result<Kernel, AssetError> {
    let boot = tree.join("boot");
    let image = fs::read_dir(&boot)
        .map_err(AssetError::io(format!("cannot read {}", boot.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| AssetError::Io {
            context: format!("no vmlinuz in {}", boot.display()),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
    let release = image
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let modules = tree.join("lib/modules").join(&release);
    Ok(Kernel {
        modules: modules.is_dir().then_some(modules),
        release,
        image,
    })
}

/// Describes a kernel image the user chose: its release is read from the
/// image header, and its modules are looked for beside it
/// (`../lib/modules/<release>` of an unpacked package) and in the cache.
pub fn for_image(cache: &Cache, image: &Path) -> Result<Kernel, AssetError> {
    let release = release_of(image)?;
    let beside = image
        .parent()
        .and_then(Path::parent)
        .map(|tree| tree.join("lib/modules").join(&release))
        .filter(|dir| dir.is_dir());
    let in_cache = || {
        cached(cache)
            .ok()
            .flatten()
            .filter(|k| k.release == release)
            .and_then(|k| k.modules)
    };
    Ok(Kernel {
        modules: beside.or_else(in_cache),
        release,
        image: image.to_path_buf(),
    })
}

/// Reads the release string from an x86 `bzImage` header (the
/// `kernel_version` field of the boot protocol). Other formats give an
/// empty release, which matches no module tree.
pub fn release_of(image: &Path) -> Result<String, AssetError> {
    let mut header = vec![0u8; 0x8000];
    let mut file = fs::File::open(image).map_err(AssetError::io(format!(
        "cannot open kernel {}",
        image.display()
    )))?;
    let len = file.read(&mut header).map_err(AssetError::io(format!(
        "cannot read kernel {}",
        image.display()
    )))?;
    header.truncate(len);
    Ok(bzimage_release(&header).unwrap_or_default())
}

fn bzimage_release(header: &[u8]) -> Option<String> {
    if header.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let pointer = u16::from_le_bytes([*header.get(0x20e)?, *header.get(0x20f)?]) as usize;
    let start = pointer.checked_add(0x200)?;
    let text = header.get(start..)?;
    let end = text.iter().position(|&b| b == 0 || b == b' ')?;
    std::str::from_utf8(&text[..end]).ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_release_from_a_bzimage_header() {
        let mut header = vec![0u8; 0x1000];
        header[0x202..0x206].copy_from_slice(b"HdrS");
        header[0x20e..0x210].copy_from_slice(&0x0300u16.to_le_bytes());
        let text = b"6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1\0";
        header[0x500..0x500 + text.len()].copy_from_slice(text);
        assert_eq!(
            bzimage_release(&header).as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
    }

    #[test]
    fn ignores_images_without_a_boot_header() {
        assert_eq!(bzimage_release(&[0u8; 0x1000]), None);
        assert_eq!(bzimage_release(&[]), None);
        let mut header = vec![0u8; 0x210];
        header[0x202..0x206].copy_from_slice(b"HdrS");
        header[0x20e..0x210].copy_from_slice(&0xff00u16.to_le_bytes());
        assert_eq!(bzimage_release(&header), None);
    }
}

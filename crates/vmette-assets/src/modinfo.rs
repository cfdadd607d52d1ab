//! Reads a kernel module's dependencies from its own `.modinfo` section,
//! which is what `depmod` itself reads to write `modules.dep`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::AssetError;

/// Module names use `_` and `-` interchangeably; the kernel treats them
/// as one. This is the canonical form.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The `depends=` modules of the module at `path`.
pub fn depends(path: &Path) -> Result<Vec<String>, AssetError> {
    let bytes =
        fs::read(path).map_err(AssetError::io(format!("cannot read {}", path.display())))?;
    let metadata_error = |reason: String| AssetError::ModuleMetadata {
        path: path.to_path_buf(),
        reason,
    };
    let file = object::File::parse(&*bytes).map_err(|e| metadata_error(e.to_string()))?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| metadata_error("no .modinfo section".into()))?;
    let data = section.data().map_err(|e| metadata_error(e.to_string()))?;
    Ok(parse_depends(data))
}

fn parse_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|name| !name.is_empty())
                .map(canonical)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Maps every module name under `tree` to its file.
pub fn index(tree: &Path) -> HashMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut HashMap<String, PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => walk(&path, out),
                Ok(_) => {
                    if let Some(name) = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_suffix(".ko"))
                    {
                        out.insert(canonical(name), path);
                    }
                }
                Err(_) => {}
            }
        }
    }
    let mut out = HashMap::new();
    walk(tree, &mut out);
    out
}

/// Names of the modules built into the kernel, from `modules.builtin`.
pub fn builtin(tree: &Path) -> HashSet<String> {
    fs::read_to_string(tree.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .filter_map(|file| file.strip_suffix(".ko"))
        .map(canonical)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_depends_among_other_fields() {
        let modinfo = b"license=GPL\0depends=virtio,virtio-ring\0name=virtio_blk\0";
        assert_eq!(parse_depends(modinfo), vec!["virtio", "virtio_ring"]);
    }

    #[test]
    fn empty_depends_means_none() {
        assert!(parse_depends(b"depends=\0name=x\0").is_empty());
        assert!(parse_depends(b"").is_empty());
    }
}

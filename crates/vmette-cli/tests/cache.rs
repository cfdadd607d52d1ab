//! `vmette cache list` and `vmette cache prune` on a cache laid out by the
//! test (no VM is needed).

mod support;

use std::path::Path;
use std::process::Command;

fn vmette(cache: &Path, args: &[&str]) -> serde_json::Value {
    let output = Command::new(support::vmette_bin())
        .args(args)
        .env("VMETTE_CACHE_DIR", cache)
        .output()
        .expect("vmette");
    assert!(output.status.success(), "{}", support::stderr(&output));
    serde_json::from_slice(&output.stdout).expect("JSON")
}

fn paths(value: &serde_json::Value) -> Vec<String> {
    value["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["path"].as_str().expect("path").to_string())
        .collect()
}

#[test]
fn prune_removes_stale_archives_and_unfinished_work_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path();
    let initramfs = cache.join("initramfs");
    std::fs::create_dir_all(&initramfs).expect("mkdir");
    std::fs::write(initramfs.join("stale.cpio"), b"old").expect("write");
    let image = cache.join("images/debian-bookworm-minbase.erofs");
    std::fs::create_dir_all(image.parent().expect("parent")).expect("mkdir");
    std::fs::write(&image, b"image").expect("write");
    let unfinished = cache.join("kernel/.fetch-1");
    std::fs::create_dir_all(&unfinished).expect("mkdir");

    let listed = vmette(cache, &["cache", "list", "--json"]);
    assert_eq!(paths(&listed).len(), 3, "{listed}");

    let preview = vmette(cache, &["cache", "prune", "--dry-run", "--json"]);
    assert!(unfinished.exists(), "a dry run removes nothing");
    let removed = vmette(cache, &["cache", "prune", "--json"]);
    assert_eq!(paths(&preview), paths(&removed));
    // Without a kernel in the cache no archive is current, so none is
    // thrown away on a guess; unfinished work always goes.
    assert_eq!(
        paths(&removed),
        vec![unfinished.display().to_string()],
        "{removed}"
    );
    assert!(initramfs.join("stale.cpio").exists());
    assert!(image.exists());
}

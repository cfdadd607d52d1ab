//! Root tarballs (`.tar`, gzip or zstd): converted once into the store,
//! keyed by the file's sha256, with the same rules as a registry's layers.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::store::{ImageRecord, Store};
use crate::{squash, ImageError, Settings};

/// The root of the tarball at `path`, packed on first use.
pub fn convert(
    store: &Store,
    word: &str,
    path: &Path,
    settings: &Settings,
) -> Result<(PathBuf, ImageRecord), ImageError> {
    let file_error = |reason: String| ImageError::File {
        path: word.to_string(),
        reason,
    };
    let canonical = std::fs::canonicalize(path).map_err(|e| file_error(e.to_string()))?;
    let metadata = std::fs::metadata(&canonical).map_err(|e| file_error(e.to_string()))?;
    if metadata.len() > settings.tarball_limit {
        return Err(file_error(format!(
            "the tarball is {} bytes, over the limit of {}",
            metadata.len(),
            settings.tarball_limit
        )));
    }
    let name = format!("file://{}", canonical.display());
    let fingerprint = format!(
        "{}:{}:{}:{}.{}",
        metadata.dev(),
        metadata.ino(),
        metadata.len(),
        metadata.ctime(),
        metadata.ctime_nsec()
    );
    let expected = crate::download::expected_digest(settings).map_err(file_error)?;
    let pinned = |digest: &str| expected.as_deref().is_none_or(|e| e == digest);
    if let Some(record) = store.lookup(&name) {
        if record.fingerprint.as_deref() == Some(fingerprint.as_str()) && pinned(&record.digest) {
            return Ok((store.root_path(&record.root), record));
        }
    }
    // Copied into the store as it is hashed, and packed from the copy: the
    // file may change under us, and the root must be what the digest says.
    let (digest, copy) = copy_hashed(store, &canonical, settings.tarball_limit)
        .map_err(|e| file_error(format!("cannot read it: {e}")))?;
    if let Some(expected) = expected.as_deref().filter(|e| *e != digest) {
        return Err(file_error(crate::download::mismatch(&digest, expected)));
    }
    store_and_pack(
        store,
        name,
        &digest,
        copy,
        Some(fingerprint),
        settings,
        word,
    )
}

/// Stores the tarball `file` (of `digest`) as a blob, packs its root and
/// records it under `name`: the one path of local and downloaded tarballs.
pub fn store_and_pack(
    store: &Store,
    name: String,
    digest: &str,
    file: tempfile::NamedTempFile,
    fingerprint: Option<String>,
    settings: &Settings,
    word: &str,
) -> Result<(PathBuf, ImageRecord), ImageError> {
    let blob = store.blob_path(digest);
    if !blob.is_file() {
        store.persist(file, &blob)?;
    }
    let key = crate::store::root_key(&[digest.to_string()]);
    let root = squash::pack(store, &key, &[blob], settings.limits, word)?;
    let record = ImageRecord {
        name,
        digest: digest.to_string(),
        config: None,
        layers: vec![digest.to_string()],
        root: key,
        fingerprint,
        stored: 0,
    };
    store.record(&record)?;
    Ok((root, record))
}

/// Whether `path` starts like a tar stream, plain or compressed.
pub fn looks_like_tarball(path: &Path) -> bool {
    let mut head = [0u8; 512];
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(seen) = crate::layers::read_up_to(&mut file, &mut head) else {
        return false;
    };
    crate::layers::Compression::of(&head[..seen]) != crate::layers::Compression::None
        || (seen == head.len() && &head[257..262] == b"ustar")
}

/// Copies `path` into a store temp file, at most `limit` bytes, and
/// returns its digest with the copy.
fn copy_hashed(
    store: &Store,
    path: &Path,
    limit: u64,
) -> std::io::Result<(String, tempfile::NamedTempFile)> {
    use std::io::Write;
    let file = std::fs::File::open(path)?;
    let mut copy = store
        .temp_file()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut hash = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut reader = file.take(limit.saturating_add(1));
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(std::io::Error::other(format!(
                "it grew past the limit of {limit} bytes while it was read"
            )));
        }
        hash.update(&buffer[..n]);
        copy.write_all(&buffer[..n])?;
    }
    Ok((format!("sha256:{}", hex::encode(hash.finalize())), copy))
}

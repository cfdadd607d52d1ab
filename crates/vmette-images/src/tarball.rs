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
    if let Some(record) = store.lookup(&name) {
        if record.fingerprint.as_deref() == Some(fingerprint.as_str()) {
            return Ok((store.root_path(&record.root), record));
        }
    }
    let digest = hash_file(&canonical).map_err(|e| file_error(format!("cannot read it: {e}")))?;
    let key = crate::store::root_key(std::slice::from_ref(&digest));
    let root = squash::pack(store, &key, &[canonical], settings.limits, word)?;
    let record = ImageRecord {
        name,
        digest: digest.clone(),
        config: None,
        layers: vec![digest],
        root: key,
        fingerprint: Some(fingerprint),
    };
    store.record(&record)?;
    Ok((root, record))
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hash = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hash.update(&buffer[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hash.finalize())))
}

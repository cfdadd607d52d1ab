//! Packing a flattened root into a read-only squashfs image with
//! `tar2sqfs` (squashfs-tools-ng), which reads the tar stream on stdin
//! and never touches the host's file system but for its output, so owners,
//! set-id bits, xattrs and hard links survive for an ordinary user.
//!
//! lz4, because the guest reads the root under emulation: it decompresses
//! several times faster there than zstd or xz, and packs a 580 MB tree in
//! 0.6 s here, where zstd took 24 s.

use std::io::{BufWriter, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::layers::{self, Layer, LayerError, Limits};
use crate::{ImageError, Store};

/// Most bytes of the packer's complaints kept for an error.
const STDERR_LIMIT: u64 = 4096;

/// Flattens `layers` into `store/roots/KEY.sqfs`, unless it is there.
pub fn pack(
    store: &Store,
    key: &str,
    layers: &[PathBuf],
    limits: Limits,
    reference: &str,
) -> Result<PathBuf, ImageError> {
    pack_when_ready(store, key, layers, limits, reference, &|_| true)
}

/// [`pack`], with each layer waited for by `ready` (see
/// [`layers::flatten_when_ready`]).
pub fn pack_when_ready(
    store: &Store,
    key: &str,
    layers: &[PathBuf],
    limits: Limits,
    reference: &str,
    ready: &dyn Fn(usize) -> bool,
) -> Result<PathBuf, ImageError> {
    let target = store.root_path(key);
    if target.is_file() {
        return Ok(target);
    }
    let output = store.temp_file()?;
    let failed = |reason: String| ImageError::Pack {
        reference: reference.to_string(),
        reason,
    };
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tool = vmette_core::assets::host_tool::locate("tar2sqfs")
        .unwrap_or_else(|| PathBuf::from("tar2sqfs"));
    let mut command = Command::new(tool);
    command
        .args(["--quiet", "--force", "--compressor", "lz4", "--num-jobs"])
        .arg(jobs.to_string())
        .arg(output.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = vmette_core::process::spawn_tool(&mut command).map_err(|e| {
        failed(format!(
            "cannot run tar2sqfs ({e}); install squashfs-tools-ng (./setup.sh does)"
        ))
    })?;
    let layer_refs: Vec<Layer<'_>> = layers.iter().map(|p| Layer { path: p }).collect();
    let flattened = match child.stdin.take() {
        Some(stdin) => {
            widen_pipe(&stdin);
            layers::flatten_when_ready(
                &layer_refs,
                limits,
                BufWriter::with_capacity(PIPE_BYTES, stdin),
                ready,
            )
        }
        None => Err(LayerError::Write(std::io::Error::other(
            "no pipe to tar2sqfs",
        ))),
    };
    if flattened.is_err() {
        let _ = child.kill();
    }
    let mut complaint = String::new();
    if let Some(stderr) = child.stderr.take() {
        let _ = stderr.take(STDERR_LIMIT).read_to_string(&mut complaint);
    }
    let status = child
        .wait()
        .map_err(|e| failed(format!("cannot wait for tar2sqfs: {e}")))?;
    match flattened {
        Err(LayerError::Write(_)) if !status.success() => {
            return Err(failed(format!("tar2sqfs failed: {}", complaint.trim())))
        }
        Err(error) => {
            return Err(ImageError::Refused {
                reference: reference.to_string(),
                reason: error.to_string(),
            })
        }
        Ok(()) if !status.success() => {
            return Err(failed(format!("tar2sqfs failed: {}", complaint.trim())))
        }
        Ok(()) => {}
    }
    if !is_squashfs(output.as_file()) {
        return Err(failed("tar2sqfs wrote no squashfs image".into()));
    }
    output
        .as_file()
        .sync_all()
        .map_err(ImageError::store("cannot flush a packed root"))?;
    // A root is never replaced once stored: a VM's lease is on the file
    // there, and a second packer of the same layers made the same root.
    store.persist_new(output, &target)?;
    Ok(target)
}

/// Whether `file` holds a squashfs image whose superblock fits in it: a
/// packer that exits 0 without writing one must not leave a root that no
/// boot can mount.
fn is_squashfs(file: &std::fs::File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut superblock = [0u8; 96];
    if file.read_exact_at(&mut superblock, 0).is_err() || &superblock[..4] != b"hsqs" {
        return false;
    }
    let mut used = [0u8; 8];
    used.copy_from_slice(&superblock[40..48]);
    file.metadata()
        .is_ok_and(|m| m.len() >= u64::from_le_bytes(used))
}

/// The pipe to the packer, and the writes into it: large, so that the
/// flattening and the packer run side by side instead of waking each other
/// for every 64 KiB.
const PIPE_BYTES: usize = 1 << 20;

#[cfg(target_os = "linux")]
fn widen_pipe(pipe: &std::process::ChildStdin) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ takes an int and changes only the pipe's buffer;
    // a refusal (a lower pipe-max-size) leaves the pipe as it was.
    unsafe {
        libc::fcntl(
            pipe.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            PIPE_BYTES as libc::c_int,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn widen_pipe(_pipe: &std::process::ChildStdin) {}

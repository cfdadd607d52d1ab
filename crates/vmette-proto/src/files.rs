//! File operations on the guest's file system.
//!
//! A file operation has an id from the same space as execs and reuses
//! their data messages: what goes into the guest (a file's bytes, a tar
//! stream to unpack) travels as [`crate::HostMessage::Stdin`] chunks under
//! the stdin window, ended by [`crate::HostMessage::StdinEof`]; what comes
//! out (a file's bytes, a tar stream of a tree) travels as
//! [`crate::GuestMessage::Stdout`] chunks under the output credit. Each
//! operation ends with one [`crate::GuestMessage::FileDone`].

use serde::{Deserialize, Serialize};

use crate::messages::{check_guest_path, invalid, ExecId, InvalidMessage};

/// Most entries one directory listing returns; a longer one says
/// `truncated`.
pub const MAX_LIST_ENTRIES: usize = 1024;

/// Longest file name in a listing, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// Longest error message, in bytes.
pub const MAX_FILE_MESSAGE: usize = 1024;

/// A file operation the host asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRequest {
    /// The host's id for this operation, unique among execs and files.
    pub id: ExecId,
    /// What to do.
    pub op: FileOp,
}

/// What a [`FileRequest`] does. Paths are absolute guest paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileOp {
    /// Write the bytes that follow as stdin to a file, replacing it.
    Write {
        /// The file.
        path: String,
        /// Its permission bits (at most 0o7777).
        mode: u32,
        /// Create missing parent directories.
        parents: bool,
        /// Fail with [`FileErrorKind::TooLarge`] past this many bytes.
        limit: u64,
    },
    /// Send a file's bytes as stdout.
    Read {
        /// The file.
        path: String,
        /// Fail with [`FileErrorKind::TooLarge`] if it is larger.
        limit: u64,
    },
    /// List a directory.
    List {
        /// The directory.
        path: String,
    },
    /// Describe one path, without following a final symlink.
    Stat {
        /// The path.
        path: String,
    },
    /// Make a directory.
    MakeDir {
        /// The directory.
        path: String,
        /// Create missing parents, and succeed if it exists.
        parents: bool,
        /// Its permission bits (at most 0o7777).
        mode: u32,
    },
    /// Remove a file, a symlink or an empty directory.
    Remove {
        /// The path.
        path: String,
        /// Remove a directory with everything in it.
        recursive: bool,
    },
    /// Unpack the tar stream that follows as stdin into a directory,
    /// creating it; members that would land outside it are refused.
    TarIn {
        /// The directory.
        path: String,
        /// Fail with [`FileErrorKind::TooLarge`] past this many bytes.
        limit: u64,
    },
    /// Send a tar stream of a directory's contents (or of one file) as
    /// stdout; symlinks are stored, not followed.
    TarOut {
        /// The directory or file.
        path: String,
        /// Fail with [`FileErrorKind::TooLarge`] past this many bytes.
        limit: u64,
    },
}

/// How a file operation ended well.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileReply {
    /// Done; for a transfer, this many bytes of data moved.
    Done {
        /// Bytes written or sent.
        bytes: u64,
    },
    /// The path described.
    Stat(FileStat),
    /// The directory's entries.
    Entries {
        /// At most [`MAX_LIST_ENTRIES`] of them, sorted by name.
        entries: Vec<DirEntry>,
        /// The directory has more.
        truncated: bool,
    },
}

/// What kind of file a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, fifo, socket).
    Other,
}

/// One path's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// Its kind.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub modified: i64,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// The entry's name, at most [`MAX_NAME_LEN`] bytes, lossily UTF-8.
    pub name: String,
    /// Its metadata.
    pub stat: FileStat,
}

/// Why a file operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileError {
    /// The kind of failure.
    pub kind: FileErrorKind,
    /// One sentence, at most [`MAX_FILE_MESSAGE`] bytes.
    pub message: String,
}

/// Kinds of file operation failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileErrorKind {
    /// The path does not exist.
    NotFound,
    /// A directory where a file was expected.
    IsADirectory,
    /// A file where a directory was expected.
    NotADirectory,
    /// Over the transfer's size limit.
    TooLarge,
    /// Something is in the way.
    AlreadyExists,
    /// Not allowed.
    PermissionDenied,
    /// A tar member would land outside the target directory.
    Escape,
    /// A tar stream that cannot be read.
    Malformed,
    /// Anything else.
    Other,
    /// The operation made no progress for too long (host-side only).
    TimedOut,
}

impl FileOp {
    /// The path the operation works on.
    pub fn path(&self) -> &str {
        match self {
            FileOp::Write { path, .. }
            | FileOp::Read { path, .. }
            | FileOp::List { path }
            | FileOp::Stat { path }
            | FileOp::MakeDir { path, .. }
            | FileOp::Remove { path, .. }
            | FileOp::TarIn { path, .. }
            | FileOp::TarOut { path, .. } => path,
        }
    }

    /// Whether the host sends data for it (as stdin).
    pub fn takes_input(&self) -> bool {
        matches!(self, FileOp::Write { .. } | FileOp::TarIn { .. })
    }

    /// Whether the guest sends data for it (as stdout).
    pub fn gives_output(&self) -> bool {
        matches!(self, FileOp::Read { .. } | FileOp::TarOut { .. })
    }
}

impl FileRequest {
    pub(crate) fn validate(&self) -> Result<(), InvalidMessage> {
        check_guest_path("file path", self.op.path())?;
        if self.op.path().len() > 4096 {
            return invalid("file path", "longer than 4096 bytes");
        }
        match &self.op {
            FileOp::Write { mode, .. } | FileOp::MakeDir { mode, .. } if *mode > 0o7777 => {
                invalid("file mode", "must be at most 0o7777")
            }
            FileOp::Remove { path, .. } if path.trim_end_matches('/').is_empty() => {
                invalid("file path", "the root cannot be removed")
            }
            _ => Ok(()),
        }
    }
}

impl FileReply {
    pub(crate) fn validate(&self) -> Result<(), InvalidMessage> {
        if let FileReply::Entries { entries, .. } = self {
            if entries.len() > MAX_LIST_ENTRIES {
                return invalid("directory listing", "too many entries");
            }
            if entries.iter().any(|e| {
                e.name.is_empty()
                    || e.name.len() > MAX_NAME_LEN * 3
                    || e.name == "."
                    || e.name == ".."
                    || e.name.contains(['/', '\0'])
            }) {
                return invalid(
                    "directory listing",
                    "an entry name is empty, too long, a dot name, or has '/' or NUL",
                );
            }
            // Sorted and unique, as documented; a caller may rely on it.
            if entries.windows(2).any(|pair| pair[0].name >= pair[1].name) {
                return invalid("directory listing", "names are not sorted and unique");
            }
        }
        Ok(())
    }
}

impl FileError {
    pub(crate) fn validate(&self) -> Result<(), InvalidMessage> {
        if self.message.len() > MAX_FILE_MESSAGE {
            return invalid("file error", "message too long");
        }
        Ok(())
    }
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(names: &[&str]) -> FileReply {
        FileReply::Entries {
            entries: names
                .iter()
                .map(|name| DirEntry {
                    name: name.to_string(),
                    stat: FileStat {
                        kind: FileKind::File,
                        size: 0,
                        mode: 0o644,
                        modified: 0,
                    },
                })
                .collect(),
            truncated: false,
        }
    }

    #[test]
    fn listings_have_plain_sorted_unique_names() {
        assert_eq!(listing(&["a", "b", "c"]).validate(), Ok(()));
        for bad in [
            &["b", "a"][..],
            &["a", "a"],
            &[".."],
            &["."],
            &["a/b"],
            &["a\0"],
            &[""],
        ] {
            assert!(listing(bad).validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn requests_need_absolute_clean_paths_and_sane_modes() {
        let request = |op| FileRequest { id: 1, op };
        assert!(request(FileOp::Stat { path: "rel".into() })
            .validate()
            .is_err());
        assert!(request(FileOp::Stat {
            path: "/a/../b".into()
        })
        .validate()
        .is_err());
        assert!(request(FileOp::Remove {
            path: "/".into(),
            recursive: true
        })
        .validate()
        .is_err());
        assert!(request(FileOp::MakeDir {
            path: "/a".into(),
            parents: false,
            mode: 0o17777
        })
        .validate()
        .is_err());
        assert_eq!(
            request(FileOp::Stat {
                path: "/etc".into()
            })
            .validate(),
            Ok(())
        );
    }
}

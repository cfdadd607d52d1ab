//! Directory trees across the VM boundary as tar streams, like `docker cp`.
//!
//! [`pack`] turns a host directory into a tar stream to send into a guest.
//! [`unpack`] writes a tar stream the guest produced into a host directory.
//! The guest is hostile, so `unpack` treats every member as an attack: it
//! walks each path one component at a time from an open handle on the
//! target without following symlinks, so nothing the stream names can land
//! outside the target.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{linkat, symlinkat, unlinkat, UnlinkatFlags};

/// Limits for one [`unpack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// The most bytes all members may declare together.
    pub max_total_bytes: u64,
    /// The most members the stream may hold.
    pub max_entries: u64,
}

/// What one [`unpack`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Regular files created.
    pub files: u64,
    /// Directory members applied.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hard links created.
    pub hard_links: u64,
    /// File content bytes written.
    pub bytes: u64,
}

/// Why an [`unpack`] stopped. Whatever it wrote before stays in the target.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// A member tried to reach outside the target.
    #[error("tar member {path:?} escapes the target: {reason}")]
    Escape {
        /// The member's path as the stream gave it.
        path: String,
        /// How it tried to escape.
        reason: &'static str,
    },
    /// A member is of a kind that is never unpacked (device, fifo, ...).
    #[error("tar member {path:?} is a {kind}, which is not unpacked")]
    Unsupported {
        /// The member's path as the stream gave it.
        path: String,
        /// What kind of member it is.
        kind: &'static str,
    },
    /// The stream holds more bytes or members than the limits allow.
    #[error("tar stream exceeds the limit of {limit}")]
    TooLarge {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// The stream is not a tar archive the host can parse.
    #[error("malformed tar stream: {0}")]
    Malformed(String),
    /// Writing into the target failed.
    #[error("cannot unpack {path:?}")]
    Io {
        /// The member's path as the stream gave it.
        path: String,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
}

/// The most header bytes (pax records, GNU long names) read between two
/// members. The tar crate buffers these whole, so they need their own bound.
const MAX_HEADER_BYTES: u64 = 1 << 20;

/// Longest member path accepted, in bytes (Linux's `PATH_MAX`): longer
/// ones would leave a tree most host tools cannot handle.
const MAX_PATH_BYTES: usize = 4096;

/// Deepest member path accepted, in components; every member costs one
/// `openat` per level.
const MAX_DEPTH: usize = 256;

/// What each inode created counts against the byte limit, on top of file
/// data: a stream of empty files or deep paths still fills the host's
/// disk with metadata.
const INODE_COST: u64 = 512;

/// Unpacks the tar stream `source` into the existing directory `target`.
///
/// Regular files, directories, symlinks and hard links to files unpacked
/// earlier in the same stream are supported; anything else is refused.
/// Modes keep only the permission bits; ownership is never applied.
pub fn unpack(
    source: impl Read,
    target: &Path,
    limits: &UnpackLimits,
) -> Result<Unpacked, UnpackError> {
    let root = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(target)
        .map_err(|source| io_error(&target.to_string_lossy(), source))?;
    let budget = Cell::new(MAX_HEADER_BYTES);
    let exhausted = Cell::new(false);
    let reader = Budgeted {
        inner: source,
        budget: &budget,
        exhausted: &exhausted,
    };
    let stream_error = |e: io::Error| match exhausted.get() {
        true => UnpackError::TooLarge {
            limit: MAX_HEADER_BYTES,
        },
        false => UnpackError::Malformed(e.to_string()),
    };
    let mut archive = tar::Archive::new(reader);
    let mut state = State {
        root: root.into(),
        files: HashSet::new(),
        dirs: HashMap::new(),
        out: Unpacked::default(),
        implicit_dirs: Cell::new(0),
    };
    let (mut entries, mut total) = (0u64, 0u64);
    let over = |entries: u64, total: u64| {
        if entries > limits.max_entries {
            return Err(UnpackError::TooLarge {
                limit: limits.max_entries,
            });
        }
        if total > limits.max_total_bytes {
            return Err(UnpackError::TooLarge {
                limit: limits.max_total_bytes,
            });
        }
        Ok(())
    };
    for entry in archive.entries().map_err(stream_error)? {
        let mut entry = entry.map_err(stream_error)?;
        entries += 1;
        let size = entry.size();
        total = total.saturating_add(size).saturating_add(INODE_COST);
        over(entries, total)?;
        // Covers this member's data and padding plus the next member's headers.
        budget.set(size.saturating_add(512 + MAX_HEADER_BYTES));
        state.member(&mut entry)?;
        // Parents the member did not list were made for it; they count too.
        let implicit = state.implicit_dirs.take();
        entries += implicit;
        total = total.saturating_add(implicit.saturating_mul(INODE_COST));
        over(entries, total)?;
    }
    state.finish()
}

/// Limits how much the tar parser may read before the next member, so a
/// hostile header cannot make the host buffer unbounded data.
struct Budgeted<'a, R> {
    inner: R,
    budget: &'a Cell<u64>,
    exhausted: &'a Cell<bool>,
}

impl<R: Read> Read for Budgeted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.budget.get();
        if left == 0 && !buf.is_empty() {
            self.exhausted.set(true);
            return Err(io::Error::other("tar header data over budget"));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.set(left - n as u64);
        Ok(n)
    }
}

struct State {
    root: OwnedFd,
    /// Regular files this unpack created, the only valid hard link targets.
    files: HashSet<Vec<u8>>,
    /// Directory modes to apply once their contents are written.
    dirs: HashMap<Vec<u8>, u32>,
    out: Unpacked,
    /// Parent directories created for the current member without a
    /// member of their own.
    implicit_dirs: Cell<u64>,
}

impl State {
    fn member<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(()); // metadata for the whole stream; nothing to write
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let parts = member_parts(&raw).map_err(|reason| escape(&shown, reason))?;
        let unsupported = |kind| {
            Err(UnpackError::Unsupported {
                path: shown.clone(),
                kind,
            })
        };
        let Some((name, parent)) = parts.split_last() else {
            return match kind.is_dir() {
                true => Ok(()), // `.` is the target itself, which stays as the host made it
                false => Err(escape(&shown, "member replaces the target itself")),
            };
        };
        let key = path_key(&parts);
        // Nothing the guest sends becomes writable by other users of the
        // host, or unreadable by its owner.
        let mode = || match entry.header().mode() {
            Ok(mode) if kind.is_dir() => Ok(mode & 0o755 | 0o700),
            Ok(mode) => Ok(mode & 0o755),
            Err(e) => Err(UnpackError::Malformed(e.to_string())),
        };
        match kind {
            tar::EntryType::Directory => {
                let mode = mode()?;
                let dir = self.open_dir(parent, &shown, true)?;
                match mkdirat(&dir, *name, Mode::S_IRWXU) {
                    Err(Errno::EEXIST) => match kind_at(&dir, name) {
                        Some(SFlag::S_IFDIR) => {}
                        Some(SFlag::S_IFLNK) => {
                            return Err(escape(&shown, "directory over a symlink"))
                        }
                        _ => return Err(io_error(&shown, Errno::EEXIST.into())),
                    },
                    r => r.map_err(|e| io_error(&shown, e.into()))?,
                }
                self.dirs.insert(key, mode);
                self.out.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mode = Mode::from_bits_truncate(mode()? as libc::mode_t);
                let dir = self.open_dir(parent, &shown, true)?;
                let flags = OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC;
                let create = || openat(&dir, *name, flags, Mode::S_IRUSR | Mode::S_IWUSR);
                let fd = match create() {
                    Err(Errno::EEXIST) => match kind_at(&dir, name) {
                        // Unlink rather than truncate, so a hard link to the old file keeps its data.
                        Some(SFlag::S_IFREG) => unlinkat(&dir, *name, UnlinkatFlags::NoRemoveDir)
                            .and_then(|()| create()),
                        Some(SFlag::S_IFLNK) => return Err(escape(&shown, "file over a symlink")),
                        _ => Err(Errno::EEXIST),
                    },
                    r => r,
                }
                .map_err(|e| io_error(&shown, e.into()))?;
                let mut file = fs::File::from(fd);
                self.out.bytes += copy_exact(entry, entry.size(), &mut file, &shown)?;
                fchmod(&file, mode).map_err(|e| io_error(&shown, e.into()))?;
                self.files.insert(key);
                self.out.files += 1;
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name_bytes().ok_or_else(|| {
                    UnpackError::Malformed(format!("symlink {shown:?} has no target"))
                })?;
                let dir = self.open_dir(parent, &shown, true)?;
                symlinkat(OsStr::from_bytes(&link), &dir, *name)
                    .map_err(|e| io_error(&shown, e.into()))?;
                self.out.symlinks += 1;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        UnpackError::Malformed(format!("hard link {shown:?} has no target"))
                    })?
                    .into_owned();
                let shown = format!("{shown} -> {}", String::from_utf8_lossy(&link));
                let from = member_parts(&link).map_err(|reason| escape(&shown, reason))?;
                let Some((from_name, from_parent)) = from
                    .split_last()
                    .filter(|_| self.files.contains(&path_key(&from)))
                else {
                    return Err(escape(
                        &shown,
                        "hard link to something this stream did not unpack as a file",
                    ));
                };
                let from_dir = self.open_dir(from_parent, &shown, false)?;
                if kind_at(&from_dir, from_name) != Some(SFlag::S_IFREG) {
                    return Err(escape(
                        &shown,
                        "hard link to something that is no longer a file",
                    ));
                }
                let dir = self.open_dir(parent, &shown, true)?;
                linkat(&from_dir, *from_name, &dir, *name, AtFlags::empty())
                    .map_err(|e| io_error(&shown, e.into()))?;
                self.files.insert(key);
                self.out.hard_links += 1;
            }
            tar::EntryType::Char => return unsupported("character device"),
            tar::EntryType::Block => return unsupported("block device"),
            tar::EntryType::Fifo => return unsupported("fifo"),
            tar::EntryType::GNUSparse => return unsupported("sparse file"),
            _ => return unsupported("member of unknown type"),
        }
        Ok(())
    }

    /// Opens the directory `parts` names under the root, refusing to pass
    /// through a symlink; with `create`, makes missing directories on the way.
    fn open_dir(
        &self,
        parts: &[&OsStr],
        shown: &str,
        create: bool,
    ) -> Result<OwnedFd, UnpackError> {
        let mut dir = self.root.try_clone().map_err(|e| io_error(shown, e))?;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        for part in parts {
            let mut opened = openat(&dir, *part, flags, Mode::empty());
            if create && matches!(opened, Err(Errno::ENOENT)) {
                match mkdirat(&dir, *part, Mode::from_bits_truncate(0o755)) {
                    Ok(()) => {
                        self.implicit_dirs.set(self.implicit_dirs.get() + 1);
                        opened = openat(&dir, *part, flags, Mode::empty())
                    }
                    Err(Errno::EEXIST) => opened = openat(&dir, *part, flags, Mode::empty()),
                    Err(e) => opened = Err(e),
                }
            }
            dir = match opened {
                Ok(next) => next,
                Err(_) if kind_at(&dir, part) == Some(SFlag::S_IFLNK) => {
                    return Err(escape(shown, "path goes through a symlink"));
                }
                Err(e) => return Err(io_error(shown, e.into())),
            };
        }
        Ok(dir)
    }

    /// Applies directory modes, deepest first, so a parent that loses owner
    /// write or search permission does not block its children.
    fn finish(self) -> Result<Unpacked, UnpackError> {
        let mut dirs: Vec<_> = self.dirs.iter().collect();
        dirs.sort_by_key(|(key, _)| std::cmp::Reverse(key.iter().filter(|b| **b == b'/').count()));
        for (key, mode) in dirs {
            let shown = String::from_utf8_lossy(key);
            let parts: Vec<&OsStr> = key.split(|b| *b == b'/').map(OsStr::from_bytes).collect();
            let dir = self.open_dir(&parts, &shown, false)?;
            fchmod(&dir, Mode::from_bits_truncate(*mode as libc::mode_t))
                .map_err(|e| io_error(&shown, e.into()))?;
        }
        Ok(self.out)
    }
}

/// Splits a member path into components, refusing absolute paths and `..`.
/// Empty and `.` components are dropped, so `./a//b` is `a/b`.
fn member_parts(raw: &[u8]) -> Result<Vec<&OsStr>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err("path longer than 4096 bytes");
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path contains `..`"),
            _ => parts.push(OsStr::from_bytes(part)),
        }
    }
    if parts.len() > MAX_DEPTH {
        return Err("path deeper than 256 levels");
    }
    Ok(parts)
}

/// The key under which a member path is tracked: its parts joined by `/`.
fn path_key(parts: &[&OsStr]) -> Vec<u8> {
    parts
        .iter()
        .map(|p| p.as_bytes())
        .collect::<Vec<_>>()
        .join(&b'/')
}

/// Copies the member's data into `file`, which must be exactly `size`
/// bytes: the tar reader stops there, and a stream that ends sooner is cut.
fn copy_exact(
    entry: &mut impl Read,
    size: u64,
    file: &mut fs::File,
    shown: &str,
) -> Result<u64, UnpackError> {
    let mut data = entry.take(size);
    let (mut copied, mut buf) = (0, vec![0u8; 64 * 1024]);
    loop {
        match data.read(&mut buf) {
            Ok(0) if copied == size => return Ok(copied),
            Ok(0) => return Err(UnpackError::Malformed(format!("{shown:?} is cut short"))),
            Ok(n) => {
                file.write_all(&buf[..n]).map_err(|e| io_error(shown, e))?;
                copied += n as u64;
            }
            Err(e) => return Err(UnpackError::Malformed(e.to_string())),
        }
    }
}

/// The file type of `name` in `dir`, not following a symlink.
fn kind_at(dir: &OwnedFd, name: &OsStr) -> Option<SFlag> {
    let stat = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
    Some(SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT)
}

fn escape(path: &str, reason: &'static str) -> UnpackError {
    UnpackError::Escape {
        path: path.to_owned(),
        reason,
    }
}

fn io_error(path: &str, source: io::Error) -> UnpackError {
    UnpackError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes the contents of `dir` (not `dir` itself) to `sink` as a tar
/// stream of relative paths.
///
/// Regular files, directories and symlinks are packed with their modes;
/// symlinks are stored as links, never followed. Other kinds (sockets,
/// fifos, devices) are skipped.
pub fn pack(dir: &Path, sink: impl Write) -> io::Result<()> {
    let mut builder = tar::Builder::new(sink);
    pack_dir(&mut builder, dir, Path::new(""))?;
    builder.into_inner()?.flush()
}

fn pack_dir<W: Write>(builder: &mut tar::Builder<W>, dir: &Path, rel: &Path) -> io::Result<()> {
    let mut names = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    names.sort(); // the same tree always packs to the same stream
    for name in names {
        let (path, rel) = (dir.join(&name), rel.join(&name));
        let meta = fs::symlink_metadata(&path)?;
        let mut header = tar::Header::new_gnu();
        if meta.is_dir() {
            header.set_metadata(&meta);
            builder.append_data(&mut header, &rel, io::empty())?;
            pack_dir(builder, &path, &rel)?;
        } else if meta.file_type().is_symlink() {
            header.set_metadata(&meta);
            builder.append_link(&mut header, &rel, fs::read_link(&path)?)?;
        } else if meta.is_file() {
            // The path may have been swapped since it was listed: never follow a
            // symlink, never block opening a fifo, and describe what was opened.
            let mut file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)?;
            let meta = file.metadata()?;
            if !meta.is_file() {
                continue;
            }
            header.set_metadata(&meta);
            // Exactly the size the header declares, even if the file changes meanwhile.
            let data = (&mut file)
                .take(meta.len())
                .chain(io::repeat(0))
                .take(meta.len());
            builder.append_data(&mut header, &rel, data)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use std::path::PathBuf;
    use tar::EntryType;

    const LIMITS: UnpackLimits = UnpackLimits {
        max_total_bytes: 1 << 20,
        max_entries: 1000,
    };

    /// A member whose name and link bytes go into the header unchecked, as a
    /// hostile guest would write them.
    fn member(kind: EntryType, name: &str, link: &str, mode: u32, data: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_cksum();
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    fn file(name: &str, data: &[u8]) -> Vec<u8> {
        member(EntryType::Regular, name, "", 0o644, data)
    }

    fn link(kind: EntryType, name: &str, to: &str) -> Vec<u8> {
        member(kind, name, to, 0o777, b"")
    }

    fn stream(members: &[Vec<u8>]) -> Vec<u8> {
        let mut out = members.concat();
        out.extend_from_slice(&[0; 1024]);
        out
    }

    /// An outer directory holding only `target`, where unpacks go.
    fn sandbox() -> (tempfile::TempDir, PathBuf) {
        let outer = tempfile::tempdir().expect("tempdir");
        let target = outer.path().join("target");
        fs::create_dir(&target).expect("mkdir target");
        (outer, target)
    }

    fn assert_only_target(outer: &tempfile::TempDir) {
        let names: Vec<_> = fs::read_dir(outer.path())
            .expect("read outer")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            ["target"],
            "something was written outside the target"
        );
    }

    fn unpack_members(
        members: &[Vec<u8>],
    ) -> (tempfile::TempDir, PathBuf, Result<Unpacked, UnpackError>) {
        let (outer, target) = sandbox();
        let result = unpack(&stream(members)[..], &target, &LIMITS);
        assert_only_target(&outer);
        (outer, target, result)
    }

    fn assert_escape(result: Result<Unpacked, UnpackError>) {
        assert!(
            matches!(result, Err(UnpackError::Escape { .. })),
            "{result:?}"
        );
    }

    /// Relative path -> (mode, contents or symlink target) for a whole tree.
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u32, Vec<u8>)>) {
            for entry in fs::read_dir(dir).expect("read_dir") {
                let path = entry.expect("entry").path();
                let meta = fs::symlink_metadata(&path).expect("stat");
                let data = match meta.file_type() {
                    t if t.is_symlink() => fs::read_link(&path)
                        .expect("readlink")
                        .into_os_string()
                        .into_vec(),
                    t if t.is_dir() => Vec::new(),
                    _ => fs::read(&path).expect("read"),
                };
                let rel = path.strip_prefix(root).expect("prefix").to_owned();
                out.insert(rel, (meta.mode() & 0o7777, data));
                if meta.is_dir() {
                    walk(root, &path, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn round_trip_keeps_contents_modes_and_symlinks() {
        let source = tempfile::tempdir().expect("tempdir");
        for i in 0..20u32 {
            let dir = source.path().join(format!("d{}/sub{}", i % 4, i % 3));
            fs::create_dir_all(&dir).expect("mkdir");
            let path = dir.join(format!("f{i}"));
            fs::write(&path, format!("file {i}\n").repeat(i as usize * 50)).expect("write");
            let mode = if i % 2 == 0 { 0o755 } else { 0o600 };
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        symlink("d0/sub0/f0", source.path().join("link")).expect("symlink");
        symlink("/etc/passwd", source.path().join("d1/abs")).expect("symlink");
        // Modes within what unpacking keeps (no write for others, the
        // owner's rwx on directories) come back as they were.
        fs::set_permissions(
            source.path().join("d2/sub2"),
            fs::Permissions::from_mode(0o750),
        )
        .expect("chmod");

        let mut tar = Vec::new();
        pack(source.path(), &mut tar).expect("pack");
        let (outer, target) = sandbox();
        let unpacked = unpack(&tar[..], &target, &LIMITS).expect("unpack");
        assert_only_target(&outer);
        assert_eq!(
            (unpacked.files, unpacked.symlinks, unpacked.hard_links),
            (20, 2, 0)
        );
        assert_eq!(unpacked.dirs, 4 + 12);
        assert_eq!(snapshot(&target), snapshot(source.path()));
    }

    #[test]
    fn parent_components_are_refused() {
        for name in ["../x", "a/../../x", "./../x"] {
            let (_outer, _target, result) = unpack_members(&[file(name, b"pwned")]);
            assert_escape(result);
        }
    }

    #[test]
    fn absolute_paths_are_refused() {
        let (outer, target) = sandbox();
        let name = format!("{}/abs-pwned", outer.path().display());
        let result = unpack(&stream(&[file(&name, b"pwned")])[..], &target, &LIMITS);
        assert_escape(result);
        assert_only_target(&outer);
    }

    #[test]
    fn writing_through_a_symlink_to_outside_is_refused() {
        let (outer, target) = sandbox();
        let evil = link(EntryType::Symlink, "evil", &outer.path().to_string_lossy());
        let result = unpack(
            &stream(&[evil, file("evil/pwned", b"pwned")])[..],
            &target,
            &LIMITS,
        );
        assert_escape(result);
        // A file member over a symlink must not write to where it points.
        let evil = link(
            EntryType::Symlink,
            "evil2",
            &format!("{}/pwned", outer.path().display()),
        );
        let result = unpack(
            &stream(&[evil, file("evil2", b"pwned")])[..],
            &target,
            &LIMITS,
        );
        assert_escape(result);
        assert_only_target(&outer);
    }

    #[test]
    fn writing_through_a_relative_symlink_is_refused() {
        for name in ["up/pwned", "up/target/pwned", "up/d/pwned"] {
            let up = link(EntryType::Symlink, "up", "..");
            let (_outer, target, result) = unpack_members(&[up, file(name, b"pwned")]);
            assert_escape(result);
            assert_eq!(
                fs::read_link(target.join("up")).expect("symlink is data"),
                Path::new("..")
            );
        }
        let dir = member(EntryType::Directory, "up", "", 0o755, b"");
        let (_outer, _target, result) =
            unpack_members(&[link(EntryType::Symlink, "up", ".."), dir]);
        assert_escape(result);
    }

    #[test]
    fn hard_links_must_name_a_file_unpacked_here() {
        let (outer, target) = sandbox();
        fs::write(outer.path().join("outside"), b"secret").expect("write");
        let real = || file("real/f", b"data");
        let bad = [
            vec![link(EntryType::Link, "x", "/etc/passwd")],
            vec![link(EntryType::Link, "x", "../outside")],
            vec![
                real(),
                link(EntryType::Symlink, "s", "real"),
                link(EntryType::Link, "x", "s/f"),
            ],
            vec![
                link(EntryType::Symlink, "s", "/etc/passwd"),
                link(EntryType::Link, "x", "s"),
            ],
            vec![
                member(EntryType::Directory, "d", "", 0o755, b""),
                link(EntryType::Link, "x", "d"),
            ],
            // Files the host left in the target are not the guest's to link.
            vec![link(EntryType::Link, "x", "host-file")],
        ];
        for members in bad {
            let dir = tempfile::tempdir_in(&target).expect("tempdir");
            fs::write(dir.path().join("host-file"), b"host").expect("write");
            assert_escape(unpack(&stream(&members)[..], dir.path(), &LIMITS));
            assert!(!dir.path().join("x").exists());
        }
        assert_eq!(
            fs::read(outer.path().join("outside")).expect("read"),
            b"secret"
        );

        // A later file over the link replaces it rather than writing through it.
        let members = [
            file("a", b"one"),
            link(EntryType::Link, "b", "./a"),
            link(EntryType::Link, "c", "b"),
            file("b", b"two"),
        ];
        let unpacked = unpack(&stream(&members)[..], &target, &LIMITS).expect("unpack");
        assert_eq!((unpacked.files, unpacked.hard_links), (2, 2));
        let ino = |name| fs::metadata(target.join(name)).expect("stat").ino();
        assert_eq!(ino("a"), ino("c"));
        assert_eq!(fs::read(target.join("a")).expect("read"), b"one");
        assert_eq!(fs::read(target.join("b")).expect("read"), b"two");
    }

    #[test]
    fn limits_are_enforced() {
        let (outer, target) = sandbox();
        let small = UnpackLimits {
            max_total_bytes: 1000,
            max_entries: 2,
        };
        let result = unpack(&stream(&[file("big", &[7; 2000])])[..], &target, &small);
        assert!(
            matches!(result, Err(UnpackError::TooLarge { limit: 1000 })),
            "{result:?}"
        );
        assert!(!target.join("big").exists());

        let few = UnpackLimits {
            max_total_bytes: 1 << 20,
            max_entries: 2,
        };
        let members = [file("a", b"1"), file("b", b"2"), file("c", b"3")];
        let result = unpack(&stream(&members)[..], &target, &few);
        assert!(
            matches!(result, Err(UnpackError::TooLarge { limit: 2 })),
            "{result:?}"
        );
        assert!(target.join("b").exists() && !target.join("c").exists());

        // Parents made for a member count as entries, and inodes as bytes.
        let (_outer2, deep_target) = sandbox();
        let result = unpack(&stream(&[file("p/q/r/s/f", b"x")])[..], &deep_target, &few);
        assert!(
            matches!(result, Err(UnpackError::TooLarge { limit: 2 })),
            "{result:?}"
        );
        let (_outer3, empty_target) = sandbox();
        let empties: Vec<_> = (0..10).map(|i| file(&format!("e{i}"), b"")).collect();
        let tight = UnpackLimits {
            max_total_bytes: 4 * INODE_COST,
            max_entries: 1000,
        };
        let result = unpack(&stream(&empties)[..], &empty_target, &tight);
        assert!(
            matches!(result, Err(UnpackError::TooLarge { .. })),
            "{result:?}"
        );

        // A long-name header the parser would buffer whole.
        let long = member(
            EntryType::GNULongName,
            "././@LongLink",
            "",
            0o644,
            &[b'a'; 2 << 20],
        );
        let result = unpack(
            &stream(&[file("a", b""), long, file("x", b"")])[..],
            &target,
            &LIMITS,
        );
        assert!(
            matches!(
                result,
                Err(UnpackError::TooLarge {
                    limit: MAX_HEADER_BYTES
                })
            ),
            "{result:?}"
        );
        assert_only_target(&outer);
    }

    #[test]
    fn devices_and_fifos_are_refused() {
        for kind in [EntryType::Char, EntryType::Block, EntryType::Fifo] {
            let (_outer, target, result) = unpack_members(&[member(kind, "dev", "", 0o666, b"")]);
            assert!(
                matches!(result, Err(UnpackError::Unsupported { .. })),
                "{result:?}"
            );
            assert!(fs::symlink_metadata(target.join("dev")).is_err());
        }
    }

    #[test]
    fn modes_lose_special_bits_and_write_for_others_and_keep_the_owners_access() {
        let members = [
            member(EntryType::Directory, "d", "", 0o3777, b""),
            member(EntryType::Regular, "d/f", "", 0o4777, b"x"),
            member(EntryType::Directory, "locked", "", 0o000, b""),
            member(EntryType::Regular, "locked/g", "", 0o000, b"y"),
        ];
        let (_outer, target, result) = unpack_members(&members);
        result.expect("unpack");
        let mode = |p: &str| fs::metadata(target.join(p)).expect("stat").mode() & 0o7777;
        assert_eq!(mode("d"), 0o755);
        assert_eq!(mode("d/f"), 0o755);
        assert_eq!(mode("locked"), 0o700, "the owner can still remove it");
        assert_eq!(mode("locked/g"), 0o000);
    }

    #[test]
    fn overlong_and_overdeep_paths_are_refused() {
        let long = "a".repeat(MAX_PATH_BYTES + 1);
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        for path in [long, deep] {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(EntryType::Regular);
            header.set_size(1);
            header.set_mode(0o644);
            let mut builder = tar::Builder::new(Vec::new());
            builder
                .append_data(&mut header, &path, &b"x"[..])
                .expect("append");
            let bytes = builder.into_inner().expect("finish");
            let (outer, target) = sandbox();
            assert_escape(unpack(&bytes[..], &target, &LIMITS));
            assert_only_target(&outer);
        }
    }

    #[test]
    fn garbage_and_truncation_are_malformed() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let garbage: Vec<u8> = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let (outer, target) = sandbox();
        let result = unpack(&garbage[..], &target, &LIMITS);
        assert!(
            matches!(result, Err(UnpackError::Malformed(_))),
            "{result:?}"
        );
        let truncated = &file("short", &[1; 1000])[..600];
        let result = unpack(truncated, &target, &LIMITS);
        assert!(
            matches!(result, Err(UnpackError::Malformed(_))),
            "{result:?}"
        );
        assert_eq!(
            unpack(&[0u8; 1024][..], &target, &LIMITS).expect("empty"),
            Unpacked::default()
        );
        assert_only_target(&outer);
    }
}

//! File operations: each runs on a thread of its own, reads what the host
//! sends as stdin chunks (acknowledging each once used, so the host's
//! window bounds what waits here) and sends what it produces as stdout
//! chunks within the host's credit, then reports one `FileDone`.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread;

use vmette_proto::{
    DirEntry, ExecId, FileError, FileErrorKind, FileKind, FileOp, FileReply, FileRequest, FileStat,
    GuestMessage, MAX_CHUNK_LEN, MAX_FILE_MESSAGE, MAX_LIST_ENTRIES, MAX_NAME_LEN,
};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::channel::Outbox;
use crate::credit::Credit;

type Outcome = Result<FileReply, FileError>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the host can still send to a running operation.
struct Transfer {
    input: Option<mpsc::Sender<Chunk>>,
    credit: Arc<Credit>,
}

/// What arrives for an operation's input.
enum Chunk {
    /// More bytes.
    Data(Vec<u8>),
    /// The end of the input.
    End,
    /// The host abandons the operation (its own source failed).
    Cancel,
}

/// The running file operations.
pub struct Files {
    outbox: Outbox,
    running: Arc<Mutex<HashMap<ExecId, Transfer>>>,
}

impl Files {
    pub fn new(outbox: Outbox) -> Files {
        Files {
            outbox,
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Starts `request`. It is registered before this returns, so the
    /// host's data for it, which follows at once, finds it.
    pub fn start(&self, request: FileRequest) {
        let id = request.id;
        let credit = Credit::new();
        let (input, chunks) = mpsc::channel();
        lock(&self.running).insert(
            id,
            Transfer {
                input: Some(input),
                credit: Arc::clone(&credit),
            },
        );
        let outbox = self.outbox.clone();
        let running = Arc::clone(&self.running);
        let spawned = thread::Builder::new().name("file".into()).spawn(move || {
            let mut input = Input {
                id,
                chunks,
                chunk: Vec::new(),
                at: 0,
                outbox: outbox.clone(),
            };
            let mut output = Output {
                id,
                credit,
                outbox: outbox.clone(),
                sent: 0,
            };
            let result = serve(&request.op, &mut input, &mut output);
            if let Some(done) = lock(&running).remove(&id) {
                done.credit.close();
            }
            outbox.send(GuestMessage::FileDone { id, result });
        });
        if let Err(e) = spawned {
            lock(&self.running).remove(&id);
            self.outbox.send(GuestMessage::FileDone {
                id,
                result: Err(failure(FileErrorKind::Other, format!("cannot start: {e}"))),
            });
        }
    }

    /// Routes a stdin chunk; gives it back when `id` is no file operation.
    pub fn input(&self, id: ExecId, data: Vec<u8>) -> Result<(), Vec<u8>> {
        match lock(&self.running).get(&id) {
            Some(transfer) => {
                if let Some(input) = &transfer.input {
                    let _ = input.send(Chunk::Data(data));
                }
                Ok(())
            }
            None => Err(data),
        }
    }

    /// Routes the end of stdin; `false` when `id` is no file operation.
    pub fn input_end(&self, id: ExecId) -> bool {
        match lock(&self.running).get_mut(&id) {
            Some(transfer) => {
                if let Some(input) = transfer.input.take() {
                    let _ = input.send(Chunk::End);
                }
                true
            }
            None => false,
        }
    }

    /// The host abandons an operation (a signal to a file operation's id);
    /// `false` when `id` is no file operation.
    pub fn cancel(&self, id: ExecId) -> bool {
        match lock(&self.running).get_mut(&id) {
            Some(transfer) => {
                if let Some(input) = transfer.input.take() {
                    let _ = input.send(Chunk::Cancel);
                }
                // An operation sending output stops at its next chunk.
                transfer.credit.close();
                true
            }
            None => false,
        }
    }

    /// Routes output credit; `false` when `id` is no file operation.
    pub fn credit(&self, id: ExecId, bytes: u32) -> bool {
        match lock(&self.running).get(&id) {
            Some(transfer) => {
                transfer.credit.grant(bytes as usize);
                true
            }
            None => false,
        }
    }
}

fn serve(op: &FileOp, input: &mut Input, output: &mut Output) -> Outcome {
    let path = Path::new(op.path());
    let shown = op.path();
    let io = |e: io::Error| io_failure(shown, &e);
    match op {
        FileOp::Write {
            mode,
            parents,
            limit,
            ..
        } => {
            if *parents {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(io)?;
                }
            }
            let mut file = open_regular(
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(*mode),
                path,
                shown,
            )?;
            let written = copy_limited(input, &mut file, *limit, shown);
            if written.is_err() {
                let _ = fs::remove_file(path);
            }
            let bytes = written?;
            // The mode given, not the one the umask left.
            fs::set_permissions(path, fs::Permissions::from_mode(*mode)).map_err(io)?;
            Ok(FileReply::Done { bytes })
        }
        FileOp::Read { limit, .. } => {
            let mut file = open_regular(OpenOptions::new().read(true), path, shown)?;
            let meta = file.metadata().map_err(io)?;
            if meta.len() > *limit {
                return Err(too_large(shown, *limit));
            }
            let bytes = copy_limited(&mut file, output, *limit, shown)?;
            output.flush().map_err(io)?;
            Ok(FileReply::Done { bytes })
        }
        FileOp::List { .. } => list(path, shown),
        FileOp::Stat { .. } => fs::symlink_metadata(path)
            .map(|meta| FileReply::Stat(stat_of(&meta)))
            .map_err(io),
        FileOp::MakeDir { parents, mode, .. } => {
            let made = if *parents {
                fs::create_dir_all(path)
            } else {
                fs::create_dir(path)
            };
            made.map_err(io)?;
            fs::set_permissions(path, fs::Permissions::from_mode(*mode)).map_err(io)?;
            Ok(FileReply::Done { bytes: 0 })
        }
        FileOp::Remove { recursive, .. } => {
            let meta = fs::symlink_metadata(path).map_err(io)?;
            let removed = match (meta.is_dir(), recursive) {
                (true, true) => fs::remove_dir_all(path),
                (true, false) => fs::remove_dir(path),
                (false, _) => fs::remove_file(path),
            };
            removed.map_err(io)?;
            Ok(FileReply::Done { bytes: 0 })
        }
        FileOp::TarIn { limit, .. } => {
            fs::create_dir_all(path).map_err(io)?;
            let mut limited = Limited {
                inner: input,
                left: *limit,
                over: false,
            };
            let result = unpack_tar(&mut limited, path);
            if limited.over {
                return Err(too_large(shown, *limit));
            }
            result.map(|bytes| FileReply::Done { bytes })
        }
        FileOp::TarOut { limit, .. } => {
            let meta = fs::symlink_metadata(path).map_err(io)?;
            // Refused before a byte is sent, so the host can still answer
            // with an error of its own rather than a broken stream.
            let size = if meta.is_dir() {
                tar_size(path).map_err(io)?
            } else {
                meta.len()
            };
            if size > *limit {
                return Err(too_large(shown, *limit));
            }
            let mut limited = Limited {
                inner: &mut *output,
                left: *limit,
                over: false,
            };
            let packed = pack_tar(&mut limited, path, meta.is_dir());
            if limited.over {
                return Err(too_large(shown, *limit));
            }
            packed.map_err(io)?;
            output.flush().map_err(io)?;
            Ok(FileReply::Done { bytes: output.sent })
        }
    }
}

/// Opens `path` only if it is a regular file. The open does not block (a
/// fifo with nobody at the other end would hold the operation for ever);
/// blocking is restored once the file is known to be regular.
fn open_regular(options: &mut OpenOptions, path: &Path, shown: &str) -> Result<File, FileError> {
    let file = options
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_failure(shown, &e))?;
    let meta = file.metadata().map_err(|e| io_failure(shown, &e))?;
    if meta.is_dir() {
        return Err(failure(
            FileErrorKind::IsADirectory,
            format!("{shown} is a directory"),
        ));
    }
    if !meta.is_file() {
        return Err(failure(
            FileErrorKind::Other,
            format!("{shown} is not a regular file"),
        ));
    }
    let flags = fcntl(&file, FcntlArg::F_GETFL).map_err(|e| io_failure(shown, &e.into()))?;
    let blocking = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(&file, FcntlArg::F_SETFL(blocking)).map_err(|e| io_failure(shown, &e.into()))?;
    Ok(file)
}

fn list(path: &Path, shown: &str) -> Outcome {
    let meta = fs::metadata(path).map_err(|e| io_failure(shown, &e))?;
    if !meta.is_dir() {
        return Err(failure(
            FileErrorKind::NotADirectory,
            format!("{shown} is not a directory"),
        ));
    }
    let mut names: Vec<_> = fs::read_dir(path)
        .map_err(|e| io_failure(shown, &e))?
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    names.sort();
    let truncated = names.len() > MAX_LIST_ENTRIES;
    let mut entries: Vec<DirEntry> = names
        .into_iter()
        .take(MAX_LIST_ENTRIES)
        .filter_map(|name| {
            let meta = fs::symlink_metadata(path.join(&name)).ok()?;
            let mut name = name.to_string_lossy().into_owned();
            truncate(&mut name, MAX_NAME_LEN * 3);
            Some(DirEntry {
                name,
                stat: stat_of(&meta),
            })
        })
        .collect();
    // Names made lossy or cut short may collide or change order; the host
    // wants them sorted and unique.
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    entries.dedup_by(|a, b| a.name == b.name);
    Ok(FileReply::Entries { entries, truncated })
}

fn unpack_tar(source: &mut impl Read, target: &Path) -> Result<u64, FileError> {
    let mut archive = tar::Archive::new(source);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    let mut bytes = 0;
    let shown = target.display().to_string();
    let malformed = |e: io::Error| failure(FileErrorKind::Malformed, format!("tar stream: {e}"));
    for entry in archive.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        let member = entry.path().map_err(malformed)?.into_owned();
        let member_shown = member.display().to_string();
        if member.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        }) {
            return Err(failure(
                FileErrorKind::Escape,
                format!("tar member {member_shown} would land outside {shown}"),
            ));
        }
        bytes += entry.size();
        match entry.unpack_in(target) {
            Ok(true) => {}
            Ok(false) => {
                return Err(failure(
                    FileErrorKind::Escape,
                    format!("tar member {member_shown} would land outside {shown}"),
                ))
            }
            // The tar crate refuses a member whose parent resolves outside
            // the target (through a symlink from earlier in the stream).
            Err(e) if e.to_string().contains("outside") => {
                return Err(failure(
                    FileErrorKind::Escape,
                    format!("tar member {member_shown} would land outside {shown}"),
                ))
            }
            Err(e) => return Err(io_failure(&member_shown, &e)),
        }
    }
    Ok(bytes)
}

fn pack_tar(sink: &mut impl Write, path: &Path, is_dir: bool) -> io::Result<()> {
    let mut builder = tar::Builder::new(sink);
    builder.follow_symlinks(false);
    if is_dir {
        walk_tree(path, &mut |source, name, meta| {
            if meta.is_dir() {
                builder.append_dir(name, source)
            } else {
                builder.append_path_with_name(source, name)
            }
        })?;
    } else {
        let name = path.file_name().unwrap_or(path.as_os_str());
        builder.append_path_with_name(path, name)?;
    }
    builder.finish()
}

/// Calls `visit` with each entry of the tree at `root` (itself first,
/// named `.`), with its name in the tar and its metadata, staying on the
/// file system `root` is on as `tar --one-file-system` does: below `/`,
/// the guest's `/proc`, `/sys` and `/dev` (and any share) would be endless,
/// would block, or are not the tree's. Their mount points are kept, empty.
/// Only directories, regular files and symlinks are taken: the host
/// unpacks nothing else (fifos, devices and sockets are passed over), and
/// entries that vanish meanwhile (a process's under `/proc`) are too.
fn walk_tree(
    root: &Path,
    visit: &mut dyn FnMut(&Path, &Path, &fs::Metadata) -> io::Result<()>,
) -> io::Result<()> {
    let device = fs::symlink_metadata(root)?.dev();
    let gone = |e: &io::Error| e.kind() == ErrorKind::NotFound;
    let mut directories = vec![(root.to_path_buf(), Path::new(".").to_path_buf())];
    while let Some((directory, name)) = directories.pop() {
        let top = directory == root;
        let meta = match fs::symlink_metadata(&directory) {
            Err(e) if gone(&e) && !top => continue,
            meta => meta?,
        };
        visit(&directory, &name, &meta)?;
        if meta.dev() != device {
            continue;
        }
        let listing = match fs::read_dir(&directory) {
            Err(e) if gone(&e) && !top => continue,
            listing => listing?,
        };
        let mut children = Vec::new();
        for child in listing {
            match child {
                Ok(child) => children.push(child),
                Err(e) if gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        children.sort_by_key(fs::DirEntry::file_name);
        for child in children.into_iter().rev() {
            let source = child.path();
            let child_name = name.join(child.file_name());
            let meta = match fs::symlink_metadata(&source) {
                Ok(meta) => meta,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            let kind = meta.file_type();
            if kind.is_dir() {
                directories.push((source, child_name));
            } else if kind.is_file() || kind.is_symlink() {
                // Gone before its contents or target were read: passed
                // over, and nothing of it was written yet.
                match visit(&source, &child_name, &meta) {
                    Err(e) if gone(&e) => {}
                    visited => visited?,
                }
            }
        }
    }
    Ok(())
}

/// The size of the tar [`pack_tar`] makes of the directory `root`, or a
/// little more: a 512-byte header per entry, a GNU long-name record for a
/// name or link target of 100 bytes or more, the data of regular files in
/// 512-byte blocks, and the two zero blocks at the end.
fn tar_size(root: &Path) -> io::Result<u64> {
    fn blocks(bytes: u64) -> u64 {
        bytes.div_ceil(512) * 512
    }
    fn long_name(length: usize) -> u64 {
        if length >= 100 {
            512 + blocks(length as u64 + 1)
        } else {
            0
        }
    }
    let mut total = 1024;
    walk_tree(root, &mut |source, name, meta| {
        // A directory's name is stored with a trailing slash.
        total += 512 + long_name(name.as_os_str().len() + 1);
        if meta.is_file() {
            total += blocks(meta.len());
        } else if meta.file_type().is_symlink() {
            total += long_name(fs::read_link(source)?.as_os_str().len());
        }
        Ok(())
    })?;
    Ok(total)
}

/// Copies `source` to `sink`, failing once more than `limit` bytes came.
fn copy_limited(
    source: &mut impl Read,
    sink: &mut impl Write,
    limit: u64,
    shown: &str,
) -> Result<u64, FileError> {
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    let mut total = 0u64;
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_failure(shown, &e)),
        };
        total += n as u64;
        if total > limit {
            return Err(too_large(shown, limit));
        }
        sink.write_all(&buf[..n])
            .map_err(|e| io_failure(shown, &e))?;
    }
}

/// The host's stdin chunks for one operation, as a reader; each chunk is
/// acknowledged once it has been read, so the host's window is what
/// bounds the data waiting here.
struct Input {
    id: ExecId,
    chunks: mpsc::Receiver<Chunk>,
    chunk: Vec<u8>,
    at: usize,
    outbox: Outbox,
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.chunk.len() {
            if !self.chunk.is_empty() {
                self.outbox.send(GuestMessage::StdinAck {
                    id: self.id,
                    bytes: self.chunk.len() as u32,
                });
            }
            self.chunk = match self.chunks.recv() {
                Ok(Chunk::Data(chunk)) => chunk,
                Ok(Chunk::End) | Err(_) => Vec::new(),
                Ok(Chunk::Cancel) => return Err(io::Error::other("abandoned by the host")),
            };
            self.at = 0;
            if self.chunk.is_empty() {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        // A chunk read only in part is still the host's to count down.
        if !self.chunk.is_empty() {
            self.outbox.send(GuestMessage::StdinAck {
                id: self.id,
                bytes: self.chunk.len() as u32,
            });
        }
    }
}

/// Stdout chunks for one operation, sent within the host's credit.
struct Output {
    id: ExecId,
    credit: Arc<Credit>,
    outbox: Outbox,
    sent: u64,
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = self.credit.take(buf.len().min(MAX_CHUNK_LEN), || {});
        if room == 0 {
            return Err(ErrorKind::BrokenPipe.into());
        }
        self.outbox.send(GuestMessage::Stdout {
            id: self.id,
            data: buf[..room].to_vec(),
        });
        self.sent += room as u64;
        Ok(room)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader or writer that refuses to move more than `left` bytes.
struct Limited<T> {
    inner: T,
    left: u64,
    over: bool,
}

impl<T> Limited<T> {
    fn allow(&mut self, n: usize) -> io::Result<()> {
        if n as u64 > self.left {
            self.over = true;
            return Err(io::Error::other("over the transfer limit"));
        }
        self.left -= n as u64;
        Ok(())
    }
}

impl<T: Read> Read for Limited<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.allow(n)?;
        Ok(n)
    }
}

impl<T: Write> Write for Limited<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Nothing past the limit goes out, and only what the inner writer
        // took is counted.
        if self.left == 0 && !buf.is_empty() {
            return self.allow(buf.len()).map(|()| 0);
        }
        let most = usize::try_from(self.left).unwrap_or(usize::MAX);
        let n = self.inner.write(&buf[..buf.len().min(most)])?;
        self.allow(n)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn stat_of(meta: &fs::Metadata) -> FileStat {
    let kind = if meta.file_type().is_symlink() {
        FileKind::Symlink
    } else if meta.is_dir() {
        FileKind::Directory
    } else if meta.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileStat {
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        modified: meta.mtime(),
    }
}

fn too_large(shown: &str, limit: u64) -> FileError {
    failure(
        FileErrorKind::TooLarge,
        format!("{shown} is over the transfer limit of {limit} bytes"),
    )
}

fn io_failure(shown: &str, error: &io::Error) -> FileError {
    let kind = match error.kind() {
        ErrorKind::NotFound => FileErrorKind::NotFound,
        ErrorKind::PermissionDenied => FileErrorKind::PermissionDenied,
        ErrorKind::AlreadyExists => FileErrorKind::AlreadyExists,
        _ => match error.raw_os_error() {
            Some(libc::EISDIR) => FileErrorKind::IsADirectory,
            Some(libc::ENOTDIR) => FileErrorKind::NotADirectory,
            _ => FileErrorKind::Other,
        },
    };
    failure(kind, format!("{shown}: {error}"))
}

fn failure(kind: FileErrorKind, mut message: String) -> FileError {
    truncate(&mut message, MAX_FILE_MESSAGE);
    FileError { kind, message }
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

//! Files in a session: write, read, list, stat, make and remove paths in
//! the guest, and copy directory trees in and out as tar streams.
//!
//! Every transfer is bounded by [`Config::transfer_limit`](crate::Config)
//! on both sides: the guest refuses to write or send more, and the host
//! stops sending, or stops accepting, past it. Trees copied out are
//! unpacked on the host by [`crate::tree::unpack`], which refuses every
//! member that would land outside the target directory. A failed
//! operation leaves the session as it was: the next exec works.

use std::io::{self, Read, Write};
use std::path::Path;
use std::thread;

use vmette_proto::{
    DirEntry, FileErrorKind, FileOp, FileReply, FileRequest, FileStat, HostMessage, MAX_CHUNK_LEN,
};

use crate::session::{Exec, ExecEvent, ExecStatus, OpKind, Session};
use crate::tree::{self, UnpackLimits, Unpacked};
use crate::Error;

/// Most members a tree copied out of a guest may have.
const MAX_TREE_ENTRIES: u64 = 1_000_000;

/// Mode of directories made by [`Session::make_dir`].
const DIR_MODE: u32 = 0o755;

/// The signal that tells the guest to abandon a file operation.
const CANCEL: i32 = libc::SIGTERM;

impl Session {
    /// Writes everything `source` yields to the guest file `path` (parents
    /// created), with permission bits `mode`; returns the bytes written.
    pub fn write_file(&self, path: &str, source: &mut dyn Read, mode: u32) -> Result<u64, Error> {
        let limit = self.transfer_limit();
        let op = self.file_op(FileOp::Write {
            path: path.into(),
            mode,
            parents: true,
            limit,
        })?;
        let sent = send(path, &op, source, limit)?;
        done(path, &op, &mut io::sink())?;
        Ok(sent)
    }

    /// Streams the guest file `path` into `sink`; returns its size.
    pub fn read_file(&self, path: &str, sink: &mut dyn Write) -> Result<u64, Error> {
        let limit = self.transfer_limit();
        let op = self.file_op(FileOp::Read {
            path: path.into(),
            limit,
        })?;
        let mut capped = Capped {
            sink,
            left: limit,
            path,
        };
        done(path, &op, &mut capped)?;
        // What arrived, not what the guest says it sent.
        Ok(limit - capped.left)
    }

    /// The entries of the guest directory `path`, sorted by name, and
    /// whether there were more than a listing holds.
    pub fn list_dir(&self, path: &str) -> Result<(Vec<DirEntry>, bool), Error> {
        let op = self.file_op(FileOp::List { path: path.into() })?;
        match reply(path, &op, &mut io::sink())? {
            FileReply::Entries { entries, truncated } => Ok((entries, truncated)),
            other => Err(unexpected(&other)),
        }
    }

    /// The metadata of the guest path `path` (a final symlink not followed).
    pub fn stat(&self, path: &str) -> Result<FileStat, Error> {
        let op = self.file_op(FileOp::Stat { path: path.into() })?;
        match reply(path, &op, &mut io::sink())? {
            FileReply::Stat(stat) => Ok(stat),
            other => Err(unexpected(&other)),
        }
    }

    /// Makes the guest directory `path`; with `parents`, its missing
    /// parents too, and an existing directory is fine.
    pub fn make_dir(&self, path: &str, parents: bool) -> Result<(), Error> {
        let op = self.file_op(FileOp::MakeDir {
            path: path.into(),
            parents,
            mode: DIR_MODE,
        })?;
        done(path, &op, &mut io::sink())
    }

    /// Removes the guest path `path`: a file, a symlink, an empty
    /// directory, or with `recursive` a directory and all it holds.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), Error> {
        let op = self.file_op(FileOp::Remove {
            path: path.into(),
            recursive,
        })?;
        done(path, &op, &mut io::sink())
    }

    /// Copies the host directory `host_dir`'s contents into the guest
    /// directory `guest_dir` (created if missing), keeping modes and
    /// symlinks; returns the bytes of file data sent.
    pub fn copy_in(&self, host_dir: &Path, guest_dir: &str) -> Result<u64, Error> {
        let (mut reader, writer) =
            io::pipe().map_err(Error::io("cannot make a pipe for the tar stream"))?;
        let dir = host_dir.to_path_buf();
        let packer = thread::Builder::new()
            .name("vmette-pack".into())
            .spawn(move || tree::pack(&dir, writer))
            .map_err(Error::io("cannot start the tar packer"))?;
        let copied = self.copy_in_tar(&mut reader, guest_dir);
        // The packer ends once the pipe's reader is gone, if not before.
        drop(reader);
        let packed = packer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the packer panicked")));
        let bytes = copied?;
        packed.map_err(Error::io(format!("cannot pack {}", host_dir.display())))?;
        Ok(bytes)
    }

    /// Unpacks the tar stream `tar` into the guest directory `guest_dir`
    /// (created if missing); members that would land outside it fail with
    /// [`FileErrorKind::Escape`]. Returns the bytes of file data unpacked.
    pub fn copy_in_tar(&self, tar: &mut dyn Read, guest_dir: &str) -> Result<u64, Error> {
        let limit = self.transfer_limit();
        let op = self.file_op(FileOp::TarIn {
            path: guest_dir.into(),
            limit,
        })?;
        send(guest_dir, &op, tar, limit)?;
        match reply(guest_dir, &op, &mut io::sink())? {
            FileReply::Done { bytes } => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// Copies the guest directory (or file) `guest_path` into the existing
    /// host directory `host_dir`. The guest's tar stream is unpacked here
    /// by [`tree::unpack`], which refuses escapes, links out of the target,
    /// device nodes and anything over the transfer limit. On an error,
    /// what was unpacked before it stays in `host_dir`, and nothing is
    /// ever outside it.
    pub fn copy_out(&self, guest_path: &str, host_dir: &Path) -> Result<Unpacked, Error> {
        let limit = self.transfer_limit();
        let op = self.file_op(FileOp::TarOut {
            path: guest_path.into(),
            limit,
        })?;
        let limits = UnpackLimits {
            max_total_bytes: limit,
            max_entries: MAX_TREE_ENTRIES,
        };
        let mut stream = OpOutput {
            op: &op,
            chunk: Vec::new(),
            at: 0,
            end: None,
            left: limit,
        };
        let unpacked = tree::unpack(&mut stream, host_dir, &limits);
        let end = stream.end.take();
        let unpacked = match unpacked {
            Ok(unpacked) => unpacked,
            Err(error) => {
                // What the host found wrong with the stream comes first. A
                // stream merely cut short may be the guest giving up (the
                // tree is over the limit): then its reason is the better
                // one. Dropping the operation ignores the rest.
                let cut_short = matches!(
                    error,
                    tree::UnpackError::Malformed(_) | tree::UnpackError::TooLarge { .. }
                );
                if let (true, Some(status)) = (cut_short, end) {
                    finish(guest_path, &op, status)?;
                }
                return Err(Error::Unpack(error));
            }
        };
        let left = stream.left;
        match end {
            Some(status) => finish(guest_path, &op, status)?,
            // The guest's tar padding after the end-of-archive blocks,
            // within what is left of the limit.
            None => reply(
                guest_path,
                &op,
                &mut Capped {
                    sink: &mut io::sink(),
                    left,
                    path: guest_path,
                },
            )?,
        };
        Ok(unpacked)
    }

    /// Streams a tar of the guest directory (or file) `guest_path` into
    /// `sink` as the guest produces it, up to the transfer limit; for a
    /// client that unpacks it itself (with [`tree::unpack`], for one).
    /// Returns the bytes sent.
    pub fn copy_out_tar(&self, guest_path: &str, sink: &mut dyn Write) -> Result<u64, Error> {
        let limit = self.transfer_limit();
        let op = self.file_op(FileOp::TarOut {
            path: guest_path.into(),
            limit,
        })?;
        let mut capped = Capped {
            sink,
            left: limit,
            path: guest_path,
        };
        done(guest_path, &op, &mut capped)?;
        Ok(limit - capped.left)
    }

    fn file_op(&self, op: FileOp) -> Result<Exec, Error> {
        let kind = OpKind::File {
            output: op.gives_output(),
        };
        self.open(kind, false, None, |id| {
            HostMessage::File(FileRequest { id, op })
        })
    }
}

/// Sends `source` as the operation's input, at most one chunk past
/// `limit` (so that the guest, which counts too, refuses the transfer),
/// then ends it; returns the bytes sent. When `source` fails, the guest is
/// told to abandon the operation (removing a partial file) first.
fn send(path: &str, op: &Exec, source: &mut dyn Read, limit: u64) -> Result<u64, Error> {
    let stdin = op.stdin();
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    let mut total = 0u64;
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = op.signal(CANCEL);
                let _ = reply(path, op, &mut io::sink());
                return Err(Error::Io {
                    context: format!("cannot read what was to be sent to {path}"),
                    source: e,
                });
            }
        };
        total += n as u64;
        // A failed write means the operation already ended (the guest
        // refused it); its reply says why.
        if stdin.write_all(&buf[..n]).is_err() || total > limit {
            break;
        }
    }
    let _ = stdin.close();
    Ok(total)
}

/// Waits for a reply that carries nothing but success.
fn done(path: &str, op: &Exec, sink: &mut dyn Write) -> Result<(), Error> {
    match reply(path, op, sink)? {
        FileReply::Done { .. } => Ok(()),
        other => Err(unexpected(&other)),
    }
}

/// Waits for the operation's reply, handing any output to `sink`.
fn reply(path: &str, op: &Exec, sink: &mut dyn Write) -> Result<FileReply, Error> {
    let status = loop {
        match op.next_event() {
            Some(ExecEvent::Stdout(data)) => {
                sink.write_all(&data).map_err(|e| output_failed(path, e))?
            }
            Some(ExecEvent::Stderr(_)) => {}
            Some(ExecEvent::Exit(status)) => break status,
            None => break ExecStatus::SessionEnded(crate::EndReason::Crashed),
        }
    };
    finish(path, op, status)
}

fn finish(path: &str, op: &Exec, status: ExecStatus) -> Result<FileReply, Error> {
    if let ExecStatus::SessionEnded(reason) = status {
        return Err(Error::SessionEnded(reason));
    }
    match op.file_result() {
        Some(Ok(reply)) => Ok(reply),
        Some(Err(error)) => Err(Error::File {
            path: path.into(),
            kind: error.kind,
            message: error.message,
        }),
        None => Err(Error::Protocol(
            "the guest ended a file operation without its result".into(),
        )),
    }
}

fn output_failed(path: &str, error: io::Error) -> Error {
    if error.kind() == io::ErrorKind::FileTooLarge {
        return Error::File {
            path: path.into(),
            kind: FileErrorKind::TooLarge,
            message: format!("{path} is over the transfer limit"),
        };
    }
    Error::Io {
        context: format!("cannot store what was read from {path}"),
        source: error,
    }
}

fn unexpected(reply: &FileReply) -> Error {
    Error::Protocol(format!("unexpected file reply {reply:?}"))
}

/// A sink that refuses more than `left` bytes, whatever the guest sends.
struct Capped<'a> {
    sink: &'a mut dyn Write,
    left: u64,
    path: &'a str,
}

impl Write for Capped<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            tracing::debug!(path = self.path, "the guest sent past the transfer limit");
            return Err(io::ErrorKind::FileTooLarge.into());
        }
        self.left -= buf.len() as u64;
        self.sink.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

/// An operation's output as a reader, up to `left` bytes; its end status
/// is kept for the reply.
struct OpOutput<'a> {
    op: &'a Exec,
    chunk: Vec<u8>,
    at: usize,
    end: Option<ExecStatus>,
    left: u64,
}

impl Read for OpOutput<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.end.is_some() {
                return Ok(0);
            }
            match self.op.next_event() {
                Some(ExecEvent::Stdout(data)) => {
                    if data.len() as u64 > self.left {
                        return Err(io::ErrorKind::FileTooLarge.into());
                    }
                    self.left -= data.len() as u64;
                    self.chunk = data;
                    self.at = 0;
                }
                Some(ExecEvent::Stderr(_)) => {}
                Some(ExecEvent::Exit(status)) => self.end = Some(status),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

//! Flattening an image's layers into one tar stream, the root as the
//! guest will see it, without unpacking anything on the host.
//!
//! Layers are read from the top down. An entry of a lower layer is written
//! only if no layer above it replaced, deleted or hid its path, which is
//! what applying the layers bottom-up with the OCI layer rules would leave:
//!
//! * a later entry at a path replaces an earlier one; a directory over a
//!   directory keeps the lower one's children;
//! * `.wh.NAME` deletes `NAME` and everything under it in the layers
//!   below, and `.wh..wh..opq` hides everything below in its directory;
//! * a non-directory at a path hides everything under it below.
//!
//! Since every entry is decided the moment it is read, a layer streams
//! through once and nothing but paths is held in memory. The output keeps
//! owners, modes, set-id bits, extended attributes and hard links, because
//! it is only ever read by the packer (`tar2sqfs`), never unpacked here: no
//! owner needs the right to create, and no device node is made.
//!
//! Every layer is hostile until read: absolute and `..` paths, writes
//! through a symlink or any other non-directory, hard links to anything but
//! an earlier file of the same layer, and more bytes or entries than the
//! limits are refused; device nodes are left out (the guest's `/dev` is
//! devtmpfs).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Bounds on what one image may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Uncompressed bytes over all layers (every entry read counts, kept or
    /// not): the cap that stops a decompression bomb.
    pub expanded_bytes: u64,
    /// Entries over all layers.
    pub entries: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            expanded_bytes: 64 << 30,
            entries: 1 << 20,
        }
    }
}

/// Longest path in bytes, as Linux's `PATH_MAX`.
const MAX_PATH_LEN: usize = 4096;
/// Most components of a path. Each entry's ancestors are looked up, so
/// depth costs time per entry; real roots stay far below this.
const MAX_DEPTH: usize = 128;
/// Most entries in one directory: the packer's time grows with the square
/// of a directory's size (200,000 entries took it three minutes).
const MAX_DIRECTORY_ENTRIES: u32 = 65_536;
/// Most bytes of paths held while flattening, over all layers.
const MAX_PATH_BYTES: u64 = 512 << 20;
/// Most extended-attribute bytes on one entry (names and values).
const MAX_XATTR_BYTES: usize = 64 << 10;
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Entry types a root may hold (devices are read, and left out).
const SUPPORTED: [tar::EntryType; 8] = [
    tar::EntryType::Regular,
    tar::EntryType::Continuous,
    tar::EntryType::Link,
    tar::EntryType::Symlink,
    tar::EntryType::Directory,
    tar::EntryType::Fifo,
    tar::EntryType::Char,
    tar::EntryType::Block,
];

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The layer could not be read or decompressed.
    #[error("layer {layer} cannot be read: {source}")]
    Read {
        /// Layer number, 1 for the bottom.
        layer: usize,
        /// The failure: a truncated or corrupt stream among them.
        #[source]
        source: io::Error,
    },
    /// The layer breaks a rule a safe root needs.
    #[error("layer {layer} is refused: {reason}")]
    Refused {
        /// Layer number, 1 for the bottom.
        layer: usize,
        /// One clause naming the entry and the rule.
        reason: String,
    },
    /// The image is larger than [`Limits`] allow.
    #[error("the image expands past the limit of {limit} {what}")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// Writing the flattened stream failed (the packer ended early).
    #[error("cannot write the flattened root: {0}")]
    Write(#[source] io::Error),
}

/// A layer blob on disk, compressed or not (sniffed from its first bytes).
pub struct Layer<'a> {
    /// The blob.
    pub path: &'a Path,
}

/// What layers above the current one did to a path.
#[derive(Debug, Clone, Copy, Default)]
struct Claim {
    present: Present,
    /// Deleted (whiteout) or replaced by a non-directory: the lower entry
    /// at this path and everything under it are hidden.
    hides_self: bool,
    /// An opaque directory: everything under it below is hidden.
    hides_children: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Present {
    #[default]
    Nothing,
    /// A directory only implied by entries under it.
    ImpliedDir,
    Dir,
    NonDir,
}

/// What the current layer itself holds, for its own consistency checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Own {
    ImpliedDir,
    Dir,
    /// A regular file; `emitted` says whether it reaches the output.
    File {
        emitted: bool,
    },
    Other,
}

struct Counters {
    limits: Limits,
    bytes: u64,
    entries: u64,
    path_bytes: u64,
    /// Entries written so far into each directory.
    per_directory: HashMap<PathBuf, u32>,
}

/// Writes the root that `layers` (bottom first) make to `out` as a tar
/// stream. Every layer is checked as it is read; on error the output is
/// incomplete and must be thrown away.
pub fn flatten(layers: &[Layer<'_>], limits: Limits, out: impl Write) -> Result<(), LayerError> {
    flatten_when_ready(layers, limits, out, &|_| true)
}

/// [`flatten`], waiting before each layer until `ready(index)` (bottom
/// first) says it is there; false ends the flattening.
pub fn flatten_when_ready(
    layers: &[Layer<'_>],
    limits: Limits,
    out: impl Write,
    ready: &dyn Fn(usize) -> bool,
) -> Result<(), LayerError> {
    let mut builder = tar::Builder::new(out);
    let mut upper: HashMap<PathBuf, Claim> = HashMap::new();
    let mut counters = Counters {
        limits,
        bytes: 0,
        entries: 0,
        path_bytes: 0,
        per_directory: HashMap::new(),
    };
    for (index, layer) in layers.iter().enumerate().rev() {
        let number = index + 1;
        if !ready(index) {
            return Err(LayerError::Write(io::Error::other("the pull ended early")));
        }
        let pending = flatten_layer(layer, number, &upper, &mut counters, &mut builder)?;
        for (path, claim) in pending {
            let merged = upper.entry(path).or_default();
            let open = matches!(merged.present, Present::Nothing | Present::ImpliedDir);
            if open && claim.present != Present::Nothing {
                merged.present = claim.present;
            }
            merged.hides_self |= claim.hides_self;
            merged.hides_children |= claim.hides_children;
        }
    }
    builder.finish().map_err(LayerError::Write)?;
    Ok(())
}

/// Opens a layer blob, decompressing gzip or zstd by their magic numbers.
fn open(path: &Path) -> io::Result<Box<dyn Read>> {
    let mut file = BufReader::new(File::open(path)?);
    let mut magic = [0u8; 4];
    let seen = read_up_to(&mut file, &mut magic)?;
    let head = io::Cursor::new(magic[..seen].to_vec());
    let stream = head.chain(file);
    Ok(match Compression::of(&magic[..seen]) {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(stream)),
        Compression::Zstd => Box::new(Zstd::new(stream)),
        Compression::None => Box::new(stream),
    })
}

/// How a layer or tarball is compressed, as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    Gzip,
    Zstd,
    None,
}

impl Compression {
    pub(crate) fn of(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// A zstd stream of any number of frames, skippable ones (zstd:chunked's
/// metadata) skipped; ending inside a frame is an error.
struct Zstd<R: Read> {
    frame: Option<ruzstd::decoding::StreamingDecoder<Putback<R>, ruzstd::decoding::FrameDecoder>>,
    between: Option<Putback<R>>,
}

impl<R: Read> Zstd<R> {
    fn new(inner: R) -> Zstd<R> {
        Zstd {
            frame: None,
            between: Some(Putback {
                head: Vec::new(),
                inner,
            }),
        }
    }
}

impl<R: Read> Read for Zstd<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(frame) = self.frame.as_mut() {
                let n = frame.read(buf).map_err(|e| {
                    io::Error::new(e.kind(), format!("truncated or corrupt zstd data ({e})"))
                })?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                self.between = self.frame.take().map(|f| f.into_inner());
            }
            let Some(mut input) = self.between.take() else {
                return Ok(0);
            };
            let mut magic = [0u8; 4];
            let got = read_up_to(&mut input, &mut magic)?;
            if got == 0 {
                return Ok(0);
            }
            if got < magic.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the zstd stream ends inside a frame header",
                ));
            }
            if (0x184D_2A50..=0x184D_2A5F).contains(&u32::from_le_bytes(magic)) {
                let mut length = [0u8; 4];
                input.read_exact(&mut length)?;
                let length = u64::from(u32::from_le_bytes(length));
                let skipped = io::copy(&mut (&mut input).take(length), &mut io::sink())?;
                if skipped != length {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the zstd stream ends inside a skippable frame",
                    ));
                }
                self.between = Some(input);
                continue;
            }
            input.head = magic.to_vec();
            let frame = ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            self.frame = Some(frame);
        }
    }
}

/// A reader with bytes put back in front of it.
struct Putback<R> {
    head: Vec<u8>,
    inner: R,
}

impl<R: Read> Read for Putback<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.len());
            buf[..n].copy_from_slice(&self.head[..n]);
            self.head.drain(..n);
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

/// Fills as much of `buf` as the stream has, stopping only at its end.
pub(crate) fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut seen = 0;
    while seen < buf.len() {
        match reader.read(&mut buf[seen..]) {
            Ok(0) => break,
            Ok(n) => seen += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(seen)
}

/// Counts uncompressed bytes against the image's limit as they are read.
struct Counted<'c, R> {
    inner: R,
    counters: &'c std::cell::Cell<u64>,
    limit: u64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.counters.get() + n as u64;
        self.counters.set(total);
        if total > self.limit {
            return Err(io::Error::other(ExpandedTooFar));
        }
        Ok(n)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("expanded past the limit")]
struct ExpandedTooFar;

fn read_error(layer: usize, limits: Limits, source: io::Error) -> LayerError {
    if source
        .get_ref()
        .is_some_and(|inner| inner.is::<ExpandedTooFar>())
    {
        return LayerError::TooLarge {
            what: "bytes",
            limit: limits.expanded_bytes,
        };
    }
    LayerError::Read { layer, source }
}

/// A layer opened for reading, every uncompressed byte counted in `bytes`.
fn counted_archive<'c>(
    layer: &Layer<'_>,
    number: usize,
    limits: Limits,
    bytes: &'c std::cell::Cell<u64>,
) -> Result<tar::Archive<Counted<'c, Box<dyn Read>>>, LayerError> {
    let stream = open(layer.path).map_err(|e| read_error(number, limits, e))?;
    Ok(tar::Archive::new(Counted {
        inner: stream,
        counters: bytes,
        limit: limits.expanded_bytes,
    }))
}

/// A hard link of this layer whose target a layer above replaced, so the
/// target's bytes must come from a second read of this layer.
struct Deferred {
    link: PathBuf,
    target: PathBuf,
}

fn flatten_layer<W: Write>(
    layer: &Layer<'_>,
    number: usize,
    upper: &HashMap<PathBuf, Claim>,
    counters: &mut Counters,
    builder: &mut tar::Builder<W>,
) -> Result<HashMap<PathBuf, Claim>, LayerError> {
    let limits = counters.limits;
    let refused = |reason: String| LayerError::Refused {
        layer: number,
        reason,
    };
    let bytes = std::cell::Cell::new(counters.bytes);
    let mut archive = counted_archive(layer, number, limits, &bytes)?;
    let mut pending: HashMap<PathBuf, Claim> = HashMap::new();
    let mut own: HashMap<PathBuf, Own> = HashMap::new();
    let mut open_dirs = std::collections::HashSet::new();
    // Hard links resolve to the first name of their file in this layer.
    let mut link_names: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut deferred = Vec::new();

    let entries = archive
        .entries()
        .map_err(|e| read_error(number, limits, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| read_error(number, limits, e))?;
        counters.entries += 1;
        if counters.entries > limits.entries {
            return Err(LayerError::TooLarge {
                what: "entries",
                limit: limits.entries,
            });
        }
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let path = normalize(&raw).map_err(|why| refused(format!("{}: {why}", shown(&raw))))?;
        if is_sparse(&mut entry).map_err(|e| read_error(number, limits, e))? {
            return Err(refused(format!(
                "{}: sparse files are not supported",
                shown(&raw)
            )));
        }
        counters.path_bytes += raw.len() as u64;
        if counters.path_bytes > MAX_PATH_BYTES {
            return Err(LayerError::TooLarge {
                what: "bytes of paths",
                limit: MAX_PATH_BYTES,
            });
        }

        // Whiteouts act on the layers below and are never written.
        if let Some(name) = path.file_name().map(|n| n.as_bytes()) {
            if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
                let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
                check_own_ancestors(&own, &path).map_err(&refused)?;
                if name == OPAQUE_MARKER.as_bytes() {
                    pending.entry(dir).or_default().hides_children = true;
                } else if target.is_empty() || target == b"." || target == b".." {
                    return Err(refused(format!("{}: a whiteout with no name", shown(&raw))));
                } else {
                    let target = std::ffi::OsStr::from_bytes(target);
                    pending.entry(dir.join(target)).or_default().hides_self = true;
                }
                continue;
            }
        }
        // An old-style entry (type 0) named with a trailing slash is a
        // directory, as Go's archive/tar reads it.
        let kind = if kind == tar::EntryType::Regular && raw.ends_with(b"/") {
            tar::EntryType::Directory
        } else {
            kind
        };

        if !SUPPORTED.contains(&kind) {
            return Err(refused(format!(
                "{}: unsupported entry type {:?}",
                shown_path(&path),
                kind
            )));
        }
        let is_dir = kind.is_dir();
        if path.as_os_str().is_empty() && !is_dir {
            return Err(refused("the root is not a directory".into()));
        }
        check_own_ancestors(&own, &path).map_err(&refused)?;
        match own.get(&path) {
            Some(Own::Dir) if is_dir => continue,
            Some(Own::ImpliedDir) if is_dir => {}
            Some(_) => {
                return Err(refused(format!(
                    "{}: the layer holds this path twice",
                    shown_path(&path)
                )))
            }
            None => {}
        }
        let target = if kind == tar::EntryType::Link {
            let link = entry
                .link_name_bytes()
                .ok_or_else(|| {
                    refused(format!("{}: a hard link with no target", shown_path(&path)))
                })?
                .into_owned();
            let link = normalize(&link).map_err(|why| {
                refused(format!(
                    "{}: hard link target {}: {why}",
                    shown_path(&path),
                    shown(&link)
                ))
            })?;
            let first = link_names.get(&link).cloned().unwrap_or(link);
            match own.get(&first) {
                Some(Own::File { .. }) => Some(first),
                _ => {
                    return Err(refused(format!(
                        "{}: hard link to {}, which is not an earlier file of the same layer",
                        shown_path(&path),
                        shown_path(&first)
                    )))
                }
            }
        } else {
            None
        };

        let visible =
            decide(upper, &mut open_dirs, &path, is_dir, &mut pending).map_err(&refused)?;
        let keep = visible && !matches!(kind, tar::EntryType::Char | tar::EntryType::Block);
        if keep {
            if let Some(parent) = path.parent() {
                let count = counters
                    .per_directory
                    .entry(parent.to_path_buf())
                    .or_default();
                *count += 1;
                if *count > MAX_DIRECTORY_ENTRIES {
                    return Err(refused(format!(
                        "{}: more than {MAX_DIRECTORY_ENTRIES} entries in one directory",
                        shown_path(parent)
                    )));
                }
            }
        }
        for ancestor in ancestors(&path) {
            if own.contains_key(ancestor) {
                break;
            }
            own.insert(ancestor.to_path_buf(), Own::ImpliedDir);
        }
        let record = if is_dir {
            Own::Dir
        } else if matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            Own::File { emitted: keep }
        } else {
            Own::Other
        };
        own.insert(path.clone(), record);
        if let Some(target) = target {
            link_names.insert(path.clone(), target.clone());
            if keep {
                match own.get(&target) {
                    Some(Own::File { emitted: true }) => {
                        write_link(builder, &entry, &path, &target)?;
                    }
                    _ => deferred.push(Deferred {
                        link: path.clone(),
                        target,
                    }),
                }
            }
            continue;
        }
        if keep {
            write_entry(builder, &mut entry, &path, kind)
                .map_err(|e| e.into_layer_error(number, limits))?;
        }
    }
    // Read to the end of the stream: a compressed layer cut short after its
    // last tar block shows only in its trailer.
    io::copy(&mut archive.into_inner(), &mut io::sink())
        .map_err(|e| read_error(number, limits, e))?;
    counters.bytes = bytes.get();
    if !deferred.is_empty() {
        write_deferred(layer, number, counters, &deferred, builder)?;
    }
    Ok(pending)
}

/// Whether an entry at `path` reaches the root, given what the layers
/// above did; records what it does to the layers below in `pending`.
///
/// `open_dirs` holds the directories of this layer already found not to
/// hide what is under them, so each directory's ancestors are looked at
/// once per layer, not once per entry.
fn decide(
    upper: &HashMap<PathBuf, Claim>,
    open_dirs: &mut std::collections::HashSet<PathBuf>,
    path: &Path,
    is_dir: bool,
    pending: &mut HashMap<PathBuf, Claim>,
) -> Result<bool, String> {
    let mut walked = Vec::new();
    for ancestor in ancestors(path) {
        if open_dirs.contains(ancestor) {
            break;
        }
        if let Some(claim) = upper.get(ancestor) {
            if claim.hides_self || claim.hides_children || claim.present == Present::NonDir {
                return Ok(false);
            }
        }
        walked.push(ancestor);
    }
    open_dirs.extend(walked.into_iter().map(Path::to_path_buf));
    let root_is_opaque = upper.get(Path::new("")).is_some_and(|c| c.hides_children);
    if root_is_opaque && !path.as_os_str().is_empty() {
        return Ok(false);
    }
    let claim = upper.get(path).copied().unwrap_or_default();
    if claim.hides_self {
        return Ok(false);
    }
    let mark = |pending: &mut HashMap<PathBuf, Claim>| {
        let own = pending.entry(path.to_path_buf()).or_default();
        own.present = if is_dir {
            Present::Dir
        } else {
            Present::NonDir
        };
        own.hides_self |= !is_dir;
        for ancestor in ancestors(path) {
            let claim = pending.entry(ancestor.to_path_buf()).or_default();
            if claim.present != Present::Nothing {
                // Its own ancestors were marked with it.
                break;
            }
            claim.present = Present::ImpliedDir;
        }
    };
    match claim.present {
        Present::NonDir => Ok(false),
        Present::Dir => {
            if !is_dir {
                // Replaced above by a directory, but here it still hid the
                // layers below.
                pending
                    .entry(path.to_path_buf())
                    .or_default()
                    .hides_children = true;
            }
            Ok(false)
        }
        Present::ImpliedDir if !is_dir => Err(format!(
            "{}: a layer above writes under it, through a non-directory",
            shown_path(path)
        )),
        Present::ImpliedDir | Present::Nothing => {
            mark(pending);
            Ok(true)
        }
    }
}

/// Refuses an entry under a non-directory of the same layer: a write
/// through a symlink, or under a file.
fn check_own_ancestors(own: &HashMap<PathBuf, Own>, path: &Path) -> Result<(), String> {
    for ancestor in ancestors(path) {
        if let Some(kind) = own.get(ancestor) {
            if !matches!(kind, Own::Dir | Own::ImpliedDir) {
                return Err(format!(
                    "{}: written through {}, which is not a directory",
                    shown_path(path),
                    shown_path(ancestor)
                ));
            }
        }
    }
    Ok(())
}

/// The proper ancestors of `path`, not counting the root.
fn ancestors(path: &Path) -> impl Iterator<Item = &Path> {
    path.ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
}

/// A member path made relative and plain; the root itself is the empty path.
fn normalize(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.len() > MAX_PATH_LEN {
        return Err("the path is too long");
    }
    if raw.contains(&0) {
        return Err("a path with a NUL byte");
    }
    let mut path = PathBuf::new();
    let mut depth = 0;
    for component in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err("the path is too deep");
                }
                path.push(part)
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("an absolute path"),
            Component::ParentDir => return Err("a path with '..'"),
        }
    }
    Ok(path)
}

fn shown_path(path: &Path) -> String {
    shown(path.as_os_str().as_bytes())
}

/// A member name for a message: quoted, control characters escaped, and
/// cut at 200 characters.
fn shown(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut shown: String = text.chars().take(200).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

enum WriteFailure {
    Read(io::Error),
    Refused(String),
    Write(io::Error),
}

impl WriteFailure {
    fn into_layer_error(self, layer: usize, limits: Limits) -> LayerError {
        match self {
            WriteFailure::Read(source) => read_error(layer, limits, source),
            WriteFailure::Refused(reason) => LayerError::Refused { layer, reason },
            WriteFailure::Write(source) => LayerError::Write(source),
        }
    }
}

/// Copies a kept entry to the output with its metadata, xattrs included.
fn write_entry<R: Read, W: Write>(
    builder: &mut tar::Builder<W>,
    entry: &mut tar::Entry<'_, R>,
    path: &Path,
    kind: tar::EntryType,
) -> Result<(), WriteFailure> {
    let source = entry.header().clone();
    let xattrs = xattrs(entry).map_err(|e| match e {
        XattrFailure::Read(e) => WriteFailure::Read(e),
        XattrFailure::TooMany => WriteFailure::Refused(format!(
            "{}: too many extended attributes",
            shown_path(path)
        )),
    })?;
    if !xattrs.is_empty() {
        let records = pax_records(&xattrs);
        let mut pax = tar::Header::new_ustar();
        pax.set_entry_type(tar::EntryType::XHeader);
        pax.set_path("././@PaxHeader")
            .map_err(WriteFailure::Write)?;
        pax.set_mode(0o644);
        pax.set_size(records.len() as u64);
        pax.set_cksum();
        builder
            .append(&pax, records.as_slice())
            .map_err(WriteFailure::Write)?;
    }
    let mut header = tar::Header::new_gnu();
    copy_metadata(&source, &mut header);
    header.set_entry_type(match kind {
        tar::EntryType::Continuous => tar::EntryType::Regular,
        other => other,
    });
    let out_path = if path.as_os_str().is_empty() {
        Path::new("./")
    } else {
        path
    };
    match kind {
        tar::EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .unwrap_or_default();
            if target.is_empty() || target.len() > MAX_PATH_LEN {
                return Err(WriteFailure::Refused(format!(
                    "{}: a symlink with an empty or overlong target",
                    shown_path(path)
                )));
            }
            header.set_size(0);
            builder
                .append_link(&mut header, out_path, std::ffi::OsStr::from_bytes(&target))
                .map_err(WriteFailure::Write)
        }
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            header.set_size(entry.size());
            let mut reader = ReadSide { inner: entry };
            let result = builder.append_data(&mut header, out_path, &mut reader);
            match result {
                Ok(()) => Ok(()),
                Err(e) if e.get_ref().is_some_and(|i| i.is::<SourceFailed>()) => {
                    Err(WriteFailure::Read(unwrap_source(e)))
                }
                Err(e) => Err(WriteFailure::Write(e)),
            }
        }
        _ => {
            header.set_size(0);
            builder
                .append_data(&mut header, out_path, io::empty())
                .map_err(WriteFailure::Write)
        }
    }
}

/// A read error of the layer, told apart from a write error of the output
/// when both surface through `append_data`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SourceFailed(io::Error);

fn unwrap_source(error: io::Error) -> io::Error {
    match error
        .into_inner()
        .map(|inner| inner.downcast::<SourceFailed>())
    {
        Some(Ok(failed)) => failed.0,
        Some(Err(other)) => io::Error::other(other),
        None => io::Error::other("unknown read failure"),
    }
}

struct ReadSide<'e, R> {
    inner: &'e mut R,
}

impl<R: Read> Read for ReadSide<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner
            .read(buf)
            .map_err(|e| io::Error::other(SourceFailed(e)))
    }
}

fn write_link<R: Read, W: Write>(
    builder: &mut tar::Builder<W>,
    entry: &tar::Entry<'_, R>,
    path: &Path,
    target: &Path,
) -> Result<(), LayerError> {
    let mut header = tar::Header::new_gnu();
    copy_metadata(entry.header(), &mut header);
    header.set_entry_type(tar::EntryType::Link);
    header.set_size(0);
    builder
        .append_link(&mut header, path, target)
        .map_err(LayerError::Write)
}

fn copy_metadata(source: &tar::Header, header: &mut tar::Header) {
    header.set_mode(source.mode().unwrap_or(0o644) & 0o7777);
    header.set_uid(source.uid().unwrap_or(0));
    header.set_gid(source.gid().unwrap_or(0));
    header.set_mtime(source.mtime().unwrap_or(0));
}

/// PAX records `LEN KEY=VALUE\n`, where `LEN` counts the whole record,
/// its own digits included.
fn pax_records(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in pairs {
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

/// Whether an entry is a sparse file, in GNU's or PAX's form: its data is a
/// map, not the file, and vmette does not expand it.
fn is_sparse<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<bool> {
    if entry.header().entry_type() == tar::EntryType::GNUSparse {
        return Ok(true);
    }
    let Some(extensions) = entry.pax_extensions()? else {
        return Ok(false);
    };
    for extension in extensions {
        if extension?.key_bytes().starts_with(b"GNU.sparse.") {
            return Ok(true);
        }
    }
    Ok(false)
}

enum XattrFailure {
    Read(io::Error),
    TooMany,
}

fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<(String, Vec<u8>)>, XattrFailure> {
    let mut found = Vec::new();
    let mut total = 0;
    if let Some(extensions) = entry.pax_extensions().map_err(XattrFailure::Read)? {
        for extension in extensions {
            let extension = extension.map_err(XattrFailure::Read)?;
            let Ok(key) = extension.key() else { continue };
            if !key.starts_with("SCHILY.xattr.") {
                continue;
            }
            total += key.len() + extension.value_bytes().len();
            if total > MAX_XATTR_BYTES {
                return Err(XattrFailure::TooMany);
            }
            found.push((key.to_string(), extension.value_bytes().to_vec()));
        }
    }
    Ok(found)
}

/// Second read of a layer, for hard links whose first name a layer above
/// replaced: the first link gets the file's bytes, the others link to it.
fn write_deferred<W: Write>(
    layer: &Layer<'_>,
    number: usize,
    counters: &mut Counters,
    deferred: &[Deferred],
    builder: &mut tar::Builder<W>,
) -> Result<(), LayerError> {
    let limits = counters.limits;
    let bytes = std::cell::Cell::new(counters.bytes);
    let mut archive = counted_archive(layer, number, limits, &bytes)?;
    let mut wanted: HashMap<&Path, Vec<&Path>> = HashMap::new();
    for d in deferred {
        wanted.entry(&d.target).or_default().push(&d.link);
    }
    let entries = archive
        .entries()
        .map_err(|e| read_error(number, limits, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| read_error(number, limits, e))?;
        let raw = entry.path_bytes().into_owned();
        let Ok(path) = normalize(&raw) else { continue };
        let Some(links) = wanted.remove(path.as_path()) else {
            continue;
        };
        let Some((first, rest)) = links.split_first() else {
            continue;
        };
        let kind = entry.header().entry_type();
        write_entry(builder, &mut entry, first, kind)
            .map_err(|e| e.into_layer_error(number, limits))?;
        for link in rest {
            write_link(builder, &entry, link, first)?;
        }
        if wanted.is_empty() {
            break;
        }
    }
    counters.bytes = bytes.get();
    Ok(())
}

#[cfg(test)]
mod tests;

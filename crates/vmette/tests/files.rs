//! Files in a session on a real VM: a 10 MiB file written and read back
//! unchanged, a tree of 200 files with modes and a symlink copied in and
//! out, listing, stat, make and remove, and every failure typed, with the
//! session still usable after each. (The host-side unpacker fed hostile
//! tar streams directly is tested in `vmette-core`'s `tree` module.)

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use vmette::{Config, EndReason, Error, ExecSpec, ExecStatus, FileErrorKind, FileKind, Session};

const CAP: u64 = 16 << 20;

fn session() -> Session {
    let mut config = Config::default_machine();
    config.timeout = Some(Duration::from_secs(600));
    config.transfer_limit = CAP;
    config.memory_mib = 768;
    vmette::start_session(&config).expect("session")
}

/// Deterministic, incompressible-looking bytes.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn kind_of(result: Result<impl std::fmt::Debug, Error>) -> FileErrorKind {
    match result {
        Err(Error::File { kind, .. }) => kind,
        other => panic!("expected a file error, got {other:?}"),
    }
}

fn still_works(session: &Session) {
    let output = session
        .exec(&ExecSpec::new(["echo", "alive"]))
        .expect("exec")
        .output(1 << 20);
    assert_eq!(output.stdout, b"alive\n", "the session is not usable");
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u32, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("lstat");
            let rel = path.strip_prefix(root).expect("prefix").to_path_buf();
            let data = if meta.file_type().is_symlink() {
                std::fs::read_link(&path)
                    .expect("readlink")
                    .into_os_string()
                    .into_encoded_bytes()
            } else if meta.is_file() {
                std::fs::read(&path).expect("read")
            } else {
                Vec::new()
            };
            let mode = if meta.file_type().is_symlink() {
                0
            } else {
                meta.mode() & 0o7777
            };
            out.insert(rel, (mode, data));
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn files_move_in_and_out_and_failures_are_typed() {
    let session = session();

    // 10 MiB in and out, byte for byte.
    let data = noise(10 << 20);
    let written = session
        .write_file("/tmp/in/big.bin", &mut &data[..], 0o640)
        .expect("write");
    assert_eq!(written, data.len() as u64);
    let stat = session.stat("/tmp/in/big.bin").expect("stat");
    assert_eq!(
        (stat.kind, stat.size, stat.mode),
        (FileKind::File, 10 << 20, 0o640)
    );
    let mut back = Vec::new();
    let read = session
        .read_file("/tmp/in/big.bin", &mut back)
        .expect("read");
    assert_eq!(read, data.len() as u64);
    assert!(back == data, "the file came back changed");
    let output = session
        .exec(&ExecSpec::new(["sha256sum", "/tmp/in/big.bin"]))
        .expect("exec")
        .output(1 << 20);
    assert_eq!(output.status, ExecStatus::Exited(0));
    let digest: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        output.stdout.starts_with(digest.as_bytes()),
        "the guest's sha256 differs: {}",
        String::from_utf8_lossy(&output.stdout)
    );

    // A tree of 200 files with modes and a symlink, in and out.
    let source = tempfile::tempdir().expect("tempdir");
    for i in 0..200 {
        let dir = source.path().join(format!("d{}", i % 7));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join(format!("f{i}"));
        std::fs::write(&file, format!("file {i}\n").repeat(i)).expect("write");
        let mode = [0o644, 0o600, 0o755][i % 3];
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    symlink("d0/f0", source.path().join("link")).expect("symlink");
    session
        .copy_in(source.path(), "/srv/tree")
        .expect("copy in");
    let output = session
        .exec(&ExecSpec::new([
            "sh",
            "-c",
            "find /srv/tree -type f | wc -l; readlink /srv/tree/link; stat -c %a /srv/tree/d2/f2",
        ]))
        .expect("exec")
        .output(1 << 20);
    assert_eq!(output.stdout, b"200\nd0/f0\n755\n", "{output:?}");
    let target = tempfile::tempdir().expect("tempdir");
    let unpacked = session
        .copy_out("/srv/tree", target.path())
        .expect("copy out");
    assert_eq!((unpacked.files, unpacked.symlinks), (200, 1));
    assert_eq!(snapshot(target.path()), snapshot(source.path()));

    // Listing, stat, make and remove.
    let (entries, truncated) = session.list_dir("/srv/tree").expect("list");
    assert!(!truncated);
    let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "link"]);
    assert_eq!(entries[7].stat.kind, FileKind::Symlink);
    session.make_dir("/srv/a/b/c", true).expect("mkdir -p");
    assert_eq!(
        session.stat("/srv/a/b/c").expect("stat").kind,
        FileKind::Directory
    );
    assert_eq!(
        kind_of(session.remove("/srv/a", false)),
        FileErrorKind::Other
    );
    session.remove("/srv/a", true).expect("rm -r");
    assert_eq!(kind_of(session.stat("/srv/a")), FileErrorKind::NotFound);

    // Every failure typed, and the session goes on after each.
    let mut sink = Vec::new();
    assert_eq!(
        kind_of(session.read_file("/no/such/file", &mut sink)),
        FileErrorKind::NotFound
    );
    still_works(&session);
    assert_eq!(
        kind_of(session.read_file("/srv/tree", &mut sink)),
        FileErrorKind::IsADirectory
    );
    still_works(&session);
    assert_eq!(
        kind_of(session.list_dir("/srv/tree/link")),
        FileErrorKind::NotADirectory
    );
    still_works(&session);
    let over = noise(CAP as usize + 1);
    assert_eq!(
        kind_of(session.write_file("/tmp/over.bin", &mut &over[..], 0o644)),
        FileErrorKind::TooLarge
    );
    assert_eq!(
        kind_of(session.stat("/tmp/over.bin")),
        FileErrorKind::NotFound
    );
    still_works(&session);
    let made = session
        .exec(&ExecSpec::new([
            "sh",
            "-c",
            &format!("head -c {} /dev/zero > /tmp/huge", CAP + 1),
        ]))
        .expect("exec")
        .wait();
    assert_eq!(made, ExecStatus::Exited(0));
    assert_eq!(
        kind_of(session.read_file("/tmp/huge", &mut sink)),
        FileErrorKind::TooLarge
    );
    still_works(&session);
    assert!(matches!(
        session.copy_out("/tmp/huge", target.path()),
        Err(Error::File {
            kind: FileErrorKind::TooLarge,
            ..
        }) | Err(Error::Unpack(_))
    ));
    still_works(&session);

    // A tree over the limit is refused before a byte of it is sent.
    let mut tar = Vec::new();
    assert_eq!(
        kind_of(session.copy_out_tar("/tmp", &mut tar)),
        FileErrorKind::TooLarge
    );
    assert!(tar.is_empty(), "{} bytes were sent first", tar.len());
    still_works(&session);

    // A tree stays on its file system: a mount below it (here a tmpfs;
    // under / the guest's /proc, /sys and /dev) is kept as an empty
    // directory, and a fifo and a socket, which the host would not
    // unpack, are passed over.
    let made = session
        .exec(&ExecSpec::new([
            "sh",
            "-c",
            "mkdir -p /srv/fs/mnt && echo top > /srv/fs/top && mount -t tmpfs none /srv/fs/mnt \
             && echo inner > /srv/fs/mnt/inner \
             && mkfifo /srv/fs/fifo \
             && perl -MIO::Socket::UNIX -e 'IO::Socket::UNIX->new(Local => \"/srv/fs/sock\", Listen => 1) or die'",
        ]))
        .expect("exec")
        .output(1 << 20);
    assert_eq!(made.status, ExecStatus::Exited(0), "{made:?}");
    let mut tar = Vec::new();
    session
        .copy_out_tar("/srv/fs", &mut tar)
        .expect("tar of /srv/fs");
    let mut names: Vec<String> = tar::Archive::new(&tar[..])
        .entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, [".", "mnt", "top"].map(String::from), "{names:?}");
    let mut root = Vec::new();
    session
        .copy_out_tar("/srv/fs/mnt", &mut root)
        .expect("tar of the mount itself");
    assert!(tar::Archive::new(&root[..])
        .entries()
        .expect("entries")
        .any(|e| e.expect("entry").path().expect("path").ends_with("inner")));
    // A tree of /proc, whose entries come and go: refused as too large
    // (its kcore), not broken off or lost.
    assert_eq!(
        kind_of(session.copy_out_tar("/proc", &mut Vec::new())),
        FileErrorKind::TooLarge
    );
    still_works(&session);

    // A fifo is no file to read or write: refused at once, not waited on.
    let made = session
        .exec(&ExecSpec::new(["mkfifo", "/tmp/fifo"]))
        .expect("exec")
        .wait();
    assert_eq!(made, ExecStatus::Exited(0));
    assert_eq!(
        kind_of(session.read_file("/tmp/fifo", &mut sink)),
        FileErrorKind::Other
    );
    still_works(&session);

    // A source that fails half way: the error is the host's, and the
    // guest abandons the partial file.
    struct Failing(usize);
    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("the disk went away"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(b'x');
            self.0 -= n;
            Ok(n)
        }
    }
    assert!(matches!(
        session.write_file("/tmp/partial", &mut Failing(300_000), 0o644),
        Err(Error::Io { .. })
    ));
    assert_eq!(
        kind_of(session.stat("/tmp/partial")),
        FileErrorKind::NotFound
    );
    still_works(&session);

    // A tar that climbs out of its target.
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(5);
    header.set_mode(0o644);
    header.as_gnu_mut().expect("gnu").name[..4].copy_from_slice(b"../x");
    header.set_cksum();
    let mut evil = header.as_bytes().to_vec();
    evil.extend_from_slice(b"evil\n");
    evil.resize(evil.len().div_ceil(512) * 512 + 1024, 0);
    assert_eq!(
        kind_of(session.copy_in_tar(&mut &evil[..], "/srv/jail")),
        FileErrorKind::Escape
    );
    assert_eq!(kind_of(session.stat("/srv/x")), FileErrorKind::NotFound);
    still_works(&session);

    assert_eq!(session.stop(), EndReason::Stopped);
}

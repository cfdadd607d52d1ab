use std::collections::BTreeMap;
use std::io::Write;

use super::*;

/// One entry of a test layer, written with raw names so hostile paths
/// (`..`, absolute) can be made.
struct E {
    name: &'static str,
    kind: tar::EntryType,
    data: &'static [u8],
    link: &'static str,
    mode: u32,
    uid: u64,
    xattr: Option<(&'static str, &'static [u8])>,
}

fn file(name: &'static str, data: &'static [u8]) -> E {
    E {
        name,
        kind: tar::EntryType::Regular,
        data,
        link: "",
        mode: 0o644,
        uid: 0,
        xattr: None,
    }
}

fn dir(name: &'static str) -> E {
    E {
        kind: tar::EntryType::Directory,
        mode: 0o755,
        ..file(name, b"")
    }
}

fn link(kind: tar::EntryType, name: &'static str, target: &'static str) -> E {
    E {
        kind,
        link: target,
        mode: 0o777,
        ..file(name, b"")
    }
}

fn tar_bytes(entries: &[E]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        if let Some((key, value)) = e.xattr {
            let records = pax_records(&[(format!("SCHILY.xattr.{key}"), value.to_vec())]);
            let mut pax = tar::Header::new_ustar();
            pax.set_entry_type(tar::EntryType::XHeader);
            pax.set_size(records.len() as u64);
            pax.set_cksum();
            out.extend_from_slice(pax.as_bytes());
            out.extend_from_slice(&records);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..e.name.len()].copy_from_slice(e.name.as_bytes());
        header.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        header.set_entry_type(e.kind);
        header.set_mode(e.mode);
        header.set_uid(e.uid);
        header.set_gid(e.uid);
        header.set_size(e.data.len() as u64);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

/// Sets byte `at` of the first member's name in `tar`, keeping its
/// header's checksum right.
fn set_name_byte(tar: &mut [u8], at: usize, byte: u8) {
    let mut header = tar::Header::from_byte_slice(&tar[..512]).clone();
    header.as_mut_bytes()[at] = byte;
    header.set_cksum();
    tar[..512].copy_from_slice(header.as_bytes());
}

#[derive(Clone, Copy)]
enum Packing {
    Plain,
    Gzip,
    Zstd,
}

fn layer_file(dir: &Path, n: usize, entries: &[E], packing: Packing) -> PathBuf {
    let path = dir.join(format!("layer{n}"));
    let raw = tar_bytes(entries);
    let bytes = match packing {
        Packing::Plain => raw,
        Packing::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&raw).expect("gzip in memory");
            gz.finish().expect("gzip in memory")
        }
        Packing::Zstd => ruzstd::encoding::compress_to_vec(
            raw.as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        ),
    };
    std::fs::write(&path, bytes).expect("write a test layer");
    path
}

/// What the flattened root holds: path → (kind, mode, uid, data or link
/// target, xattr count).
type Root = BTreeMap<String, (char, u32, u64, Vec<u8>, usize)>;

fn flatten_with(layers: &[Vec<E>], packing: Packing, limits: Limits) -> Result<Root, LayerError> {
    let dir = tempfile::tempdir().expect("a temp dir");
    let paths: Vec<PathBuf> = layers
        .iter()
        .enumerate()
        .map(|(n, entries)| layer_file(dir.path(), n, entries, packing))
        .collect();
    let layers: Vec<Layer<'_>> = paths.iter().map(|p| Layer { path: p }).collect();
    let mut out = Vec::new();
    flatten(&layers, limits, &mut out)?;
    let mut root = Root::new();
    let mut archive = tar::Archive::new(out.as_slice());
    for entry in archive.entries().expect("the output is a tar") {
        let mut entry = entry.expect("a well-formed entry");
        let xattrs = entry
            .pax_extensions()
            .expect("pax")
            .map_or(0, |p| p.count());
        let header = entry.header().clone();
        let kind = match header.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Fifo => 'p',
            _ => 'f',
        };
        let mut data = Vec::new();
        if kind == 'l' || kind == 'h' {
            data = entry.link_name_bytes().expect("a target").into_owned();
        } else {
            entry.read_to_end(&mut data).expect("data");
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let mode = header.mode().expect("mode");
        let uid = header.uid().expect("uid");
        assert!(
            root.insert(path.clone(), (kind, mode, uid, data, xattrs))
                .is_none(),
            "{path} written twice"
        );
    }
    Ok(root)
}

fn flat(layers: &[Vec<E>]) -> Root {
    flatten_with(layers, Packing::Gzip, Limits::default()).expect("the layers flatten")
}

fn refused(layers: &[Vec<E>]) -> String {
    match flatten_with(layers, Packing::Plain, Limits::default()) {
        Err(e) => e.to_string(),
        Ok(root) => panic!("hostile layers were accepted: {root:?}"),
    }
}

#[test]
fn whiteouts_delete_and_opaque_directories_hide_what_is_below() {
    let root = flat(&[
        vec![
            dir("etc"),
            file("etc/marker", b"base"),
            file("etc/gone", b"x"),
            dir("etc/tree"),
            file("etc/tree/leaf", b"x"),
            dir("opaque"),
            file("opaque/old", b"x"),
        ],
        vec![
            dir("etc"),
            file("etc/.wh.gone", b""),
            file("etc/.wh.tree", b""),
            dir("opaque"),
            file("opaque/.wh..wh..opq", b""),
            file("opaque/new", b"y"),
        ],
    ]);
    let paths: Vec<&str> = root.keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        ["etc", "etc/marker", "opaque", "opaque/new"],
        "{root:?}"
    );
    assert_eq!(root["etc/marker"].3, b"base");
}

#[test]
fn upper_entries_replace_lower_ones_and_directories_merge() {
    let mut upper_dir = dir("data");
    upper_dir.mode = 0o700;
    let root = flat(&[
        vec![
            dir("data"),
            file("data/a", b"old"),
            file("data/b", b"kept"),
            dir("swap"),
            file("swap/child", b"hidden by the file above"),
        ],
        vec![
            upper_dir,
            file("data/a", b"new"),
            file("swap", b"now a file"),
        ],
    ]);
    assert_eq!(root["data"].1, 0o700);
    assert_eq!(root["data/a"].3, b"new");
    assert_eq!(root["data/b"].3, b"kept");
    assert_eq!(root["swap"].0, 'f');
    assert!(!root.contains_key("swap/child"));
}

#[test]
fn owners_modes_xattrs_and_hard_links_survive() {
    let mut setuid = file("bin/su", b"#!");
    setuid.mode = 0o4755;
    setuid.uid = 0;
    let mut owned = file("home/app/notes", b"n");
    owned.uid = 1000;
    owned.xattr = Some(("user.origin", b"layer"));
    let root = flatten_with(
        &[vec![
            dir("bin"),
            setuid,
            link(tar::EntryType::Link, "bin/su-again", "bin/su"),
            dir("home"),
            dir("home/app"),
            owned,
            link(tar::EntryType::Symlink, "home/app/etc", "/etc"),
        ]],
        Packing::Zstd,
        Limits::default(),
    )
    .expect("the layer flattens");
    assert_eq!(root["bin/su"].1, 0o4755);
    assert_eq!(root["bin/su-again"].0, 'h');
    assert_eq!(root["bin/su-again"].3, b"bin/su");
    assert_eq!(root["home/app/notes"].2, 1000);
    assert_eq!(root["home/app/notes"].4, 1);
    assert_eq!(root["home/app/etc"], ('l', 0o777, 0, b"/etc".to_vec(), 0));
}

#[test]
fn a_hard_link_keeps_its_bytes_when_its_first_name_is_replaced_above() {
    let root = flat(&[
        vec![
            file("first", b"original"),
            link(tar::EntryType::Link, "second", "first"),
            link(tar::EntryType::Link, "third", "first"),
        ],
        vec![file("first", b"replaced")],
    ]);
    assert_eq!(root["first"].3, b"replaced");
    assert_eq!(root["second"], ('f', 0o644, 0, b"original".to_vec(), 0));
    assert_eq!(root["third"].0, 'h');
    assert_eq!(root["third"].3, b"second");
}

#[test]
fn devices_are_left_out_but_still_replace_what_is_below() {
    let root = flat(&[
        vec![dir("dev"), dir("dev/x"), file("dev/x/y", b"y")],
        vec![dir("dev"), link(tar::EntryType::Char, "dev/x", "")],
    ]);
    assert_eq!(root.keys().collect::<Vec<_>>(), ["dev"]);
}

#[test]
fn escaping_paths_are_refused() {
    assert!(refused(&[vec![file("../evil", b"x")]]).contains("'..'"));
    assert!(refused(&[vec![file("/etc/evil", b"x")]]).contains("absolute"));
    assert!(refused(&[vec![
        dir("a"),
        link(tar::EntryType::Link, "a/x", "../../etc/passwd")
    ]])
    .contains("'..'"));
}

#[test]
fn writes_through_a_symlink_are_refused() {
    let reason = refused(&[vec![
        link(tar::EntryType::Symlink, "escape", "/tmp"),
        file("escape/planted", b"x"),
    ]]);
    assert!(reason.contains("not a directory"), "{reason}");
    let reason = refused(&[
        vec![link(tar::EntryType::Symlink, "escape", "/tmp")],
        vec![file("escape/planted", b"x")],
    ]);
    assert!(reason.contains("non-directory"), "{reason}");
}

#[test]
fn hard_links_must_name_an_earlier_file_of_the_same_layer() {
    let reason = refused(&[vec![link(tar::EntryType::Link, "shadow", "etc/shadow")]]);
    assert!(reason.contains("not an earlier file"), "{reason}");
    let reason = refused(&[
        vec![file("lower", b"x")],
        vec![link(tar::EntryType::Link, "upper", "lower")],
    ]);
    assert!(reason.contains("not an earlier file"), "{reason}");
    let reason = refused(&[vec![dir("d"), link(tar::EntryType::Link, "l", "d")]]);
    assert!(reason.contains("not an earlier file"), "{reason}");
}

#[test]
fn a_path_twice_in_one_layer_is_refused() {
    let reason = refused(&[vec![file("x", b"1"), file("x", b"2")]]);
    assert!(reason.contains("twice"), "{reason}");
}

#[test]
fn truncated_streams_are_read_errors() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let big: Vec<E> = vec![file("data", &[7; 4096])];
    for packing in [Packing::Gzip, Packing::Zstd] {
        let path = layer_file(dir.path(), 0, &big, packing);
        let bytes = std::fs::read(&path).expect("read back");
        std::fs::write(&path, &bytes[..bytes.len() - 8]).expect("truncate");
        let error = flatten(&[Layer { path: &path }], Limits::default(), io::sink())
            .expect_err("a truncated stream");
        assert!(matches!(error, LayerError::Read { .. }), "{error}");
    }
}

#[test]
fn expansion_and_entry_counts_are_capped() {
    static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
    let limits = Limits {
        expanded_bytes: 512 << 10,
        entries: 100,
    };
    let bomb =
        flatten_with(&[vec![file("bomb", &ZEROS)]], Packing::Zstd, limits).expect_err("a bomb");
    assert!(
        matches!(bomb, LayerError::TooLarge { what: "bytes", .. }),
        "{bomb}"
    );
    let many: Vec<E> = (0..101).map(|_| dir("d")).collect();
    let error = flatten_with(&[many], Packing::Plain, limits).expect_err("too many entries");
    assert!(
        matches!(
            error,
            LayerError::TooLarge {
                what: "entries",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn zstd_layers_may_have_many_frames_and_skippable_ones() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let raw = tar_bytes(&[file("a", b"first"), file("b", &[9; 3000])]);
    let (front, back) = raw.split_at(700);
    let level = ruzstd::encoding::CompressionLevel::Fastest;
    let mut bytes = ruzstd::encoding::compress_to_vec(front, level);
    bytes.extend_from_slice(&0x184D_2A5Au32.to_le_bytes());
    bytes.extend_from_slice(&5u32.to_le_bytes());
    bytes.extend_from_slice(b"skip!");
    bytes.extend(ruzstd::encoding::compress_to_vec(back, level));
    let path = dir.path().join("layer");
    std::fs::write(&path, &bytes).expect("write");
    let mut out = Vec::new();
    flatten(&[Layer { path: &path }], Limits::default(), &mut out).expect("two frames flatten");
    let names: Vec<String> = tar::Archive::new(out.as_slice())
        .entries()
        .expect("a tar")
        .map(|e| String::from_utf8_lossy(&e.expect("entry").path_bytes()).into_owned())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn an_opaque_root_hides_every_lower_entry() {
    let root = flat(&[
        vec![file("lower", b"x"), dir("d"), file("d/a", b"a")],
        vec![file(".wh..wh..opq", b""), file("upper", b"u")],
    ]);
    assert_eq!(root.keys().collect::<Vec<_>>(), ["upper"]);
}

#[test]
fn whiteouts_are_matched_by_bytes_and_old_style_directories_are_directories() {
    let dir = tempfile::tempdir().expect("a temp dir");
    // Members renamed in place to the non-UTF-8 "\xff" and ".wh.\xff".
    let mut lower = tar_bytes(&[file("x", b"x")]);
    set_name_byte(&mut lower, 0, 0xff);
    let mut upper = tar_bytes(&[file(".wh.x", b""), file("olddir/", b"")]);
    set_name_byte(&mut upper, 4, 0xff);
    let paths = [dir.path().join("0"), dir.path().join("1")];
    std::fs::write(&paths[0], lower).expect("write");
    std::fs::write(&paths[1], upper).expect("write");
    let layers: Vec<Layer<'_>> = paths.iter().map(|p| Layer { path: p }).collect();
    let mut out = Vec::new();
    flatten(&layers, Limits::default(), &mut out).expect("flatten");
    let entries: Vec<(Vec<u8>, tar::EntryType)> = tar::Archive::new(out.as_slice())
        .entries()
        .expect("a tar")
        .map(|e| {
            let e = e.expect("entry");
            (e.path_bytes().into_owned(), e.header().entry_type())
        })
        .collect();
    assert_eq!(entries, [(b"olddir".to_vec(), tar::EntryType::Directory)]);
}

#[test]
fn nul_bytes_deep_paths_sparse_files_and_crowded_directories_are_refused() {
    let mut long = tar::Header::new_gnu();
    long.set_entry_type(tar::EntryType::GNULongName);
    let name = b"a\0b";
    long.set_size(name.len() as u64 + 1);
    long.set_cksum();
    let mut layer = long.as_bytes().to_vec();
    layer.extend_from_slice(name);
    layer.push(0);
    layer.resize(1024, 0);
    layer.extend(tar_bytes(&[file("placeholder", b"x")]));
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("nul");
    std::fs::write(&path, layer).expect("write");
    let error = flatten(&[Layer { path: &path }], Limits::default(), io::sink())
        .expect_err("a NUL in a name");
    assert!(error.to_string().contains("NUL"), "{error}");

    let deep = "d/".repeat(MAX_DEPTH) + "f";
    let dir2 = tempfile::tempdir().expect("a temp dir");
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(1);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, &deep, &b"x"[..])
        .expect("a long name");
    let path = dir2.path().join("deep");
    std::fs::write(&path, builder.into_inner().expect("tar")).expect("write");
    let error =
        flatten(&[Layer { path: &path }], Limits::default(), io::sink()).expect_err("too deep");
    assert!(error.to_string().contains("too deep"), "{error}");

    let records = pax_records(&[("GNU.sparse.major".into(), b"1".to_vec())]);
    let mut pax = tar::Header::new_ustar();
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_size(records.len() as u64);
    pax.set_cksum();
    let mut layer = pax.as_bytes().to_vec();
    layer.extend_from_slice(&records);
    layer.resize(layer.len().div_ceil(512) * 512, 0);
    layer.extend(tar_bytes(&[file("sparse", b"map")]));
    let path = dir2.path().join("sparse");
    std::fs::write(&path, layer).expect("write");
    let error = flatten(&[Layer { path: &path }], Limits::default(), io::sink())
        .expect_err("a sparse file");
    assert!(error.to_string().contains("sparse"), "{error}");

    let names: Vec<String> = (0..=MAX_DIRECTORY_ENTRIES)
        .map(|n| format!("c/{n}"))
        .collect();
    let entries: Vec<E> = names
        .iter()
        .map(|n| file(Box::leak(n.clone().into_boxed_str()), b""))
        .collect();
    let error = flatten_with(&[entries], Packing::Plain, Limits::default())
        .expect_err("a crowded directory");
    assert!(
        error.to_string().contains("entries in one directory"),
        "{error}"
    );
}

//! Hostile images: a registry that lies, and archives that try to escape.
//! The registry here is the attacker, so it is a small server of the
//! test's own that serves whatever each case needs (a real registry checks
//! digests and would refuse to serve these). Every case must end in exit
//! 125 with one sentence, and write nothing outside the store.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use support::{code, stderr};

fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// What the hostile registry serves for one repository.
#[derive(Default, Clone)]
struct Case {
    manifest: Vec<u8>,
    blobs: HashMap<String, Vec<u8>>,
    /// Answer the manifest request with a body that never ends.
    endless: bool,
}

/// A tar stream written by hand, so any member name can be made.
fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data, link) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().expect("gzip output");
    writer.join().expect("writer").expect("write to gzip");
    output.stdout
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
}

const CONFIG: &[u8] = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;

/// An image of one layer; `tweak` may change the manifest's JSON and the
/// served blobs.
fn case(
    layer: Vec<u8>,
    tweak: impl FnOnce(&mut serde_json::Value, &mut HashMap<String, Vec<u8>>),
) -> Case {
    let mut blobs = HashMap::new();
    let layer_digest = digest(&layer);
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(CONFIG),
            "size": CONFIG.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    blobs.insert(digest(CONFIG), CONFIG.to_vec());
    blobs.insert(layer_digest, layer);
    tweak(&mut manifest, &mut blobs);
    Case {
        manifest: serde_json::to_vec(&manifest).expect("encode"),
        blobs,
        endless: false,
    }
}

/// Serves `cases` (repository `hostile/NAME`) over HTTP on a loopback port.
fn serve(cases: HashMap<String, Case>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let cases = Arc::new(cases);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let cases = Arc::clone(&cases);
            std::thread::spawn(move || answer(stream, &cases));
        }
    });
    port
}

fn answer(stream: TcpStream, cases: &HashMap<String, Case>) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                break;
            }
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("").to_string();
        if path.contains("/manifests/") && cases.values().any(|c| c.endless) {
            let endless = path
                .strip_prefix("/v2/hostile/")
                .and_then(|rest| rest.split('/').next())
                .and_then(|name| cases.get(name))
                .is_some_and(|c| c.endless);
            if endless {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\n\r\n";
                if writer.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = [b' '; 65536];
                while writer.write_all(b"10000\r\n").is_ok()
                    && writer.write_all(&chunk).is_ok()
                    && writer.write_all(b"\r\n").is_ok()
                {}
                return;
            }
        }
        let (status, kind, body, digest_header) = route(&path, cases);
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(d) = digest_header {
            head.push_str(&format!("Docker-Content-Digest: {d}\r\n"));
        }
        head.push_str("\r\n");
        if writer.write_all(head.as_bytes()).is_err() {
            return;
        }
        if method != "HEAD" && writer.write_all(&body).is_err() {
            return;
        }
    }
}

fn route(
    path: &str,
    cases: &HashMap<String, Case>,
) -> (&'static str, String, Vec<u8>, Option<String>) {
    let not_found = || {
        (
            "404 Not Found",
            "application/json".to_string(),
            br#"{"errors":[{"code":"NOT_FOUND","message":"no"}]}"#.to_vec(),
            None,
        )
    };
    if path == "/v2/" {
        return ("200 OK", "application/json".into(), b"{}".to_vec(), None);
    }
    let Some(rest) = path.strip_prefix("/v2/hostile/") else {
        return not_found();
    };
    let Some((name, rest)) = rest.split_once('/') else {
        return not_found();
    };
    let Some(case) = cases.get(name) else {
        return not_found();
    };
    if rest.starts_with("manifests/") {
        let kind = serde_json::from_slice::<serde_json::Value>(&case.manifest)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(String::from))
            .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
        return (
            "200 OK",
            kind,
            case.manifest.clone(),
            Some(digest(&case.manifest)),
        );
    }
    if let Some(wanted) = rest.strip_prefix("blobs/") {
        if let Some(blob) = case.blobs.get(wanted) {
            return (
                "200 OK",
                "application/octet-stream".into(),
                blob.clone(),
                None,
            );
        }
    }
    not_found()
}

fn layer_of(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
    gzip(&raw_tar(entries))
}

use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as L};

#[test]
fn hostile_registries_and_archives_are_refused_and_write_nothing_outside_the_store() {
    let canary = tempfile::tempdir().expect("a canary directory");
    let canary_path = canary.path().display().to_string();
    let canary_link: &'static str = Box::leak(canary_path.clone().into_boxed_str());
    let zeros = vec![0u8; 4 << 20];
    let good_layer = layer_of(&[("etc/", D, b"", ""), ("etc/ok", F, b"ok", "")]);
    let truncated_gzip = {
        let full = layer_of(&[("data", F, &[5u8; 20000], "")]);
        full[..full.len() - 10].to_vec()
    };
    let truncated_zstd = {
        let full = zstd(&raw_tar(&[("data", F, &[5u8; 20000], "")]));
        full[..full.len() / 2].to_vec()
    };
    let mut cases: Vec<(&str, Case, &str)> = vec![
        (
            "dotdot",
            case(layer_of(&[("../../escaped", F, b"x", "")]), |_, _| {}),
            "'..'",
        ),
        (
            "absolute",
            case(layer_of(&[("/tmp/escaped-abs", F, b"x", "")]), |_, _| {}),
            "absolute",
        ),
        (
            "through-symlink",
            case(
                layer_of(&[("link", L, b"", canary_link), ("link/planted", F, b"x", "")]),
                |_, _| {},
            ),
            "not a directory",
        ),
        (
            "hardlink-out",
            case(layer_of(&[("shadow", H, b"", "/etc/shadow")]), |_, _| {}),
            "absolute",
        ),
        (
            "hardlink-missing",
            case(layer_of(&[("passwd", H, b"", "etc/passwd")]), |_, _| {}),
            "not an earlier file",
        ),
        (
            "wrong-digest",
            case(good_layer.clone(), |_, blobs| {
                let d = digest(&good_layer);
                let mut evil = good_layer.clone();
                let last = evil.len() - 1;
                evil[last] ^= 0xff;
                blobs.insert(d, evil);
            }),
            "does not match its digest",
        ),
        (
            "size-lie",
            case(good_layer.clone(), |manifest, _| {
                manifest["layers"][0]["size"] = serde_json::json!(16);
            }),
            "longer than",
        ),
        (
            "truncated-gzip",
            case(truncated_gzip, |_, _| {}),
            "cannot be read",
        ),
        (
            "truncated-zstd",
            case(truncated_zstd, |_, _| {}),
            "cannot be read",
        ),
        (
            "bomb",
            case(gzip(&raw_tar(&[("bomb", F, &zeros, "")])), |_, _| {}),
            "past the limit",
        ),
        (
            "huge-config",
            case(good_layer.clone(), |manifest, _| {
                manifest["config"]["size"] = serde_json::json!(64u64 << 20);
            }),
            "config",
        ),
    ];
    cases.push((
        "declared-huge",
        case(good_layer.clone(), |manifest, _| {
            manifest["layers"][0]["size"] = serde_json::json!(1u64 << 50);
        }),
        "declared larger than the limit",
    ));
    let mut endless = case(good_layer.clone(), |_, _| {});
    endless.endless = true;
    cases.push(("endless-manifest", endless, "larger than"));
    let mut huge_manifest = case(good_layer.clone(), |_, _| {});
    huge_manifest.manifest.resize(5 << 20, b' ');
    cases.push(("huge-manifest", huge_manifest, "larger than"));

    let port = serve(
        cases
            .iter()
            .map(|(name, case, _)| (name.to_string(), case.clone()))
            .collect(),
    );
    let (cache, store) = support::registry::private_cache();
    let sandbox = support::Sandbox::new();
    let pull = |args: &[&str]| {
        let mut command = sandbox.command(args);
        command.env("VMETTE_CACHE_DIR", cache.path());
        let output = support::wait_with_limit(command.spawn().expect("spawn"), support::RUN_LIMIT);
        sandbox.assert_clean();
        output
    };
    for (name, _, expected) in &cases {
        let reference = format!("127.0.0.1:{port}/hostile/{name}:v1");
        let output = pull(&["pull", "--image-limit", "1M", &reference]);
        let message = stderr(&output);
        assert_eq!(code(&output), 125, "{name}: {message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{name}: {message}");
        assert!(
            message.contains(expected),
            "{name} should say {expected:?}: {message}"
        );
        assert!(
            message.contains(&reference),
            "{name} should name the image: {message}"
        );
    }

    // Local tarballs: one over the size cap, one that escapes.
    let files = sandbox.files();
    let big = files.path().join("big.tar");
    std::fs::write(&big, raw_tar(&[("blob", F, &vec![1u8; 2 << 20], "")])).expect("write");
    let escaping = files.path().join("escaping.tar.gz");
    std::fs::write(&escaping, layer_of(&[("../escaped", F, b"x", "")])).expect("write");
    for (path, expected) in [(&big, "over the limit"), (&escaping, "'..'")] {
        let word = path.display().to_string();
        let output = pull(&["run", "--image-limit", "1M", &word, "--", "true"]);
        let message = stderr(&output);
        assert_eq!(code(&output), 125, "{word}: {message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{message}");
        assert!(message.contains(expected), "{word}: {message}");
    }

    assert_eq!(
        empty(canary.path()),
        Vec::<String>::new(),
        "written through a link"
    );
    assert_eq!(
        empty(&store.join("roots")),
        Vec::<String>::new(),
        "a root was stored"
    );
    assert_eq!(
        empty(&store.join("tmp")),
        Vec::<String>::new(),
        "work left behind"
    );
    for escaped in ["/tmp/escaped-abs", "/escaped"] {
        assert!(!Path::new(escaped).exists(), "{escaped} was written");
    }
}

/// The names in `dir`, which should have none.
fn empty(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

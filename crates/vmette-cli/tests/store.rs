//! The image store end to end: presets built from Debian packages, the
//! management commands, tarballs over HTTP, and many vmette processes
//! using one store at once (pulls side by side, a pull killed half-way,
//! prunes while VMs run). Real VMs, Debian's `docker-registry` on
//! loopback, and a loopback HTTP server of the test's own.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::registry::{hex_string, tar_layer, Layout, Registry};
use support::store::{ok, refused, Images, StopsDaemon};
use support::{code, stderr};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    found.sort();
    found
}

/// The store's roots with their inode numbers: equal lists mean nothing
/// was built or packed again.
fn roots_with_inodes(images: &Images) -> Vec<(PathBuf, u64)> {
    entries(&images.store.join("roots"))
        .into_iter()
        .map(|p| {
            let inode = std::fs::metadata(&p).expect("a root").ino();
            (p, inode)
        })
        .collect()
}

/// `len` bytes no compressor shrinks (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

/// Builds `tag`: a busybox image (`PATH=/bin`) with `/noise`, `len` bytes
/// no compressor shrinks.
fn build_noisy(layout: &Layout, tag: &str, len: usize) {
    let noise = noise(len);
    layout.build(
        tag,
        |root| std::fs::write(root.join("noise"), &noise).expect("noise"),
        &[],
        &["--config.env=PATH=/bin"],
    );
}

fn assert_no_temp_files(images: &Images) {
    let left = entries(&images.store.join("tmp"));
    assert!(left.is_empty(), "temp files left in the store: {left:?}");
}

#[test]
fn presets_build_once_from_debian_packages_and_need_no_registry() {
    let images = Images::new();
    let mut figures = Vec::new();
    for (preset, command, args) in [
        ("python", "python3", ["-c", "print(6*7)"]),
        ("node", "node", ["-e", "console.log(6*7)"]),
    ] {
        let started = Instant::now();
        let output = images.run(&["run", preset, "--", command, args[0], args[1]]);
        figures.push(format!(
            "{preset}: first run {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        assert_eq!(ok(&output), "42\n");
        let built = roots_with_inodes(&images);
        // The second run builds nothing, and needs nothing but the store.
        let started = Instant::now();
        let output = images.run(&["run", "--offline", preset, "--", command, args[0], args[1]]);
        figures.push(format!("second {:.1} s", started.elapsed().as_secs_f64()));
        assert_eq!(ok(&output), "42\n");
        assert_eq!(
            roots_with_inodes(&images),
            built,
            "{preset} was built again"
        );
    }
    // `vmette setup --presets` builds ahead of use; the toolbox carries
    // what the network tests rely on.
    let started = Instant::now();
    ok(&images.run(&["setup", "--presets", "toolbox"]));
    figures.push(format!(
        "toolbox: setup {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let tools = "dig -v 2>&1 | head -1; curl --version | head -1; ip -V; openssl version; python3 -V; ls /etc/ssl/certs/ca-certificates.crt";
    let out = ok(&images.run(&["run", "--offline", "toolbox", "--", "sh", "-c", tools]));
    for expected in [
        "DiG 9",
        "curl 7",
        "iproute2",
        "OpenSSL 3",
        "Python 3",
        "ca-certificates.crt",
    ] {
        assert!(out.contains(expected), "{expected} missing in: {out}");
    }
    eprintln!("preset figures: {}", figures.join(", "));

    // A preset is a bare name; with a tag it is Docker Hub's, which
    // --offline does not reach.
    let message = refused(&images.run(&["run", "--offline", "python:3.12-slim", "--", "true"]));
    assert!(
        message.contains("docker.io/library/python:3.12-slim"),
        "{message}"
    );

    let listed = json(&ok(&images.run(&["images", "--json"])));
    let presets: Vec<&str> = listed["images"]
        .as_array()
        .expect("images")
        .iter()
        .filter(|i| i["preset"] == true)
        .map(|i| i["reference"].as_str().expect("reference"))
        .collect();
    for name in ["debian", "python", "node", "toolbox"] {
        assert!(
            presets.contains(&name),
            "{name} not listed as a preset: {listed}"
        );
    }
    let inspected = json(&ok(&images.run(&["inspect", "python", "--json"])));
    assert_eq!(inspected["origin"]["kind"], "preset", "{inspected}");
    assert_eq!(inspected["config"]["cmd"], serde_json::json!(["python3"]));
    assert!(inspected["origin"]["packages"]
        .as_array()
        .expect("packages")
        .contains(&serde_json::json!("python3-venv")));
    let text = ok(&images.run(&["images"]));
    assert!(text.contains("python (preset)"), "{text}");
    assert_no_temp_files(&images);
}

/// The registry, a base image and two images on it that share its layer.
struct TwoImages {
    registry: Registry,
    _layout: Layout,
    base: String,
    derived: String,
}

impl TwoImages {
    fn push() -> TwoImages {
        let registry = Registry::start(false);
        let layout = Layout::new();
        // A base layer big enough to see on disk.
        build_noisy(&layout, "base", 8 << 20);
        layout.derive("base", "derived", &tar_layer(&[("etc/derived", b"yes\n")]));
        let base = layout.push("base", &registry.host(), "shared", false, false);
        let derived = layout.push("derived", &registry.host(), "shared", false, false);
        TwoImages {
            registry,
            _layout: layout,
            base,
            derived,
        }
    }
}

/// A `vmette run` whose guest has printed `ready` and waits for its
/// stdin to close.
struct Running {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Running {
    fn start(images: &Images, image: &str, script: &str) -> Running {
        let mut child = images
            .sandbox
            .command(&["run", image, "--", "sh", "-c", script])
            .env("VMETTE_CACHE_DIR", &images.cache_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn vmette");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the guest's line");
        assert_eq!(line, "ready\n", "{}", support::stderr_of(&mut child));
        Running { child, stdout }
    }

    /// Closes the guest's stdin and returns the rest of its output once
    /// the run succeeded.
    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        self.stdout
            .read_to_string(&mut rest)
            .expect("read the run's output");
        let status = support::wait_status(&mut self.child, support::RUN_LIMIT);
        assert!(status.success(), "the run failed: {status:?}");
        rest
    }
}

#[test]
fn images_inspect_rmi_and_prune_keep_what_vms_use() {
    let images = Images::new();
    let two = TwoImages::push();
    ok(&images.run(&["pull", &two.base]));
    ok(&images.run(&["pull", &two.derived]));

    let listed = json(&ok(&images.run(&["images", "--json"])));
    let stored: Vec<&serde_json::Value> = listed["images"]
        .as_array()
        .expect("images")
        .iter()
        .filter(|i| i["preset"] == false)
        .collect();
    assert_eq!(stored.len(), 2, "{listed}");
    let sum: u64 = stored
        .iter()
        .map(|i| i["bytes"].as_u64().expect("bytes"))
        .sum();
    let on_disk = listed["store_bytes"].as_u64().expect("store_bytes");
    eprintln!(
        "two images sharing a base layer: {:.1} MiB on disk, {:.1} MiB as the sum of their sizes",
        on_disk as f64 / 1048576.0,
        sum as f64 / 1048576.0
    );
    assert!(
        on_disk < sum,
        "the shared layer is stored once: {on_disk} < {sum}"
    );
    assert!(stored.iter().all(|i| i["created"].is_string()), "{listed}");

    let inspected = json(&ok(&images.run(&["inspect", &two.derived, "--json"])));
    assert_eq!(inspected["origin"]["kind"], "registry");
    assert_eq!(inspected["origin"]["repository"], "test/shared");
    assert_eq!(inspected["layers"].as_array().expect("layers").len(), 2);
    assert_eq!(inspected["config"]["env"], serde_json::json!(["PATH=/bin"]));
    assert!(inspected["platform"]
        .as_str()
        .expect("platform")
        .starts_with("linux/"));
    let text = ok(&images.run(&["inspect", &two.derived]));
    assert!(text.contains("layer"), "{text}");

    // A run and a live session use the derived image; rmi takes its name,
    // and neither rmi nor prune frees its root while they do.
    let runtime = images.sandbox.files();
    let _daemon = StopsDaemon {
        images: &images,
        runtime: runtime.path(),
    };
    let env = [("XDG_RUNTIME_DIR", runtime.path())];
    let session = ok(&images.run_live(&["create", "--name", "user", &two.derived], &env));
    assert!(!session.trim().is_empty());
    let run = Running::start(
        &images,
        &two.derived,
        "echo ready; read line; cat /etc/derived",
    );
    // The daemon shares the sandbox's TMPDIR, so nothing is checked for
    // leftovers until it is stopped.
    let live = |args: &[&str]| ok(&images.run_live(args, &env));
    let in_use = |pruned: &serde_json::Value| pruned["in_use"].as_array().expect("in_use").len();
    let roots_before = images.roots();
    let removed = live(&["rmi", &two.derived]);
    assert!(removed.contains("(a VM uses it)"), "{removed}");
    let pruned = json(&live(&["prune", "--json"]));
    assert_eq!(in_use(&pruned), 1, "{pruned}");
    assert_eq!(images.roots(), roots_before, "a root in use was freed");
    // The run's guest still reads its root.
    assert_eq!(run.finish(), "yes\n");
    let pruned = json(&live(&["prune", "--json"]));
    assert_eq!(in_use(&pruned), 1, "the session's root: {pruned}");
    assert_eq!(
        live(&["exec", "user", "--", "cat", "/etc/derived"]),
        "yes\n"
    );
    live(&["stop", "user"]);
    live(&["daemon", "stop"]);
    images.sandbox.assert_clean();
    let pruned = json(&ok(&images.run(&["prune", "--json"])));
    assert_eq!(in_use(&pruned), 0, "{pruned}");
    let freed_roots = pruned["freed"]
        .as_array()
        .expect("freed")
        .iter()
        .filter(|f| f["kind"] == "root")
        .count();
    assert_eq!(freed_roots, 1, "{pruned}");
    assert_eq!(images.roots().len(), roots_before.len() - 1);
    // The base image and its blobs are untouched.
    assert_eq!(
        ok(&images.run(&["run", "--offline", &two.base, "--", "ls", "/noise"])),
        "/noise\n"
    );

    let message = refused(&images.run(&["rmi", &two.derived]));
    assert!(message.contains("not in the local store"), "{message}");
    let pruned = ok(&images.run(&["prune", "--all"]));
    assert!(pruned.contains("freed image"), "{pruned}");
    assert!(images.roots().is_empty(), "{:?}", images.roots());
    assert!(entries(&images.store.join("blobs/sha256")).is_empty());
    assert_no_temp_files(&images);
    drop(two.registry);
}

/// A pull of `reference` into `images`' store, not waited for.
fn pull(images: &Images, reference: &str) -> Child {
    images
        .sandbox
        .command(&["pull", reference])
        .env("VMETTE_CACHE_DIR", &images.cache_path)
        .spawn()
        .expect("spawn vmette pull")
}

#[test]
fn concurrent_and_killed_pulls_leave_one_whole_copy_and_no_temp_files() {
    let images = Images::new();
    let registry = Registry::start(false);
    let layout = Layout::new();
    // 48 MiB, so a pull takes long enough to kill.
    build_noisy(&layout, "big", 48 << 20);
    let reference = layout.push("big", &registry.host(), "big", false, false);

    // Killed half-way: the layer is partly in a temp file.
    let mut first = pull(&images, &reference);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let partial = entries(&images.store.join("tmp"))
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 1 << 20));
        if partial {
            break;
        }
        assert!(Instant::now() < deadline, "the pull never got going");
        assert!(
            first.try_wait().expect("try_wait").is_none(),
            "the pull ended too soon"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill().expect("kill -9 the pull");
    first.wait().expect("reap the pull");

    // Two pulls at once, after the killed one: both succeed, one copy.
    let pulls = [pull(&images, &reference), pull(&images, &reference)];
    for child in pulls {
        let output = support::wait_with_limit(child, support::RUN_LIMIT);
        assert_eq!(code(&output), 0, "{}", stderr(&output));
    }
    assert_eq!(images.roots().len(), 1, "{:?}", images.roots());
    assert_eq!(entries(&images.store.join("refs")).len(), 1);
    assert_no_temp_files(&images);

    // A pull while a run reads the store, and the run's image is whole.
    let run = Running::start(&images, &reference, "echo ready; read line; wc -c < /noise");
    let output = support::wait_with_limit(pull(&images, &reference), support::RUN_LIMIT);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(run.finish().trim(), (48u32 << 20).to_string());
    images.sandbox.assert_clean();
    assert_no_temp_files(&images);
}

/// A loopback HTTP server of the test's own: `answer` decides what each
/// connection gets.
struct Server {
    port: u16,
}

impl Server {
    fn start(answer: impl Fn(std::net::TcpStream) + Send + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                answer(stream);
            }
        });
        Server { port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }
}

fn serve(mut stream: std::net::TcpStream, body: &[u8]) {
    let mut request = [0u8; 4096];
    let _ = stream.read(&mut request);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

#[test]
fn tarballs_over_http_are_bounded_and_checked() {
    let images = Images::new();
    let tree = tempfile::tempdir().expect("a tree");
    support::busybox_tree(tree.path());
    std::fs::write(tree.path().join("etc/marker"), "over-http\n").expect("marker");
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_dir_all(".", tree.path())
        .expect("tar the tree");
    let tarball = builder.into_inner().expect("a tarball");
    let digest = hex_string(&Sha256::digest(&tarball));
    let served = tarball.clone();
    let server = Server::start(move |stream| serve(stream, &served));
    let url = server.url("root.tar");

    let wrong = "0".repeat(64);
    let message = refused(&images.run(&["run", "--sha256", &wrong, &url, "--", "true"]));
    assert!(message.contains("--sha256"), "{message}");
    let message = refused(&images.run(&["run", "--image-limit", "1M", &url, "--", "true"]));
    assert!(message.contains("over the limit"), "{message}");
    assert!(images.roots().is_empty());

    // Refused before anything is fetched: a newline in the URL, a password
    // in it (never echoed), plain HTTP from another machine unpinned, and
    // --sha256 for what is not a tarball.
    let message = refused(&images.run(&["run", &format!("{url}\nvmette: fake"), "--", "true"]));
    assert!(message.contains("control characters"), "{message}");
    let with_password = url.replace("http://", "http://user:hunter2@");
    let message = refused(&images.run(&["run", &with_password, "--", "true"]));
    assert!(
        message.contains("credentials") && !message.contains("hunter2"),
        "{message}"
    );
    let message = refused(&images.run(&["run", "http://192.0.2.1/root.tar", "--", "true"]));
    assert!(message.contains("--sha256"), "{message}");
    let message = refused(&images.run(&["run", "--sha256", &digest, "debian", "--", "true"]));
    assert!(message.contains("pins only a tarball"), "{message}");
    // A local tarball is checked against --sha256 too.
    let files = images.sandbox.files();
    let local = files.path().join("root.tar");
    std::fs::write(&local, &tarball).expect("a local tarball");
    let local = local.display().to_string();
    let message = refused(&images.run(&["run", "--sha256", &wrong, &local, "--", "true"]));
    assert!(message.contains("--sha256"), "{message}");
    let out = ok(&images.run(&[
        "run",
        "--sha256",
        &digest,
        &local,
        "--",
        "cat",
        "/etc/marker",
    ]));
    assert_eq!(out, "over-http\n");

    let out = ok(&images.run(&["run", "--sha256", &digest, &url, "--", "cat", "/etc/marker"]));
    assert_eq!(out, "over-http\n");
    let roots = roots_with_inodes(&images);
    // Stored: the next run downloads nothing, even with the server gone.
    let out = ok(&images.run(&["run", "--offline", &url, "--", "cat", "/etc/marker"]));
    assert_eq!(out, "over-http\n");
    assert_eq!(roots_with_inodes(&images), roots);

    // A server that takes the connection and never answers.
    let silent = Server::start(|stream| {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(120));
            drop(stream);
        });
    });
    let started = Instant::now();
    let message = refused(&images.run(&["run", &silent.url("root.tar"), "--", "true"]));
    assert!(message.contains("did not answer"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // One that says nothing of the length and sends too much.
    let endless = Server::start(|mut stream| {
        let mut request = [0u8; 4096];
        let _ = stream.read(&mut request);
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let chunk = vec![0u8; 1 << 16];
        while stream.write_all(&chunk).is_ok() {}
    });
    let message = refused(&images.run(&[
        "run",
        "--image-limit",
        "2M",
        &endless.url("root.tar"),
        "--",
        "true",
    ]));
    assert!(message.contains("over the limit"), "{message}");
    let message = refused(&images.run(&[
        "run",
        &server.url("x").replace("http", "https"),
        "--",
        "true",
    ]));
    assert!(message.contains("https://127.0.0.1"), "{message}");
    assert_no_temp_files(&images);
}

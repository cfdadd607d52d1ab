//! Real image tooling for the image tests: Debian's `docker-registry` on a
//! random loopback port (with htpasswd basic auth when asked), images built
//! with `umoci` in an OCI layout and pushed with `skopeo`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A registry process, killed when dropped (and with this test process).
pub struct Registry {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

pub const USER: &str = "tester";
pub const PASSWORD: &str = "correct-horse-battery";

impl Registry {
    /// A registry on a free port; with `auth`, only `USER`/`PASSWORD` get in.
    pub fn start(auth: bool) -> Registry {
        let dir = tempfile::tempdir().expect("a registry directory");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if auth {
            let output = Command::new("htpasswd")
                .args(["-Bbn", USER, PASSWORD])
                .output()
                .expect("htpasswd (apache2-utils) runs");
            assert!(output.status.success(), "htpasswd failed");
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &output.stdout).expect("write htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: vmette-test\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write the registry config");
        let mut command = Command::new("docker-registry");
        command
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches no parent memory.
        #[cfg(target_os = "linux")]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().expect("docker-registry starts");
        let registry = Registry {
            child: Some(child),
            port,
            _dir: dir,
        };
        registry.wait_ready();
        registry
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the registry: later pulls find nothing listening.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut head = [0u8; 12];
                if stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not come up on port {}", self.port);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listens on, for now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").port()
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An OCI image layout that `umoci` builds images in.
pub struct Layout {
    dir: tempfile::TempDir,
}

impl Layout {
    pub fn new() -> Layout {
        let dir = tempfile::tempdir().expect("a layout directory");
        let layout = Layout { dir };
        run("umoci", &["init", "--layout", &layout.oci()]);
        layout
    }

    fn oci(&self) -> String {
        self.dir.path().join("oci").display().to_string()
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.oci())
    }

    /// Builds `tag`: a busybox root that `populate` adds to, one more raw
    /// layer per tar in `layers`, then `umoci config` with `config`.
    pub fn build(
        &self,
        tag: &str,
        populate: impl FnOnce(&Path),
        layers: &[Vec<u8>],
        config: &[&str],
    ) {
        let image = self.image(tag);
        run("umoci", &["new", "--image", &image]);
        let bundle = self.dir.path().join(format!("bundle-{tag}"));
        let bundle_arg = bundle.display().to_string();
        let rootless = if is_root() {
            vec![]
        } else {
            vec!["--rootless"]
        };
        let mut unpack = vec!["unpack"];
        unpack.extend(&rootless);
        unpack.extend(["--image", &image, &bundle_arg]);
        run("umoci", &unpack);
        let rootfs = bundle.join("rootfs");
        super::busybox_tree(&rootfs);
        populate(&rootfs);
        let mut repack = vec!["repack"];
        repack.extend(&rootless);
        repack.extend(["--image", &image, &bundle_arg]);
        run("umoci", &repack);
        for (n, layer) in layers.iter().enumerate() {
            self.add_layer(&image, &format!("{tag}-layer{n}.tar"), layer, &[]);
        }
        let mut args = vec!["config", "--image", &image];
        args.extend(config);
        run("umoci", &args);
    }

    /// Adds `tag`: the image `from` with `layer` on top, sharing every
    /// layer of `from`.
    pub fn derive(&self, from: &str, tag: &str, layer: &[u8]) {
        let file = format!("{tag}-derived.tar");
        self.add_layer(&self.image(from), &file, layer, &["--tag", tag]);
    }

    /// `umoci raw add-layer` of `layer`, written to `file` first, onto
    /// `image`, with `options` (a `--tag` to write a new image).
    fn add_layer(&self, image: &str, file: &str, layer: &[u8], options: &[&str]) {
        let path = self.dir.path().join(file);
        std::fs::write(&path, layer).expect("write a raw layer");
        let path = path.display().to_string();
        let mut args = vec!["raw", "add-layer", "--image", image];
        args.extend(options);
        args.push(&path);
        run("umoci", &args);
    }

    /// Pushes `tag` to `registry` as `test/NAME:TAG`, in Docker's v2s2
    /// format when `v2s2`, with the test credentials when `auth`.
    pub fn push(&self, tag: &str, registry: &str, name: &str, v2s2: bool, auth: bool) -> String {
        let source = format!("oci:{}", self.image(tag));
        let reference = format!("{registry}/test/{name}:{tag}");
        let destination = format!("docker://{reference}");
        let creds = format!("{USER}:{PASSWORD}");
        let mut args = vec!["copy", "--quiet", "--all", "--dest-tls-verify=false"];
        if v2s2 {
            args.extend(["--format", "v2s2"]);
        }
        if auth {
            args.extend(["--dest-creds", &creds]);
        }
        args.extend([source.as_str(), destination.as_str()]);
        run("skopeo", &args);
        reference
    }

    /// Adds `tag`, an image index of the images tagged `entries` (each
    /// with its platform, `arch`), to the layout.
    pub fn index(&self, tag: &str, entries: &[(&str, &str)]) {
        let index_path = self.dir.path().join("oci/index.json");
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index_path).expect("index.json"))
                .expect("index.json is JSON");
        let manifests = index["manifests"].as_array().expect("manifests").clone();
        let mut children = Vec::new();
        for (entry_tag, arch) in entries {
            let mut descriptor = manifests
                .iter()
                .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == *entry_tag)
                .unwrap_or_else(|| panic!("{entry_tag} is in the layout"))
                .clone();
            descriptor["annotations"].take();
            descriptor["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
            children.push(descriptor);
        }
        let blob = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": children,
        }))
        .expect("encode the index");
        use sha2::Digest as _;
        let hex = hex_string(&sha2::Sha256::digest(&blob));
        std::fs::write(self.dir.path().join("oci/blobs/sha256").join(&hex), &blob)
            .expect("write the index blob");
        index["manifests"]
            .as_array_mut()
            .expect("manifests")
            .push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": format!("sha256:{hex}"),
                "size": blob.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }));
        std::fs::write(&index_path, serde_json::to_vec(&index).expect("encode"))
            .expect("write index.json");
    }
}

pub fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A tar layer of `entries`: (path, contents) for files, a path ending in
/// `/` for a directory.
pub fn tar_layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        if path.ends_with('/') {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder
                .append_data(&mut header, path, std::io::empty())
                .expect("append a directory");
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            builder
                .append_data(&mut header, path, *data)
                .expect("append a file");
        }
    }
    builder.into_inner().expect("finish the layer")
}

/// A private cache for a test: the shared kernel, initramfs and default
/// image (linked), and a store of its own.
pub fn private_cache() -> (tempfile::TempDir, PathBuf) {
    let cache = vmette::assets::Cache::locate().expect("the user's vmette cache");
    let shared = cache.root();
    let dir = tempfile::Builder::new()
        .prefix("vmette-cache-")
        .tempdir()
        .expect("a cache directory");
    for sub in ["kernel", "initramfs", "images"] {
        let target = shared.join(sub);
        std::fs::create_dir_all(&target).expect("the shared cache directory");
        std::os::unix::fs::symlink(&target, dir.path().join(sub)).expect("link the cache");
    }
    let store = dir.path().join("store");
    (dir, store)
}

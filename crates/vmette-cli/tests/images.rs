//! OCI images end to end, with real parts: Debian's `docker-registry` on a
//! loopback port, images built with `umoci` and pushed with `skopeo`, and
//! real microVMs running them. No test contacts an address off loopback.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use support::registry::{self, Layout, Registry};
use support::store::{ok, refused, Images, StopsDaemon};

fn docker_config(dir: &Path, registry: &str, password: &str) {
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{password}", registry::USER));
    let json = format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#);
    std::fs::write(dir.join("config.json"), json).expect("write config.json");
}

#[test]
fn an_image_runs_with_its_layers_and_config_applied() {
    let images = Images::new();
    let registry = Registry::start(false);
    let layout = Layout::new();
    let upper = registry::tar_layer(&[
        ("etc/", b""),
        ("etc/.wh.gone", b""),
        ("data/", b""),
        ("data/.wh..wh..opq", b""),
        ("data/new", b"new"),
    ]);
    layout.build(
        "full",
        |root| {
            std::fs::write(root.join("etc/marker"), "marker-full\n").expect("marker");
            std::fs::write(root.join("etc/gone"), "deleted above\n").expect("gone");
            std::fs::create_dir_all(root.join("data")).expect("data");
            std::fs::write(root.join("data/old"), "hidden above\n").expect("old");
            std::fs::write(root.join("etc/hl-a"), "linked\n").expect("hl-a");
            std::fs::hard_link(root.join("etc/hl-a"), root.join("etc/hl-b")).expect("hl-b");
            std::fs::copy(root.join("bin/busybox"), root.join("bin/suid")).expect("suid");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                root.join("bin/suid"),
                std::fs::Permissions::from_mode(0o4755),
            )
            .expect("chmod");
            std::fs::create_dir_all(root.join("home")).expect("home");
            std::fs::write(root.join("home/owned"), "x").expect("owned");
            std::os::unix::fs::chown(root.join("home/owned"), Some(1234), Some(1234))
                .expect("chown (the tests run as root)");
        },
        &[upper],
        &[
            "--config.env=PATH=/bin",
            "--config.env=FOO=bar",
            "--config.workingdir=/work",
            "--config.user=1234:1234",
        ],
    );
    let reference = layout.push("full", &registry.host(), "full", false, false);

    let script = "cat /etc/marker; test -e /etc/gone && echo gone-still-there; ls /data; \
        stat -c %h /etc/hl-a; [ \"$(stat -c %i /etc/hl-a)\" = \"$(stat -c %i /etc/hl-b)\" ] && echo same-inode; \
        stat -c %a /bin/suid; stat -c %u:%g /home/owned; echo FOO=$FOO; pwd; id -u; id -g";
    let output = images.run(&["run", &reference, "--", "sh", "-c", script]);
    assert_eq!(
        ok(&output),
        "marker-full\nnew\n2\nsame-inode\n4755\n1234:1234\nFOO=bar\n/work\n1234\n1234\n"
    );
    let output = images.run(&[
        "run",
        "--user",
        "0",
        "--workdir",
        "/tmp",
        "--env",
        "FOO=override",
        &reference,
        "--",
        "sh",
        "-c",
        "echo $FOO; pwd; id -u",
    ]);
    assert_eq!(ok(&output), "override\n/tmp\n0\n");

    // A daemon session takes the image's config as every exec's defaults.
    let runtime = tempfile::tempdir().expect("a runtime directory");
    let env = [("XDG_RUNTIME_DIR", runtime.path())];
    let _daemon = StopsDaemon {
        images: &images,
        runtime: runtime.path(),
    };
    ok(&images.run_live(&["create", "--name", "img", &reference], &env));
    let output = images.run_live(
        &["exec", "img", "--", "sh", "-c", "echo $FOO; pwd; id -u"],
        &env,
    );
    assert_eq!(ok(&output), "bar\n/work\n1234\n");
    let output = images.run_live(
        &[
            "exec",
            "--user",
            "0:0",
            "img",
            "--",
            "sh",
            "-c",
            "id -u; id -g",
        ],
        &env,
    );
    assert_eq!(ok(&output), "0\n0\n");
    ok(&images.run_with(&["daemon", "stop"], &env));
}

#[test]
fn entrypoint_and_cmd_over_basic_auth_in_dockers_format() {
    let images = Images::new();
    let registry = Registry::start(true);
    let layout = Layout::new();
    layout.build(
        "entry",
        |root| std::fs::write(root.join("etc/marker"), "marker-entry\n").expect("marker"),
        &[],
        &[
            "--config.env=PATH=/bin",
            "--config.entrypoint=echo",
            "--config.entrypoint=entry",
            "--config.cmd=cmd-arg",
        ],
    );
    let reference = layout.push("entry", &registry.host(), "entry", true, true);

    let credentials = tempfile::tempdir().expect("a DOCKER_CONFIG");
    let wrong = "wrong-password-42";
    docker_config(credentials.path(), &registry.host(), wrong);
    let config = [("DOCKER_CONFIG", credentials.path())];
    let message = refused(&images.run_with(&["pull", &reference], &config));
    assert!(message.contains("authentication"), "{message}");
    assert!(message.contains(&reference), "{message}");
    assert!(
        !message.contains(wrong),
        "the password was echoed: {message}"
    );
    let message = refused(&images.run(&["pull", &reference]));
    assert!(message.contains("authentication"), "{message}");

    docker_config(credentials.path(), &registry.host(), registry::PASSWORD);
    assert_eq!(
        ok(&images.run_with(&["run", &reference], &config)),
        "entry cmd-arg\n"
    );
    assert_eq!(
        ok(&images.run_with(&["run", &reference, "--", "a", "b"], &config)),
        "entry a b\n"
    );
    let output = images.run_with(
        &[
            "run",
            "--entrypoint",
            "/bin/cat",
            &reference,
            "--",
            "/etc/marker",
        ],
        &config,
    );
    assert_eq!(ok(&output), "marker-entry\n");
}

#[test]
fn a_multi_arch_index_runs_the_hosts_image() {
    let images = Images::new();
    let registry = Registry::start(false);
    let layout = Layout::new();
    for (tag, arch) in [("amd", "amd64"), ("arm", "arm64")] {
        layout.build(
            tag,
            |root| std::fs::write(root.join("etc/marker"), format!("{arch}\n")).expect("marker"),
            &[],
            &[&format!("--architecture={arch}")],
        );
    }
    layout.index("multi", &[("arm", "arm64"), ("amd", "amd64")]);
    let reference = layout.push("multi", &registry.host(), "multi", false, false);
    let output = images.run(&["run", &reference, "--", "cat", "/etc/marker"]);
    assert_eq!(ok(&output), "amd64\n");
}

#[test]
fn a_stored_image_runs_again_without_its_registry() {
    let images = Images::new();
    let mut registry = Registry::start(false);
    let layout = Layout::new();
    layout.build(
        "solo",
        |root| std::fs::write(root.join("etc/marker"), "solo\n").expect("marker"),
        &[],
        &["--config.env=PATH=/bin"],
    );
    let reference = layout.push("solo", &registry.host(), "solo", false, false);
    let absent = format!("{}/test/absent:v1", registry.host());
    assert_eq!(
        ok(&images.run(&["run", &reference, "--", "cat", "/etc/marker"])),
        "solo\n"
    );
    let roots = images.roots();
    assert_eq!(roots.len(), 1, "{roots:?}");

    registry.stop();
    assert_eq!(
        ok(&images.run(&["run", &reference, "--", "cat", "/etc/marker"])),
        "solo\n"
    );
    let output = images.run(&["run", "--offline", &reference, "--", "cat", "/etc/marker"]);
    assert_eq!(ok(&output), "solo\n");
    assert_eq!(images.roots(), roots, "a second run packed again");
    let message = refused(&images.run(&["run", "--offline", &absent, "--", "true"]));
    assert!(message.contains("not in the local store"), "{message}");
    assert!(message.contains(&absent), "{message}");
}

#[test]
fn bad_references_fail_with_one_sentence_naming_them() {
    let images = Images::new();
    let registry = Registry::start(false);
    let message = refused(&images.run(&["run", ":::bad", "--", "true"]));
    assert!(message.contains(":::bad"), "{message}");

    let unknown = format!("{}/test/nothing:here", registry.host());
    let message = refused(&images.run(&["run", &unknown, "--", "true"]));
    assert!(
        message.contains("not found") && message.contains(&unknown),
        "{message}"
    );

    let closed = format!("127.0.0.1:{}/test/img:v1", registry::free_port());
    let message = refused(&images.run(&["run", &closed, "--", "true"]));
    assert!(
        message.contains("cannot reach") && message.contains(&closed),
        "{message}"
    );

    // Accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("address").port();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept() {
            open.push(stream);
            if open.len() > 8 {
                break;
            }
        }
    });
    let mute = format!("127.0.0.1:{port}/test/img:v1");
    let started = Instant::now();
    let message = refused(&images.run(&["pull", &mute]));
    let took = started.elapsed();
    assert!(
        message.contains("no answer") && message.contains(&mute),
        "{message}"
    );
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(30),
        "gave up after {took:?}"
    );
    drop(held);
}

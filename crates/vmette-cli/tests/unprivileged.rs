//! vmette needs no root to run (issue 3, point 9). When the suite runs as
//! root, this test creates an ordinary user, gives it an installed copy of
//! vmette, and as that user runs `vmette setup --presets python` (kernel,
//! default image and a preset into the user's own cache) and then VMs,
//! including a read-write share served by virtiofsd in a user namespace.
//! When the suite already runs as an ordinary user, it runs the same VMs
//! directly.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

const USER: &str = "vmette-e2e";

fn sh(command: &mut Command) {
    let status = command.status().expect("run a set-up command");
    assert!(status.success(), "{command:?} failed");
}

fn ensure_user() -> u32 {
    let exists = Command::new("id")
        .args(["-u", USER])
        .output()
        .expect("id")
        .status
        .success();
    if !exists {
        sh(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", USER]));
    }
    let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    if !subuid.lines().any(|l| l.starts_with(&format!("{USER}:"))) {
        sh(Command::new("usermod").args([
            "--add-subuids",
            "400000-465535",
            "--add-subgids",
            "400000-465535",
            USER,
        ]));
    }
    let output = Command::new("id").args(["-u", USER]).output().expect("id");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("uid")
}

#[test]
fn an_ordinary_user_runs_vms_and_shares() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 || !cfg!(target_os = "linux") {
        run_as_current_user();
        return;
    }
    let uid = ensure_user();
    let base = tempfile::Builder::new()
        .prefix("vmette-user-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let root = base.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // An installed layout: bin/vmette finds ../lib/vmette/vmette-guest.
    let prefix = root.join("prefix");
    std::fs::create_dir_all(prefix.join("bin")).expect("mkdir");
    std::fs::create_dir_all(prefix.join("lib/vmette")).expect("mkdir");
    std::fs::copy(support::vmette_bin(), prefix.join("bin/vmette")).expect("copy vmette");
    let agent = vmette::assets::guest_agent::locate().expect("guest agent");
    std::fs::copy(agent, prefix.join("lib/vmette/vmette-guest")).expect("copy agent");

    let tmp = root.join("tmp");
    let share = root.join("share");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    std::fs::create_dir_all(&share).expect("mkdir");
    sh(Command::new("chown").args(["-R", USER]).arg(root));

    let as_user = |args: &[&str]| {
        let mut command = Command::new("runuser");
        command
            .args([
                "-u",
                USER,
                "--",
                "env",
                "-i",
                "PATH=/usr/local/bin:/usr/bin:/bin",
            ])
            .arg(format!("HOME={}", root.display()))
            .arg(format!("XDG_CACHE_HOME={}", root.join("cache").display()))
            .arg(format!("TMPDIR={}", tmp.display()))
            .arg(prefix.join("bin/vmette"))
            .args(args);
        let output = command.output().expect("runuser");
        assert!(
            support::processes_referring_to(&tmp).is_empty(),
            "processes left behind"
        );
        output
    };

    // The user's own set-up: the kernel fetched with apt-get download, the
    // default image built by mmdebstrap in unshare mode and packed in a
    // user namespace. Then a VM from it.
    // A preset too: mmdebstrap's tarball packed by tar2sqfs into the
    // user's store, owners intact.
    let output = as_user(&["setup", "--presets", "python"]);
    assert_eq!(support::code(&output), 0, "{}", support::stderr(&output));
    let output = as_user(&[
        "run",
        "--offline",
        "python",
        "--",
        "sh",
        "-c",
        "python3 -c 'print(6*7)'; stat -c %u:%g:%a /usr/bin/su",
    ]);
    assert_eq!(support::code(&output), 0, "{}", support::stderr(&output));
    assert_eq!(support::stdout(&output), "42\n0:0:4755\n");
    // The network stack as an ordinary user: no root, no tap, no bridge.
    // The guest reaches only a port of the host's loopback, so nothing
    // leaves this machine.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut stream, _)) = listener.accept() {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nfrom the host\n");
        }
    });
    let fetch = format!(
        "import urllib.request; print(urllib.request.urlopen('http://10.0.2.2:{port}/', timeout=20).read().decode(), end='')"
    );
    let output = as_user(&[
        "run",
        "--offline",
        "--allow-host-port",
        &port.to_string(),
        "python",
        "--",
        "python3",
        "-c",
        &fetch,
    ]);
    assert_eq!(support::code(&output), 0, "{}", support::stderr(&output));
    assert_eq!(support::stdout(&output), "from the host\n");
    server.join().expect("the host's server");

    let output = as_user(&["run", "--", "sh", "-c", "stat -c %u:%g:%a /usr/bin/su"]);
    assert_eq!(support::code(&output), 0, "{}", support::stderr(&output));
    assert_eq!(
        support::stdout(&output),
        "0:0:4755\n",
        "ownership and modes inside the user-built image"
    );

    let share_arg = format!("{}:/out:rw", share.display());
    let output = as_user(&[
        "run",
        "--share",
        &share_arg,
        "--",
        "sh",
        "-c",
        "id -u; echo hi > /out/made",
    ]);
    assert_eq!(support::code(&output), 0, "{}", support::stderr(&output));
    assert_eq!(support::stdout(&output), "0\n");
    let made = share.join("made");
    assert_eq!(std::fs::read_to_string(&made).expect("made"), "hi\n");
    assert_eq!(
        std::fs::metadata(&made).expect("metadata").uid(),
        uid,
        "the guest's root must map to the user on the host"
    );
    // An image converted by the user: owners, set-id bits, hard links and
    // xattrs of the tarball survive in the root, with no root on the host.
    let tarball = root.join("root.tar");
    write_tarball(&tarball);
    let word = tarball.display().to_string();
    let output = as_user(&[
        "run",
        &word,
        "--",
        "/bin/sh",
        "-c",
        "stat -c %u:%g:%a /bin/suid /home/owned; stat -c %h /etc/hl-b",
    ]);
    assert_eq!(support::code(&output), 0, "{}", support::stderr(&output));
    assert_eq!(support::stdout(&output), "0:0:4755\n1234:1234:640\n2\n");
    let tarball_name = format!("file://{}", tarball.display());
    let output = as_user(&["inspect", &word, "--json"]);
    assert_eq!(support::code(&output), 0, "{}", support::stderr(&output));
    let inspected: serde_json::Value =
        serde_json::from_str(&support::stdout(&output)).expect("inspect --json");
    assert_eq!(inspected["stored_as"], tarball_name.as_str());
    let roots = [std::path::PathBuf::from(
        inspected["root"].as_str().expect("the root's path"),
    )];
    let xattrs = Command::new("rdsquashfs")
        .arg("-x")
        .arg("home/owned")
        .arg(&roots[0])
        .output()
        .expect("rdsquashfs");
    assert!(
        String::from_utf8_lossy(&xattrs.stdout).contains("user.origin"),
        "xattrs: {}",
        String::from_utf8_lossy(&xattrs.stdout)
    );

    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("tmp")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "run dirs left behind: {left:?}");
    assert!(Path::new(&made).exists());
}

/// A root tarball a user could not unpack without root: a set-uid file,
/// a file of another owner with an xattr, and a hard link.
fn write_tarball(path: &Path) {
    let tree = tempfile::tempdir().expect("a tree");
    support::busybox_tree(tree.path());
    let mut builder = tar::Builder::new(std::fs::File::create(path).expect("create the tarball"));
    builder
        .append_dir_all(".", tree.path())
        .expect("add the busybox tree");
    let busybox = std::fs::read(tree.path().join("bin/busybox")).expect("busybox");
    let file = |builder: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8], mode, uid| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(uid);
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, name, data)
            .expect("add a file");
    };
    file(&mut builder, "bin/suid", &busybox, 0o4755, 0);
    file(&mut builder, "etc/hl-a", b"linked\n", 0o644, 0);
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Link);
    link.set_size(0);
    builder
        .append_link(&mut link, "etc/hl-b", "etc/hl-a")
        .expect("add a hard link");
    let record = b"30 SCHILY.xattr.user.origin=t\n";
    let mut pax = tar::Header::new_ustar();
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_path("././@PaxHeader").expect("pax path");
    pax.set_size(record.len() as u64);
    pax.set_cksum();
    builder.append(&pax, &record[..]).expect("add the xattr");
    std::fs::create_dir_all(tree.path().join("home")).expect("home");
    file(&mut builder, "home/owned", b"x", 0o640, 1234);
    builder.finish().expect("finish the tarball");
}

fn run_as_current_user() {
    let sandbox = support::Sandbox::new();
    let output = sandbox.run(&["run", "--", "true"]);
    assert_eq!(support::code(&output), 0, "{}", support::stderr(&output));
    let files = sandbox.files();
    let share = format!("{}:/out:rw", files.path().display());
    let output = sandbox.run(&[
        "run",
        "--share",
        &share,
        "--",
        "sh",
        "-c",
        "echo hi > /out/made",
    ]);
    assert_eq!(support::code(&output), 0, "{}", support::stderr(&output));
    assert!(files.path().join("made").exists());
}

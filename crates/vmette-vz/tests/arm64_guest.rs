//! The guest half of the vz engine, on a real arm64 VM under QEMU: Debian's
//! arm64 cloud kernel, an initramfs built with this engine's module list
//! ([`vmette_vz::plan::GUEST_MODULES`]), the arm64 guest agent, and the
//! control channel on virtio-socket at [`vmette_vz::plan::CONTROL_PORT`]
//! told to the guest on the kernel command line exactly as the engine does.
//! The socket is served by `vhost-device-vsock`, whose host side speaks the
//! `CONNECT <port>` handshake; past the handshake the stream is the one a
//! Mac's `VZVirtioSocketConnection` carries.
//!
//! What this cannot cover is the framework itself; that needs a Mac.
//!
//! It needs `qemu-system-aarch64`, `vhost-device-vsock`, the arm64 kernel
//! tree (`VMETTE_ARM64_KERNEL_TREE`) and the arm64 agent
//! (`VMETTE_ARM64_AGENT`); `scripts/test.sh` provides them and runs it with
//! `--ignored`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmette_core::assets::{initramfs, kernel, Cache};
use vmette_core::process::{spawn_helper, Watchdog};
use vmette_proto::{read_frame, write_frame, GuestMessage, HostMessage, PROTOCOL_VERSION};
use vmette_vz::plan::{CONTROL_PORT, GUEST_MODULES};

fn required_path(var: &str) -> PathBuf {
    let path = PathBuf::from(
        std::env::var_os(var)
            .unwrap_or_else(|| panic!("{var} must be set (scripts/test.sh sets it)")),
    );
    assert!(path.exists(), "{var}={} does not exist", path.display());
    path
}

fn wait_for(path: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects through vhost-device-vsock's unix socket to the guest's port,
/// retrying while the guest is still booting.
fn connect(uds: &Path, port: u32, limit: Duration) -> UnixStream {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(mut stream) = UnixStream::connect(uds) {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            if stream
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .is_ok()
            {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                    return stream;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the guest never accepted on port {port}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs qemu-system-aarch64, vhost-device-vsock and the arm64 kernel; scripts/test.sh runs it"]
fn the_arm64_guest_serves_the_control_channel_over_virtio_socket() {
    let tree = required_path("VMETTE_ARM64_KERNEL_TREE");
    let agent = required_path("VMETTE_ARM64_AGENT");
    let work = tempfile::tempdir().expect("tempdir");
    let cache = Cache::at(work.path().join("cache"));
    let kernel = kernel::from_tree(&tree).expect("arm64 kernel tree");
    let initramfs = initramfs::ensure(&cache, &kernel, &agent, GUEST_MODULES)
        .expect("an initramfs with the vz engine's modules");

    let run = work.path().join("run");
    std::fs::create_dir(&run).expect("run dir");
    let watchdog = Watchdog::spawn(&run).expect("watchdog");
    let device_socket = run.join("vsock.sock");
    let host_socket = run.join("vm.vsock");
    let mut vsock = Command::new("vhost-device-vsock");
    vsock
        .args(["--guest-cid", "3"])
        .arg("--socket")
        .arg(&device_socket)
        .arg("--uds-path")
        .arg(&host_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let _vsock =
        spawn_helper("vhost-device-vsock", &mut vsock, &watchdog).expect("vhost-device-vsock");
    wait_for(&device_socket, Duration::from_secs(10));

    let cmdline =
        format!("console=ttyAMA0 quiet panic=-1 rdinit=/init vmette.control=vsock:{CONTROL_PORT}");
    let mut qemu = Command::new("qemu-system-aarch64");
    qemu.args([
        "-M",
        "virt",
        "-cpu",
        "cortex-a72",
        "-accel",
        "tcg",
        "-smp",
        "1",
        "-m",
        "512M",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
    ])
    .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
    .args(["-machine", "memory-backend=mem"])
    .arg("-kernel")
    .arg(&kernel.image)
    .arg("-initrd")
    .arg(&initramfs)
    .args(["-append", &cmdline])
    .arg("-serial")
    .arg(format!("file:{}", run.join("console.log").display()))
    .arg("-chardev")
    .arg(format!("socket,id=vsock,path={}", device_socket.display()))
    .args(["-device", "vhost-user-vsock-pci,chardev=vsock"])
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let mut vm = spawn_helper("qemu", &mut qemu, &watchdog).expect("qemu-system-aarch64");

    wait_for(&host_socket, Duration::from_secs(10));
    let mut stream = connect(&host_socket, CONTROL_PORT, Duration::from_secs(120));
    let hello: GuestMessage = read_frame(&mut stream)
        .expect("a frame")
        .expect("not the end of the stream");
    let console = std::fs::read_to_string(run.join("console.log")).unwrap_or_default();
    match hello {
        GuestMessage::Hello { version, .. } => assert_eq!(version, PROTOCOL_VERSION),
        other => panic!("expected Hello, got {other:?}\n{console}"),
    }
    write_frame(&mut stream, &HostMessage::PowerOff).expect("power off");
    assert!(
        vm.wait_timeout(Duration::from_secs(60)),
        "the guest did not power off:\n{console}"
    );
}

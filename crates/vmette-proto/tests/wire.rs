//! Freezes the encoding of the protocol's current version. Every message kind is encoded
//! as a frame and compared with `wire-vN.txt` (N the version); a change to any message's
//! shape shows up here as a diff to review, not as a guest that silently
//! misreads its host. Where the change is intended, bump
//! `PROTOCOL_VERSION` or append compatibly, then re-bless with
//! `VMETTE_BLESS=1 cargo test -p vmette-proto --test wire`.

use std::fmt::Write as _;

use vmette_proto::{
    write_frame, BootEnvelope, DirEntry, ExecRequest, ExitStatus, FileError, FileErrorKind,
    FileKind, FileOp, FileReply, FileRequest, FileStat, GuestMessage, GuestNetwork, HostMessage,
    OutputStream, OverlayUpper, PtySize, RootSource, ShareMount, PROTOCOL_VERSION,
};

fn samples() -> Vec<(&'static str, Vec<u8>)> {
    fn frame<T: serde::Serialize>(message: &T) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, message).expect("encode");
        out
    }
    vec![
        (
            "host boot",
            frame(&HostMessage::Boot(BootEnvelope {
                root: RootSource::Block {
                    serial: "vmette-root".into(),
                    fstype: "erofs".into(),
                },
                overlay: OverlayUpper::Disk {
                    serial: "vmette-scratch".into(),
                },
                shares: vec![ShareMount {
                    tag: "vmette-share0".into(),
                    guest_path: "/data".into(),
                    read_only: true,
                }],
                disks: vec!["vmette-disk0".into()],
                hostname: "vmette".into(),
                network: None,
            })),
        ),
        (
            "host boot virtiofs",
            frame(&HostMessage::Boot(BootEnvelope {
                root: RootSource::VirtioFs {
                    tag: "vmette-root".into(),
                    writable: true,
                },
                overlay: OverlayUpper::Tmpfs,
                shares: vec![],
                disks: vec![],
                hostname: "vmette".into(),
                network: Some(GuestNetwork {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                    address: [10, 0, 2, 15].into(),
                    prefix_len: 24,
                    gateway: [10, 0, 2, 2].into(),
                    nameserver: [10, 0, 2, 2].into(),
                    mtu: 65520,
                }),
            })),
        ),
        (
            "host exec",
            frame(&HostMessage::Exec(ExecRequest {
                id: 1,
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b".into())],
                workdir: Some("/tmp".into()),
                stdin: true,
                pty: None,
                user: Some("1000:1000".into()),
            })),
        ),
        (
            "host exec pty",
            frame(&HostMessage::Exec(ExecRequest {
                id: 2,
                argv: vec!["bash".into()],
                env: vec![],
                workdir: None,
                stdin: true,
                pty: Some(PtySize { rows: 24, cols: 80 }),
                user: None,
            })),
        ),
        (
            "host stdin",
            frame(&HostMessage::Stdin {
                id: 1,
                data: b"abc".to_vec(),
            }),
        ),
        ("host stdin eof", frame(&HostMessage::StdinEof { id: 1 })),
        (
            "host signal",
            frame(&HostMessage::Signal { id: 1, signal: 2 }),
        ),
        ("host power off", frame(&HostMessage::PowerOff)),
        (
            "host output credit",
            frame(&HostMessage::OutputCredit {
                id: 1,
                stream: OutputStream::Stderr,
                bytes: 65536,
            }),
        ),
        (
            "host file write",
            frame(&HostMessage::File(FileRequest {
                id: 3,
                op: FileOp::Write {
                    path: "/tmp/f".into(),
                    mode: 0o644,
                    parents: true,
                    limit: 1 << 30,
                },
            })),
        ),
        (
            "host file tar out",
            frame(&HostMessage::File(FileRequest {
                id: 4,
                op: FileOp::TarOut {
                    path: "/srv".into(),
                    limit: 1 << 20,
                },
            })),
        ),
        (
            "host resize",
            frame(&HostMessage::Resize {
                id: 2,
                size: PtySize {
                    rows: 50,
                    cols: 132,
                },
            }),
        ),
        (
            "guest hello",
            frame(&GuestMessage::Hello {
                version: PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
            }),
        ),
        ("guest ready", frame(&GuestMessage::Ready)),
        (
            "guest boot failed",
            frame(&GuestMessage::BootFailed {
                message: "no disk".into(),
            }),
        ),
        (
            "guest stdout",
            frame(&GuestMessage::Stdout {
                id: 1,
                data: b"out".to_vec(),
            }),
        ),
        (
            "guest stderr",
            frame(&GuestMessage::Stderr {
                id: 1,
                data: b"err".to_vec(),
            }),
        ),
        (
            "guest stdin ack",
            frame(&GuestMessage::StdinAck { id: 1, bytes: 3 }),
        ),
        (
            "guest exited",
            frame(&GuestMessage::Exited {
                id: 1,
                status: ExitStatus::Code(7),
            }),
        ),
        (
            "guest signaled",
            frame(&GuestMessage::Exited {
                id: 1,
                status: ExitStatus::Signal(9),
            }),
        ),
        (
            "guest exec failed",
            frame(&GuestMessage::ExecFailed {
                id: 1,
                message: "x: command not found".into(),
                code: 127,
            }),
        ),
        (
            "guest file done",
            frame(&GuestMessage::FileDone {
                id: 3,
                result: Ok(FileReply::Done { bytes: 5 }),
            }),
        ),
        (
            "guest file listing",
            frame(&GuestMessage::FileDone {
                id: 4,
                result: Ok(FileReply::Entries {
                    entries: vec![DirEntry {
                        name: "a".into(),
                        stat: FileStat {
                            kind: FileKind::Symlink,
                            size: 3,
                            mode: 0o777,
                            modified: 1_700_000_000,
                        },
                    }],
                    truncated: false,
                }),
            }),
        ),
        (
            "guest file error",
            frame(&GuestMessage::FileDone {
                id: 5,
                result: Err(FileError {
                    kind: FileErrorKind::NotFound,
                    message: "/x: not found".into(),
                }),
            }),
        ),
    ]
}

#[test]
fn the_v1_encoding_is_frozen() {
    let mut text = String::new();
    for (name, bytes) in samples() {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(text, "{name}: {hex}").expect("format");
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/wire-v2.txt");
    if std::env::var_os("VMETTE_BLESS").is_some() {
        std::fs::write(path, &text).expect("bless");
    }
    let frozen = std::fs::read_to_string(path).expect("tests/wire-v2.txt");
    assert_eq!(
        frozen, text,
        "the wire encoding changed; see this file's header"
    );
}

//! The vmette host library: run a command in a throwaway Linux microVM.
//!
//! A [`Config`] says what to run and with what (root image, shares, disks,
//! limits). A [`Runner`] prepares the boot files, asks an [`Engine`] to
//! start a machine, speaks the [`vmette_proto`] protocol with the guest
//! agent over the machine's control channel, and returns a [`RunOutput`].
//!
//! This crate names no hypervisor. Engines (`vmette-qemu`, `vmette-vz`)
//! implement [`Engine`]; the `vmette` facade crate picks the platform's
//! engine and offers `vmette::run(&config)`.
//!
//! Every resource a run creates — helper processes, sockets, the run
//! directory, scratch disks — has one owner that releases it on drop, and a
//! forked [`process::Watchdog`] releases them if the whole process dies.

#![warn(missing_docs)]

pub mod boot;
mod config;
mod control;
pub mod engine;
mod error;
mod files;
mod image;
pub mod network;
pub mod process;
mod run;
mod session;
pub mod tree;

pub use config::{
    Accel, Config, Disk, Rootfs, Share, Stdin, DEFAULT_CAPTURE_LIMIT, DEFAULT_MEMORY_MIB,
    DEFAULT_TRANSFER_LIMIT, MAX_MEMORY_MIB, MAX_PORTS, MAX_VCPUS, MIN_MEMORY_MIB, MIN_SCRATCH_MIB,
};
pub use engine::{Check, Engine, EngineError, Vm, VmSpec};
pub use error::Error;
pub use image::{
    ExecDefaults, ImageConfig, ImageLease, ImageProvider, ResolvedImage, ResolvedRoot,
};
pub use network::{
    AllowedCidr, AllowedHost, Allowlist, BadRule, DenialCounts, Egress, HostPattern, Nat, Network,
    NetworkAttachment, NetworkError, NetworkProvider, PortMapping, PublishedPort, MAX_RULES,
};
pub use run::{PublishedReport, RunOutput, RunStatus, Runner};
pub use session::{
    EndReason, Exec, ExecEvent, ExecOutput, ExecSpec, ExecStatus, ExecStdin, Session, StopHandle,
    BOOT_TIMEOUT, STOP_GRACE,
};
pub use vmette_assets as assets;
pub use vmette_proto::PROTOCOL_VERSION;
pub use vmette_proto::{
    DirEntry, FileErrorKind, FileKind, FileStat, OutputStream, PtySize, MAX_CHUNK_LEN,
    MAX_LIST_ENTRIES, MAX_PTY_SIDE,
};

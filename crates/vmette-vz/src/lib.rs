//! vmette's macOS engine, on Apple's Virtualization.framework through
//! `objc2-virtualization`.
//!
//! The engine is in two parts, so that most of it is tested on any host:
//!
//! * [`plan`] translates the host library's [`vmette_core::VmSpec`] into a
//!   [`plan::DevicePlan`] — boot loader, CPUs, memory, virtio-blk disks,
//!   virtio-fs shares, console, entropy, balloon, the virtio-socket control
//!   channel — and checks it against the framework's limits. Pure logic,
//!   compiled and unit-tested everywhere.
//! * `macos` (only on macOS) turns a plan into framework objects, runs the
//!   VM on its own serial dispatch queue as the framework requires, and
//!   connects to the guest agent over virtio-socket. On Linux CI it is
//!   type-checked with `cargo check --target aarch64-apple-darwin`.
//!
//! The guest agent and protocol are the same as under QEMU; only the control
//! transport differs (virtio-socket instead of virtio-serial), which the
//! engine tells the guest on the kernel command line.

#![warn(missing_docs)]

pub mod plan;

#[cfg(target_os = "macos")]
mod macos;

#[cfg(target_os = "macos")]
pub use macos::VzEngine;

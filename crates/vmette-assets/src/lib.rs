//! The files a vmette microVM boots from, and the cache that keeps them.
//!
//! * the **kernel**: Debian's cloud kernel, fetched by package name with
//!   `apt-get download` and unpacked into the cache ([`kernel`]);
//! * the **initramfs**: built here from the static guest agent and the
//!   kernel modules it needs, dependencies resolved from each module's own
//!   `.modinfo`, and cached under the hash of everything that went in
//!   ([`initramfs`]);
//! * the **default root image**: a Debian minbase tree built with
//!   `mmdebstrap` and packed into a read-only erofs image ([`image`]).
//!
//! Everything lives under one [`Cache`] directory. Nothing here starts a VM
//! or knows which engine will; the host library asks for paths and hands
//! them to the engine.

#![warn(missing_docs)]

mod cache;
mod command;
mod error;
pub mod guest_agent;
pub mod host_tool;
pub mod image;
pub mod initramfs;
pub mod inventory;
pub mod kernel;
mod modinfo;
mod progress;

pub use cache::Cache;
pub use error::AssetError;
pub use progress::{Progress, Silent};

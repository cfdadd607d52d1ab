//! Run a command in a throwaway Linux microVM, with its own kernel and no
//! access to the host beyond what you share.
//!
//! This crate is the front door: it re-exports the host library
//! ([`vmette_core`]) and picks the platform's engine, so that
//!
//! ```no_run
//! let mut config = vmette::Config::new(["uname", "-r"]);
//! config.timeout = Some(std::time::Duration::from_secs(30));
//! let output = vmette::run(&config)?;
//! print!("{}", String::from_utf8_lossy(&output.stdout));
//! assert_eq!(output.exit_code(), 0);
//! # Ok::<(), vmette::Error>(())
//! ```
//!
//! boots a microVM, runs `uname -r` in it, and returns the captured output.
//! On Linux the engine is QEMU (`vmette-qemu`).
//!
//! For output as it happens, use [`run_streaming`]; for progress reports and
//! interrupt forwarding, build a [`Runner`] on [`default_engine`].

#![warn(missing_docs)]

pub use vmette_core::*;

/// The engine for this platform.
#[cfg(target_os = "linux")]
pub fn default_engine() -> vmette_qemu::QemuEngine {
    vmette_qemu::QemuEngine::new()
}

/// Runs `config` in a fresh microVM and captures stdout and stderr
/// separately, each up to `config.capture_limit` bytes.
pub fn run(config: &Config) -> Result<RunOutput, Error> {
    Runner::new(&default_engine()).run(config)
}

/// Runs `config`, handing output to `sink` as it is produced.
pub fn run_streaming(
    config: &Config,
    sink: &mut dyn FnMut(OutputStream, &[u8]),
) -> Result<RunOutput, Error> {
    Runner::new(&default_engine()).run_streaming(config, sink)
}

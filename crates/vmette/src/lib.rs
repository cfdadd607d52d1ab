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
//! On Linux the engine is QEMU (`vmette-qemu`), on macOS
//! Virtualization.framework (`vmette-vz`); `VMETTE_ENGINE` picks another
//! engine built into the binary.
//!
//! For output as it happens, use [`run_streaming`]; for progress reports and
//! interrupt forwarding, build a [`Runner`] on [`default_engine`].
//!
//! A [`Rootfs::Named`] root (`python:3.12-slim`, `debian`, `./root.tar`)
//! is resolved by [`images`] (`vmette-images`: presets, the local store,
//! registries) before the boot; [`run`], [`run_streaming`] and
//! [`start_session`] do that with the user's store and default settings.

#![warn(missing_docs)]

pub use vmette_core::*;
pub use vmette_images as images;
pub use vmette_net as net;

/// Environment variable that picks the engine by name (`qemu`, `vz`).
pub const ENGINE_ENV: &str = "VMETTE_ENGINE";

/// Names of the engines built into this binary, the platform's default first.
pub fn engine_names() -> &'static [&'static str] {
    #[cfg(target_os = "linux")]
    return &["qemu"];
    #[cfg(target_os = "macos")]
    return &["vz"];
}

/// The engine called `name`.
pub fn engine_named(name: &str) -> Result<Box<dyn Engine>, Error> {
    match name {
        #[cfg(target_os = "linux")]
        "qemu" => Ok(Box::new(vmette_qemu::QemuEngine::new())),
        #[cfg(target_os = "macos")]
        "vz" => Ok(Box::new(vmette_vz::VzEngine::new())),
        _ => Err(Error::InvalidConfig {
            field: "engine",
            reason: format!(
                "{name:?} is not an engine of this build (available: {})",
                engine_names().join(", ")
            ),
        }),
    }
}

/// The engine [`ENGINE_ENV`] names, or the platform's default.
pub fn default_engine() -> Result<Box<dyn Engine>, Error> {
    match std::env::var(ENGINE_ENV) {
        Ok(name) if !name.is_empty() => engine_named(&name),
        _ => engine_named(engine_names()[0]),
    }
}

/// vmette's user-mode network stack (`vmette-net`), which attaches the
/// guests whose [`Config::network`] asks for a network.
pub fn default_network() -> &'static dyn NetworkProvider {
    &vmette_net::UserNetwork
}

/// Runs `config` in a fresh microVM and captures stdout and stderr
/// separately, each up to `config.capture_limit` bytes.
pub fn run(config: &Config) -> Result<RunOutput, Error> {
    Runner::new(&*default_engine()?)
        .network(default_network())
        .run(&resolve(config)?)
}

/// `config` with its image resolved by the user's store, as
/// [`Config::resolve_image`] does.
pub fn resolve(config: &Config) -> Result<Config, Error> {
    let images = images::Images::locate().map_err(|e| Error::Image(Box::new(e)))?;
    config.resolve_image(&images, &assets::Silent)
}

/// Boots a VM for `config` on the default engine and returns the session
/// once its agent is ready; run commands in it with [`Session::exec`].
///
/// ```no_run
/// let session = vmette::start_session(&vmette::Config::default_machine())?;
/// let output = session.exec(&vmette::ExecSpec::new(["uname", "-r"]))?.output(1 << 20);
/// assert_eq!(output.status, vmette::ExecStatus::Exited(0));
/// session.stop();
/// # Ok::<(), vmette::Error>(())
/// ```
pub fn start_session(config: &Config) -> Result<Session, Error> {
    Session::start_with(
        &*default_engine()?,
        Some(default_network()),
        &resolve(config)?,
        &assets::Silent,
    )
}

/// Runs `config`, handing output to `sink` as it is produced.
pub fn run_streaming(
    config: &Config,
    sink: &mut dyn FnMut(OutputStream, &[u8]),
) -> Result<RunOutput, Error> {
    Runner::new(&*default_engine()?)
        .network(default_network())
        .run_streaming(&resolve(config)?, sink)
}

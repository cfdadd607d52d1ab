//! `vmette-guest`, the agent that runs as PID 1 inside every vmette microVM.
//!
//! It is built as a static binary and placed at `/init` in the initramfs
//! that vmette builds, next to the kernel modules it needs. It knows nothing
//! of the host beyond the control channel: everything it is told arrives as
//! a [`vmette_proto::HostMessage`], validated before use.
//!
//! Start-up runs in numbered phases; a failure in any of them is printed on
//! the console with its phase and the VM powers off, so the host sees the
//! reason in the console log.
//!
//! 1. mount `/dev`, `/proc`, `/sys` in the initramfs;
//! 2. load the kernel modules listed in `/vmette/modules`, in order;
//! 3. open the control channel and say hello;
//! 4. receive the boot envelope and assemble the root (read-only lower
//!    layer, overlay upper on tmpfs or the scratch disk, shares), then
//!    switch into it and configure the network device, if the host gave
//!    the guest one;
//! 5. serve exec requests and file operations until the host asks to
//!    power off.

mod channel;
mod credit;
mod exec;
mod files;
mod modules;
mod network;
mod root;
mod user;

use std::process::ExitCode;

use vmette_proto::{GuestMessage, HostMessage, PROTOCOL_VERSION};

fn main() -> ExitCode {
    if std::process::id() != 1 {
        eprintln!("vmette-guest: this is the init of a vmette microVM and must run as PID 1");
        return ExitCode::from(2);
    }
    if let Err(message) = boot_and_serve() {
        eprintln!("vmette-guest: {message}");
    }
    root::power_off()
}

/// Builds the root and the network the envelope describes.
fn assemble(envelope: &vmette_proto::BootEnvelope) -> Result<(), String> {
    if envelope.network.is_some() {
        modules::load_network().map_err(|e| format!("could not load the network driver: {e}"))?;
    }
    root::assemble(envelope)
        .map_err(|e| format!("could not assemble the root file system: {e}"))?;
    if let Some(network) = &envelope.network {
        let writable_root = matches!(
            envelope.root,
            vmette_proto::RootSource::VirtioFs { writable: true, .. }
        );
        network::configure(network, writable_root)
            .map_err(|e| format!("could not configure the network: {e}"))?;
    }
    Ok(())
}

fn boot_and_serve() -> Result<(), String> {
    root::mount_early().map_err(|e| format!("phase 1 (early mounts): {e}"))?;
    modules::load_listed().map_err(|e| format!("phase 2 (kernel modules): {e}"))?;
    let channel =
        channel::Channel::open().map_err(|e| format!("phase 3 (control channel): {e}"))?;
    let outbox = channel.outbox();
    let mut inbox = channel.inbox();
    outbox.send(GuestMessage::Hello {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    });

    let envelope = loop {
        match inbox
            .next()
            .map_err(|e| format!("phase 4 (boot envelope): {e}"))?
        {
            HostMessage::Boot(envelope) => break envelope,
            HostMessage::PowerOff => return Ok(()),
            other => eprintln!("vmette-guest: ignoring {other:?} before boot"),
        }
    };
    if let Err(message) = assemble(&envelope) {
        outbox.send(GuestMessage::BootFailed {
            message: message.clone(),
        });
        outbox.flush();
        return Err(format!("phase 4 (root): {message}"));
    }
    outbox.send(GuestMessage::Ready);

    let execs = exec::Execs::new(outbox.clone());
    let files = files::Files::new(outbox.clone());
    loop {
        match inbox
            .next()
            .map_err(|e| format!("phase 5 (serving): {e}"))?
        {
            HostMessage::Exec(request) => execs.start(request),
            HostMessage::File(request) => files.start(request),
            // Data messages name an exec or a file operation.
            HostMessage::Stdin { id, data } => {
                if let Err(data) = files.input(id, data) {
                    execs.stdin(id, data);
                }
            }
            HostMessage::StdinEof { id } => {
                if !files.input_end(id) {
                    execs.stdin_eof(id);
                }
            }
            HostMessage::Signal { id, signal } => {
                if !files.cancel(id) {
                    execs.signal(id, signal);
                }
            }
            HostMessage::OutputCredit { id, stream, bytes } => {
                if !files.credit(id, bytes) {
                    execs.credit(id, stream, bytes);
                }
            }
            HostMessage::Resize { id, size } => execs.resize(id, size),
            // power_off() flushes the file systems first.
            HostMessage::PowerOff => return Ok(()),
            HostMessage::Boot(_) => eprintln!("vmette-guest: ignoring a second boot envelope"),
        }
    }
}

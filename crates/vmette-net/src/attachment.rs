//! One VM's attachment to the stack: the socket pair of frames, the loop's
//! thread, and the ports published on the host.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket;
use vmette_core::network::{FrameSocket, NicSpec};
use vmette_core::{DenialCounts, Nat, NetworkAttachment, NetworkError, PortMapping, PublishedPort};
use vmette_proto::GuestNetwork;

use crate::addressing::{guest_network, GATEWAY, GUEST_MAC, MTU};
use crate::denials::Denials;
use crate::dns::{Bindings, Dns};
use crate::frames::Frames;
use crate::lock;
use crate::policy::Policy;
use crate::resolver::ResolverConfig;
use crate::stack::{Command, Handle, Stack};

/// How long an unpublish waits for the loop to close the port.
const UNPUBLISH_PATIENCE: Duration = Duration::from_secs(5);

/// Why a network could not be attached or a port published.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The host's resolver configuration cannot be used.
    #[error(transparent)]
    Resolver(#[from] crate::resolver::ResolverError),
    /// A host port could not be listened on.
    #[error("cannot publish {mapping}: {reason}")]
    Publish {
        /// What was asked.
        mapping: PortMapping,
        /// Why not, with what to do.
        reason: String,
    },
    /// A socket or thread could not be made.
    #[error("cannot start the network stack: {0}")]
    Io(#[from] std::io::Error),
}

/// A VM's place in the stack; dropping it stops the loop and closes every
/// socket of the VM's network.
pub struct Attachment {
    engine_end: FrameSocket,
    handle: Handle,
    published: Mutex<Vec<PublishedPort>>,
    denials: Arc<Denials>,
    thread: Option<JoinHandle<()>>,
}

impl Attachment {
    /// Starts the stack for a VM with `nat`'s settings.
    pub fn start(nat: &Nat) -> Result<Attachment, AttachError> {
        let resolver = match nat.dns {
            Some(server) => ResolverConfig::upstream(vec![server]),
            None => ResolverConfig::host()?,
        };
        let policy = Policy {
            gateway: GATEWAY,
            egress: nat.egress.clone(),
            host_ports: nat.host_ports.clone(),
        };
        // Bound first: a port in use fails the attach before anything runs.
        let listeners = nat
            .publish
            .iter()
            .map(|mapping| listen(*mapping).map(|listener| (listener, *mapping)))
            .collect::<Result<Vec<_>, _>>()?;

        let (stack_end, engine_end) = frame_pair()?;
        let bindings = Arc::new(Mutex::new(Bindings::default()));
        let denials = Arc::new(Denials::default());
        let dns = Dns::new(
            resolver,
            policy.clone(),
            Arc::clone(&bindings),
            Arc::clone(&denials),
        );
        let (stack, handle) = Stack::new(
            Frames::new(stack_end, MTU),
            policy,
            dns,
            bindings,
            Arc::clone(&denials),
        )?;
        let mut published = Vec::new();
        for (listener, mapping) in listeners {
            published.push(PublishedPort {
                host: listener.local_addr()?,
                guest_port: mapping.guest_port,
            });
            send(
                &handle,
                Command::Publish {
                    listener,
                    guest_port: mapping.guest_port,
                },
            );
        }
        let thread = std::thread::Builder::new()
            .name("vmette-net".into())
            .spawn(move || stack.run())?;
        Ok(Attachment {
            engine_end: FrameSocket(Arc::new(engine_end)),
            handle,
            published: Mutex::new(published),
            denials,
            thread: Some(thread),
        })
    }
}

fn send(handle: &Handle, command: Command) {
    // The loop ends only when the attachment drops.
    let _ = handle.commands.send(command);
    handle.waker.wake();
}

/// A listener for `mapping`, with the sentence a user acts on when the
/// port is taken or not theirs.
fn listen(mapping: PortMapping) -> Result<TcpListener, AttachError> {
    let address = SocketAddr::new(mapping.host_ip, mapping.host_port);
    let listener = TcpListener::bind(address).map_err(|e| AttachError::Publish {
        mapping,
        reason: match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the host port is in use; pick another one, or 0 for any free port".into()
            }
            std::io::ErrorKind::PermissionDenied => {
                "ports below 1024 need privileges; pick a port of 1024 or above, or 0".into()
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "the host has no such address; use 127.0.0.1 or one of its own".into()
            }
            _ => e.to_string(),
        },
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A connected pair of datagram sockets: the stack's end non-blocking,
/// the engine's as the hypervisor expects it.
fn frame_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (stack_end, engine_end) = UnixDatagram::pair()?;
    stack_end.set_nonblocking(true)?;
    // Room for a few large frames each way (the kernel caps what it
    // grants); Virtualization.framework asks for a receive buffer of at
    // least twice the send buffer.
    for end in [&stack_end, &engine_end] {
        let _ = socket::setsockopt(end, socket::sockopt::SndBuf, &(1 << 20));
        let _ = socket::setsockopt(end, socket::sockopt::RcvBuf, &(4 << 20));
    }
    Ok((stack_end.into(), engine_end.into()))
}

impl NetworkAttachment for Attachment {
    fn nic(&self) -> NicSpec {
        NicSpec {
            frames: self.engine_end.clone(),
            mac: GUEST_MAC,
            mtu: MTU,
        }
    }

    fn guest(&self) -> GuestNetwork {
        guest_network()
    }

    fn publish(&self, mapping: PortMapping) -> Result<PublishedPort, NetworkError> {
        let mut published = lock(&self.published);
        if published.len() >= vmette_core::MAX_PORTS {
            return Err(format!(
                "cannot publish {mapping}: {} ports are published, the most one VM may",
                vmette_core::MAX_PORTS
            )
            .into());
        }
        if mapping.guest_port == 0 {
            return Err(
                format!("cannot publish {mapping}: the guest port must be 1 to 65535").into(),
            );
        }
        let listener = listen(mapping)?;
        let port = PublishedPort {
            host: listener.local_addr()?,
            guest_port: mapping.guest_port,
        };
        send(
            &self.handle,
            Command::Publish {
                listener,
                guest_port: mapping.guest_port,
            },
        );
        published.push(port);
        Ok(port)
    }

    fn unpublish(&self, host: SocketAddr) -> bool {
        let mut published = lock(&self.published);
        let (done, answer) = mpsc::channel();
        send(&self.handle, Command::Unpublish { host, done });
        let found = answer.recv_timeout(UNPUBLISH_PATIENCE).unwrap_or(false);
        published.retain(|p| p.host != host);
        found
    }

    fn published(&self) -> Vec<PublishedPort> {
        lock(&self.published).clone()
    }

    fn denials(&self) -> DenialCounts {
        self.denials.snapshot()
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.handle.stop.store(true, Ordering::Release);
        self.handle.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// vmette's user-mode network stack, as the core's [`vmette_core::NetworkProvider`].
#[derive(Debug, Clone, Copy, Default)]
pub struct UserNetwork;

impl vmette_core::NetworkProvider for UserNetwork {
    fn attach(&self, nat: &Nat) -> Result<Arc<dyn NetworkAttachment>, NetworkError> {
        Ok(Arc::new(Attachment::start(nat)?))
    }
}

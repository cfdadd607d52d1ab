//! The guest's network, as a [`crate::Config`] asks for it, and the seam
//! to the stack that provides it.
//!
//! A guest has no network device unless [`Config::network`] asks for one.
//! Then a [`NetworkProvider`] (vmette's user-mode stack, `vmette-net`)
//! attaches a [`NetworkAttachment`] before the VM starts: a socket of raw
//! Ethernet frames for the engine's NIC, the static configuration the
//! guest agent applies, and the ports published on the host. Every packet
//! the guest sends ends in that stack, which decides on the host where it
//! may go; the core never learns how.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vmette_proto::GuestNetwork;

use crate::Config;

/// Whether and how the guest is networked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// No network device: the guest has only `lo`.
    #[default]
    None,
    /// A network device behind the host's user-mode stack, which
    /// translates the guest's connections into its own.
    Nat(Nat),
}

/// What a NAT network lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Nat {
    /// Let the guest open connections to anything outside the ranges the
    /// stack always denies (loopback, private, link-local, multicast,
    /// reserved). `false` keeps every outbound flow closed, for a guest
    /// that only serves published ports.
    pub outbound: bool,
    /// Ports of the host's loopback the guest may reach, at its gateway's
    /// address.
    pub host_ports: Vec<u16>,
    /// Guest TCP ports published on the host from the start.
    pub publish: Vec<PortMapping>,
    /// The DNS server the stack asks for the guest; the host's own
    /// resolver configuration (`/etc/hosts`, then the nameservers of
    /// `/etc/resolv.conf`) when `None`.
    pub dns: Option<SocketAddr>,
}

/// A guest TCP port published on a host address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    /// The host address to listen on; 127.0.0.1 unless asked otherwise.
    pub host_ip: IpAddr,
    /// The host port; 0 picks a free one.
    pub host_port: u16,
    /// The guest port connections go to.
    pub guest_port: u16,
}

impl PortMapping {
    /// `guest_port` published on 127.0.0.1:`host_port`.
    pub fn loopback(host_port: u16, guest_port: u16) -> PortMapping {
        PortMapping {
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host_port,
            guest_port,
        }
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> guest port {}",
            SocketAddr::new(self.host_ip, self.host_port),
            self.guest_port
        )
    }
}

/// A port the stack is listening on for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublishedPort {
    /// The host address and port it listens on (the port chosen, when 0
    /// was asked).
    pub host: SocketAddr,
    /// The guest port connections go to.
    pub guest_port: u16,
}

/// The engine's end of a frame socket: a connected `SOCK_DGRAM` socket on
/// which each datagram is one Ethernet frame. Shared, since the
/// [`crate::VmSpec`] that carries it is plain data; equal when it is the
/// same socket.
#[derive(Debug, Clone)]
pub struct FrameSocket(pub Arc<OwnedFd>);

impl PartialEq for FrameSocket {
    fn eq(&self, other: &FrameSocket) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for FrameSocket {}

/// The network device an engine gives the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// The frames of the device, to and from the stack.
    pub frames: FrameSocket,
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// The largest frame payload the stack handles.
    pub mtu: u16,
}

/// Why a network could not be attached or a port published: one sentence
/// that names the setting.
pub type NetworkError = Box<dyn std::error::Error + Send + Sync>;

/// A network stack that can serve VMs.
pub trait NetworkProvider: Send + Sync {
    /// Starts serving one VM: binds the ports `nat` publishes (so a port
    /// in use fails here, before a VM starts) and returns the attachment,
    /// which stops serving when dropped.
    fn attach(&self, nat: &Nat) -> Result<Arc<dyn NetworkAttachment>, NetworkError>;
}

/// One VM's place in a network stack.
pub trait NetworkAttachment: Send + Sync {
    /// The device to give the machine.
    fn nic(&self) -> NicSpec;

    /// What the guest agent configures.
    fn guest(&self) -> GuestNetwork;

    /// Publishes a guest port on the host, listening before this returns.
    fn publish(&self, mapping: PortMapping) -> Result<PublishedPort, NetworkError>;

    /// Stops listening on `host`, closing the connections it accepted;
    /// `false` when nothing was published there.
    fn unpublish(&self, host: SocketAddr) -> bool;

    /// The ports published now.
    fn published(&self) -> Vec<PublishedPort>;
}

impl Config {
    /// The NAT settings, when the config asks for a network.
    pub fn nat(&self) -> Option<&Nat> {
        match &self.network {
            Network::None => None,
            Network::Nat(nat) => Some(nat),
        }
    }
}

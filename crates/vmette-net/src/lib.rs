//! The user-mode network stack between a vmette VM and the host, and the
//! rules it enforces on every flow. The guest's Ethernet frames come to
//! this stack alone, over a datagram socket pair (QEMU's `-netdev dgram`,
//! Virtualization.framework's file-handle attachment); it answers ARP,
//! pings to the gateway and DNS itself, and opens each connection the
//! guest makes as a socket of its own on the host, so what the guest may
//! reach is decided here, on the host, whatever the guest does. No root,
//! no bridge, no tap device: the VM's network is a thread of the process
//! that runs it.
//!
//! * [`UserNetwork`]: the core's [`vmette_core::NetworkProvider`]; each
//!   attach starts one [`Attachment`], a loop on its own thread
//!   (smoltcp terminates the guest's TCP; UDP is translated directly);
//! * [`Policy::decide`]: the one function every flow passes before the
//!   stack opens anything;
//! * [`Cidr`] and [`denied`]: the address ranges the stack never reaches
//!   for a guest (loopback, private, link-local and cloud metadata,
//!   multicast, reserved, and the IPv6 forms that carry IPv4 addresses),
//!   whatever a name resolves to;
//! * [`resolver`] and [`dns`]: how names are resolved for the guest (the
//!   host's `/etc/hosts` and nameservers, or an upstream the user names),
//!   with the answers remembered as address-to-name bindings.

#![warn(missing_docs)]

mod addressing;
mod attachment;
mod cidr;
mod denials;
pub mod dns;
mod frames;
mod inspect;
mod policy;
pub mod resolver;
mod stack;
mod throttle;
mod wire;

pub use addressing::{guest_network, GATEWAY, GUEST, MTU};
pub use attachment::{AttachError, Attachment, UserNetwork};
pub use cidr::{denied, BadCidr, Cidr, DeniedRange, DENIED};
pub use denials::{Denials, Reason};
pub use policy::{Denial, Policy, Protocol, Transport, Verdict};
pub use stack::{TCP_FLOWS_LIMIT, UDP_FLOWS_LIMIT};

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// `mutex` locked; a holder that panicked left the data whole, since
/// every change under these locks is one push or one insert.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A UDP socket on the wildcard address of `target`'s family, connected
/// to `target` (which sends nothing, and lets only `target` answer).
fn connected_udp(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let wildcard: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(wildcard)?;
    socket.connect(target)?;
    Ok(socket)
}

//! The user-mode network stack between a vmette VM and the host, and the
//! rules it enforces on every flow. The guest's Ethernet frames come to
//! this stack alone; it answers DNS itself and opens each connection on
//! the host, so what the guest may reach is decided here, on the host,
//! whatever the guest does.
//!
//! This crate grows in steps (issue 13). Landed so far:
//!
//! * [`Cidr`] and [`denied`]: the address ranges the stack never reaches
//!   for a guest (loopback, private, link-local and cloud metadata,
//!   multicast, reserved, and the IPv6 forms that carry IPv4 addresses),
//!   whatever a name resolves to;
//! * [`resolver`]: how the host's own programs resolve names
//!   (`/etc/hosts`, then the nameservers of `/etc/resolv.conf`), read with
//!   bounds, for the stack's DNS answers.
//!
//! Next: the frame interface (a datagram socket pair to QEMU's
//! `-netdev dgram` and Virtualization.framework's file-handle
//! attachment), the smoltcp interface behind it, DNS on port 53 of every
//! address, and outbound NAT through one decision function.

#![warn(missing_docs)]

mod cidr;
pub mod resolver;

pub use cidr::{denied, BadCidr, Cidr, DeniedRange, DENIED};

//! The addresses of the guest's small network: the guest, and a gateway
//! that is the stack itself. They are the same for every VM, as QEMU's
//! user networking does, since no two guests share a link.

use std::net::Ipv4Addr;

use vmette_proto::GuestNetwork;

/// The guest's address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The gateway's address: the stack, which answers DNS there (and on
/// every other address) and reaches the host's opened ports.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The subnet's prefix length.
pub const PREFIX_LEN: u8 = 24;
/// The guest's MAC address (locally administered).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x6d, 0x0f];
/// The gateway's MAC address.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x6d, 0x02];
/// The link's MTU. Large frames mean fewer of them: under emulation each
/// frame costs the guest an interrupt and a trip through its stack.
pub const MTU: u16 = vmette_proto::MAX_MTU;

/// What the guest agent configures.
pub fn guest_network() -> GuestNetwork {
    GuestNetwork {
        mac: GUEST_MAC,
        address: GUEST,
        prefix_len: PREFIX_LEN,
        gateway: GATEWAY,
        nameserver: GATEWAY,
        mtu: MTU,
    }
}

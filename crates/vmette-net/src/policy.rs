//! The one place that decides where a guest's flow may go. Every TCP
//! connection and UDP flow the guest opens, and every DNS query, passes
//! through [`Policy::decide`] before the stack opens anything on the host.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::cidr::{denied, DeniedRange};

/// The transport of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        })
    }
}

/// What becomes of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The stack answers it itself: DNS, on port 53 of any address.
    Dns,
    /// The stack opens this host address for it.
    Connect(SocketAddr),
    /// Refused, for this reason.
    Deny(Denial),
}

/// Why a flow was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The network publishes ports only; the guest opens nothing.
    NoOutbound,
    /// The destination is in a range the stack never reaches.
    Range(&'static DeniedRange),
    /// A port of the host's loopback that was not opened to the guest.
    HostPort(u16),
    /// One of the host's own addresses, whose services are not the
    /// guest's to reach.
    HostAddress,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::NoOutbound => f.write_str("the network only publishes ports"),
            Denial::Range(range) => write!(f, "{} is {}", range.cidr, range.what),
            Denial::HostPort(port) => write!(
                f,
                "port {port} of the host was not opened to the guest (--allow-host-port)"
            ),
            Denial::HostAddress => f.write_str("it is an address of the host itself"),
        }
    }
}

/// The rules of one VM's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The gateway's address: the host itself, for the ports opened on it.
    pub gateway: Ipv4Addr,
    /// Whether the guest may open flows to the outside at all.
    pub outbound: bool,
    /// Ports of the host's loopback the guest reaches at the gateway.
    pub host_ports: Vec<u16>,
}

impl Policy {
    /// Where a flow the guest opens to `destination` may go.
    pub fn decide(&self, transport: Transport, destination: SocketAddrV4) -> Verdict {
        if destination.port() == 53 {
            return Verdict::Dns;
        }
        let ip = *destination.ip();
        if ip == self.gateway {
            return match transport {
                Transport::Tcp if self.host_ports.contains(&destination.port()) => {
                    Verdict::Connect(SocketAddr::from((Ipv4Addr::LOCALHOST, destination.port())))
                }
                _ => Verdict::Deny(Denial::HostPort(destination.port())),
            };
        }
        if !self.outbound {
            return Verdict::Deny(Denial::NoOutbound);
        }
        if let Some(range) = denied(ip.into()) {
            return Verdict::Deny(Denial::Range(range));
        }
        if is_host_address(ip) {
            return Verdict::Deny(Denial::HostAddress);
        }
        Verdict::Connect(destination.into())
    }

    /// Whether an address a DNS answer names may be handed to the guest:
    /// one in the denied ranges is a rebinding attempt, refused whatever
    /// the name.
    pub fn answerable(&self, ip: Ipv4Addr) -> bool {
        denied(ip.into()).is_none()
    }
}

/// Whether `ip` is one of the host's own addresses, on any interface: a
/// connection there reaches the host's services (everything bound to
/// 0.0.0.0), from the host itself, past any firewall for incoming traffic.
/// The kernel says: a UDP connect sends nothing, and the source address
/// it picks for a local destination is that destination.
pub fn is_host_address(ip: Ipv4Addr) -> bool {
    crate::connected_udp((ip, 9).into())
        .and_then(|probe| probe.local_addr())
        .is_ok_and(|local| local.ip() == std::net::IpAddr::V4(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            outbound: true,
            host_ports: vec![8080],
        }
    }

    fn at(ip: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip.into(), port)
    }

    #[test]
    fn dns_goes_to_the_stack_at_any_address() {
        for ip in [[9, 9, 9, 9], [10, 0, 2, 2], [127, 0, 0, 1]] {
            assert_eq!(policy().decide(Transport::Udp, at(ip, 53)), Verdict::Dns);
            assert_eq!(policy().decide(Transport::Tcp, at(ip, 53)), Verdict::Dns);
        }
    }

    #[test]
    fn the_gateway_opens_only_the_allowed_host_ports_over_tcp() {
        assert_eq!(
            policy().decide(Transport::Tcp, at([10, 0, 2, 2], 8080)),
            Verdict::Connect("127.0.0.1:8080".parse().expect("address"))
        );
        for (transport, port) in [(Transport::Tcp, 8081), (Transport::Udp, 8080)] {
            assert!(matches!(
                policy().decide(transport, at([10, 0, 2, 2], port)),
                Verdict::Deny(Denial::HostPort(_))
            ));
        }
    }

    #[test]
    fn outbound_flows_avoid_the_denied_ranges() {
        let policy = policy();
        assert_eq!(
            policy.decide(Transport::Tcp, at([198, 18, 0, 1], 80)),
            Verdict::Connect("198.18.0.1:80".parse().expect("address"))
        );
        for ip in [
            [169, 254, 169, 254],
            [10, 0, 0, 1],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
        ] {
            assert!(matches!(
                policy.decide(Transport::Tcp, at(ip, 80)),
                Verdict::Deny(Denial::Range(_))
            ));
        }
        let closed = Policy {
            outbound: false,
            ..policy
        };
        assert_eq!(
            closed.decide(Transport::Tcp, at([198, 18, 0, 1], 80)),
            Verdict::Deny(Denial::NoOutbound)
        );
        assert!(!closed.answerable(Ipv4Addr::LOCALHOST));
        assert!(is_host_address(Ipv4Addr::LOCALHOST));
        assert!(!is_host_address(Ipv4Addr::new(198, 18, 0, 1)));
        assert!(closed.answerable(Ipv4Addr::new(198, 18, 0, 1)));
    }
}

//! The one place that decides where a guest's flow may go. Every TCP
//! connection and UDP flow the guest opens passes through
//! [`Policy::decide`] before the stack opens anything on the host, and
//! every DNS question through [`Policy::resolves`].
//!
//! With an allowlist, a name is reached only through the addresses DNS
//! answers gave the guest for it (the [`Bindings`]), so a raw address
//! opens nothing; on ports 80 and 443 the stack reads which name the
//! connection is for and connects to that name itself, so a guest cannot
//! aim an allowed name's connection at another address.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use vmette_core::Egress;

use crate::cidr::{denied, DeniedRange};
use crate::denials::Reason;
use crate::dns::Bindings;

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
    /// The stack accepts the connection and reads from its first bytes
    /// which name it is for, then connects to that name itself if allowed.
    Inspect(Protocol),
    /// Refused, for this reason.
    Deny(Denial),
}

/// What the stack reads a connection's name from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTPS: the ClientHello's server name.
    Tls,
    /// HTTP: every request's Host.
    Http,
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
    /// No DNS answer bound the address to an allowed name, and no allowed
    /// range covers it.
    NotAllowed,
    /// The address is allowed, but not on this port.
    Port(u16),
    /// UDP other than DNS goes only to allowed address ranges.
    Udp,
}

impl Denial {
    /// The count a refusal of a `transport` flow for this goes to.
    pub fn reason(&self, transport: Transport) -> Reason {
        match (transport, self) {
            (Transport::Udp, _) => Reason::Udp,
            (Transport::Tcp, Denial::HostPort(_) | Denial::Port(_)) => Reason::Port,
            (Transport::Tcp, _) => Reason::Ip,
        }
    }
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
            Denial::NotAllowed => f.write_str(
                "no allowed name resolved to it for the guest, and no allowed range covers it",
            ),
            Denial::Port(port) => write!(f, "the address is allowed, but not port {port}"),
            Denial::Udp => f.write_str("UDP goes only to allowed address ranges (--allow-cidr)"),
        }
    }
}

/// The rules of one VM's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The gateway's address: the host itself, for the ports opened on it.
    pub gateway: Ipv4Addr,
    /// Where the guest's own flows may go.
    pub egress: Egress,
    /// Ports of the host's loopback the guest reaches at the gateway.
    pub host_ports: Vec<u16>,
}

/// The ports whose connections an allowed name opens, after the stack
/// read which name each is for.
const INSPECTED: [(u16, Protocol); 2] = [(80, Protocol::Http), (443, Protocol::Tls)];

impl Policy {
    /// Where a flow the guest opens to `destination` may go; `bindings`
    /// says which names DNS answers gave the guest each address for.
    pub fn decide(
        &self,
        transport: Transport,
        destination: SocketAddrV4,
        bindings: &Bindings,
    ) -> Verdict {
        let (ip, port) = (*destination.ip(), destination.port());
        if port == 53 {
            return Verdict::Dns;
        }
        if ip == self.gateway {
            return match transport {
                Transport::Tcp if self.host_ports.contains(&port) => {
                    Verdict::Connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
                }
                _ => Verdict::Deny(Denial::HostPort(port)),
            };
        }
        let allowlist = match &self.egress {
            Egress::Closed => return Verdict::Deny(Denial::NoOutbound),
            Egress::Open => None,
            Egress::Allowlist(allowlist) => Some(allowlist),
        };
        if let Err(denial) = self.reachable(ip) {
            return Verdict::Deny(denial);
        }
        let Some(allowlist) = allowlist else {
            return Verdict::Connect(destination.into());
        };
        let ranges = || allowlist.cidrs.iter().filter(|rule| rule.contains(ip));
        if ranges().any(|rule| rule.opens(port)) {
            return Verdict::Connect(destination.into());
        }
        if transport == Transport::Udp {
            return Verdict::Deny(Denial::Udp);
        }
        let names = bindings.names(ip);
        let rules = || {
            allowlist
                .hosts
                .iter()
                .filter(|rule| names.iter().any(|name| rule.name.matches(name)))
        };
        if let Some((_, protocol)) = INSPECTED.iter().find(|(p, _)| *p == port) {
            if rules().any(|rule| rule.port.is_none_or(|p| p == port)) {
                return Verdict::Inspect(*protocol);
            }
        } else if rules().any(|rule| rule.port == Some(port)) {
            return Verdict::Connect(destination.into());
        }
        if rules().next().is_some() || ranges().next().is_some() {
            return Verdict::Deny(Denial::Port(port));
        }
        Verdict::Deny(Denial::NotAllowed)
    }

    /// Whether the guest may reach `ip` at all, by the ranges: outside the
    /// denied ones (unless an allowed range names it), and never one of
    /// the host's own addresses or its loopback.
    pub fn reachable(&self, ip: Ipv4Addr) -> Result<(), Denial> {
        if let Some(range) = denied(ip.into()) {
            if ip.is_loopback() || !self.names_range(ip) {
                return Err(Denial::Range(range));
            }
        }
        if is_host_address(ip) {
            return Err(Denial::HostAddress);
        }
        Ok(())
    }

    fn names_range(&self, ip: Ipv4Addr) -> bool {
        match &self.egress {
            Egress::Allowlist(allowlist) => allowlist.cidrs.iter().any(|rule| rule.contains(ip)),
            Egress::Closed | Egress::Open => false,
        }
    }

    /// Whether an address a DNS answer names may be handed to the guest:
    /// one in the denied ranges is a rebinding attempt, refused whatever
    /// the name, unless an allowed range names it.
    pub fn answerable(&self, ip: Ipv4Addr) -> bool {
        denied(ip.into()).is_none() || (!ip.is_loopback() && self.names_range(ip))
    }

    /// Whether the guest's DNS queries for `name` are answered: with an
    /// allowlist, only for the names it allows (on any port).
    pub fn resolves(&self, name: &str) -> bool {
        match &self.egress {
            Egress::Closed => false,
            Egress::Open => true,
            Egress::Allowlist(allowlist) => {
                allowlist.hosts.iter().any(|rule| rule.name.matches(name))
            }
        }
    }

    /// Whether a connection to `port` that names `name` (its server name,
    /// its Host) may go on to that name.
    pub fn admits(&self, name: &str, port: u16) -> bool {
        match &self.egress {
            Egress::Closed => false,
            Egress::Open => true,
            Egress::Allowlist(allowlist) => allowlist
                .hosts
                .iter()
                .any(|rule| rule.name.matches(name) && rule.port.is_none_or(|p| p == port)),
        }
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
    use vmette_core::Allowlist;

    fn policy(egress: Egress) -> Policy {
        Policy {
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            egress,
            host_ports: vec![8080],
        }
    }

    fn open() -> Policy {
        policy(Egress::Open)
    }

    fn allowlist(hosts: &[&str], cidrs: &[&str]) -> Policy {
        policy(Egress::Allowlist(Allowlist {
            hosts: hosts
                .iter()
                .map(|h| h.parse().expect("host rule"))
                .collect(),
            cidrs: cidrs
                .iter()
                .map(|c| c.parse().expect("cidr rule"))
                .collect(),
        }))
    }

    fn at(ip: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip.into(), port)
    }

    fn none() -> Bindings {
        Bindings::default()
    }

    #[test]
    fn dns_goes_to_the_stack_at_any_address() {
        for ip in [[9, 9, 9, 9], [10, 0, 2, 2], [127, 0, 0, 1]] {
            for transport in [Transport::Udp, Transport::Tcp] {
                for policy in [open(), policy(Egress::Closed), allowlist(&[], &[])] {
                    assert_eq!(policy.decide(transport, at(ip, 53), &none()), Verdict::Dns);
                }
            }
        }
    }

    #[test]
    fn the_gateway_opens_only_the_allowed_host_ports_over_tcp() {
        assert_eq!(
            open().decide(Transport::Tcp, at([10, 0, 2, 2], 8080), &none()),
            Verdict::Connect("127.0.0.1:8080".parse().expect("address"))
        );
        for (transport, port) in [(Transport::Tcp, 8081), (Transport::Udp, 8080)] {
            assert!(matches!(
                open().decide(transport, at([10, 0, 2, 2], port), &none()),
                Verdict::Deny(Denial::HostPort(_))
            ));
        }
    }

    #[test]
    fn outbound_flows_avoid_the_denied_ranges() {
        let policy = open();
        assert_eq!(
            policy.decide(Transport::Tcp, at([198, 18, 0, 1], 80), &none()),
            Verdict::Connect("198.18.0.1:80".parse().expect("address"))
        );
        for ip in [
            [169, 254, 169, 254],
            [10, 0, 0, 1],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
        ] {
            assert!(matches!(
                policy.decide(Transport::Tcp, at(ip, 80), &none()),
                Verdict::Deny(Denial::Range(_))
            ));
        }
        let closed = Policy {
            egress: Egress::Closed,
            ..policy
        };
        assert_eq!(
            closed.decide(Transport::Tcp, at([198, 18, 0, 1], 80), &none()),
            Verdict::Deny(Denial::NoOutbound)
        );
        assert!(!closed.answerable(Ipv4Addr::LOCALHOST));
        assert!(is_host_address(Ipv4Addr::LOCALHOST));
        assert!(!is_host_address(Ipv4Addr::new(198, 18, 0, 1)));
        assert!(closed.answerable(Ipv4Addr::new(198, 18, 0, 1)));
        assert!(!closed.resolves("example.com"));
    }

    #[test]
    fn an_allowed_name_opens_only_the_addresses_bound_to_it() {
        let policy = allowlist(&["allowed.test", "*.cdn.test", "git.test:22"], &[]);
        let mut bindings = Bindings::default();
        bindings.bind(Ipv4Addr::new(198, 18, 1, 10), "allowed.test");
        bindings.bind(Ipv4Addr::new(198, 18, 3, 10), "img.cdn.test");
        bindings.bind(Ipv4Addr::new(198, 18, 4, 10), "git.test");
        bindings.bind(Ipv4Addr::new(198, 18, 2, 10), "denied.test");
        let decide = |transport, ip, port| policy.decide(transport, at(ip, port), &bindings);

        assert_eq!(
            decide(Transport::Tcp, [198, 18, 1, 10], 443),
            Verdict::Inspect(Protocol::Tls)
        );
        assert_eq!(
            decide(Transport::Tcp, [198, 18, 3, 10], 80),
            Verdict::Inspect(Protocol::Http)
        );
        assert_eq!(
            decide(Transport::Tcp, [198, 18, 4, 10], 22),
            Verdict::Connect("198.18.4.10:22".parse().expect("address"))
        );
        // A name with a port opens that port only, and a name without one
        // only 80 and 443.
        assert_eq!(
            decide(Transport::Tcp, [198, 18, 4, 10], 443),
            Verdict::Deny(Denial::Port(443))
        );
        assert_eq!(
            decide(Transport::Tcp, [198, 18, 1, 10], 22),
            Verdict::Deny(Denial::Port(22))
        );
        // A raw address, or one bound to a name not allowed, opens nothing.
        for ip in [[198, 18, 2, 10], [198, 18, 9, 9]] {
            for port in [80, 443, 22] {
                assert_eq!(
                    decide(Transport::Tcp, ip, port),
                    Verdict::Deny(Denial::NotAllowed)
                );
            }
        }
        assert_eq!(
            decide(Transport::Udp, [198, 18, 1, 10], 443),
            Verdict::Deny(Denial::Udp)
        );
        assert!(policy.resolves("allowed.test"));
        assert!(policy.resolves("a.cdn.test"));
        assert!(!policy.resolves("cdn.test"));
        assert!(!policy.resolves("denied.test"));
        assert!(policy.admits("allowed.test", 443));
        assert!(!policy.admits("git.test", 443));
        assert!(!policy.admits("denied.test", 80));
    }

    #[test]
    fn an_allowed_range_opens_its_ports_and_may_name_a_denied_one() {
        let policy = allowlist(&[], &["198.18.5.2/32:8080", "10.1.0.0/16", "127.0.0.0/8"]);
        let decide = |transport, ip, port| policy.decide(transport, at(ip, port), &none());
        assert_eq!(
            decide(Transport::Tcp, [198, 18, 5, 2], 8080),
            Verdict::Connect("198.18.5.2:8080".parse().expect("address"))
        );
        assert_eq!(
            decide(Transport::Udp, [198, 18, 5, 2], 8080),
            Verdict::Connect("198.18.5.2:8080".parse().expect("address"))
        );
        assert_eq!(
            decide(Transport::Tcp, [198, 18, 5, 2], 8081),
            Verdict::Deny(Denial::Port(8081))
        );
        assert_eq!(
            decide(Transport::Tcp, [198, 18, 5, 3], 8080),
            Verdict::Deny(Denial::NotAllowed)
        );
        assert_eq!(
            decide(Transport::Udp, [10, 1, 2, 3], 9999),
            Verdict::Connect("10.1.2.3:9999".parse().expect("address"))
        );
        assert!(policy.answerable(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!policy.answerable(Ipv4Addr::new(10, 2, 0, 1)));
        assert!(matches!(
            decide(Transport::Tcp, [10, 2, 0, 1], 80),
            Verdict::Deny(Denial::Range(_))
        ));
        // The host's loopback stays closed, whatever a rule says.
        assert!(!policy.answerable(Ipv4Addr::LOCALHOST));
        assert!(matches!(
            decide(Transport::Tcp, [127, 0, 0, 1], 80),
            Verdict::Deny(Denial::Range(_))
        ));
    }

    #[test]
    fn refusals_count_by_transport_and_kind() {
        assert_eq!(Denial::NotAllowed.reason(Transport::Tcp), Reason::Ip);
        assert_eq!(Denial::Port(22).reason(Transport::Tcp), Reason::Port);
        assert_eq!(Denial::HostPort(22).reason(Transport::Tcp), Reason::Port);
        assert_eq!(Denial::NotAllowed.reason(Transport::Udp), Reason::Udp);
        assert_eq!(Denial::NoOutbound.reason(Transport::Tcp), Reason::Ip);
    }

    /// Hostile: names that only look like an allowed one.
    #[test]
    fn hostile_lookalike_names_are_not_allowed() {
        let policy = allowlist(&["*.example.com", "exact.test", "api.test:443"], &[]);
        for name in [
            "example.com",
            "evil-example.com",
            "evilexample.com",
            "example.com.evil",
            "x.example.com.evil",
            "example.comx",
            ".example.com",
            "x.exact.test",
            "exact.test.evil",
            "xexact.test",
            "exact.tes",
        ] {
            assert!(!policy.resolves(name), "resolves {name}");
            assert!(!policy.admits(name, 443), "admits {name}");
        }
        assert!(policy.admits("a.b.example.com", 80));
        // A name allowed on one port opens no other, on the inspected ports too.
        assert!(policy.admits("api.test", 443));
        assert!(!policy.admits("api.test", 80));
    }

    /// Hostile: an address bound to a name allowed only on 443 is not
    /// inspected on 80, and a name bound to it by another allowed rule
    /// does not lend that port to it.
    #[test]
    fn hostile_ports_of_one_name_do_not_open_for_another() {
        let policy = allowlist(&["api.test:443", "git.test:22"], &[]);
        let mut bindings = Bindings::default();
        bindings.bind(Ipv4Addr::new(198, 18, 7, 1), "api.test");
        bindings.bind(Ipv4Addr::new(198, 18, 7, 2), "git.test");
        let decide = |ip, port| policy.decide(Transport::Tcp, at(ip, port), &bindings);
        assert_eq!(
            decide([198, 18, 7, 1], 443),
            Verdict::Inspect(Protocol::Tls)
        );
        assert_eq!(decide([198, 18, 7, 1], 80), Verdict::Deny(Denial::Port(80)));
        assert_eq!(decide([198, 18, 7, 1], 22), Verdict::Deny(Denial::Port(22)));
        assert_eq!(
            decide([198, 18, 7, 2], 443),
            Verdict::Deny(Denial::Port(443))
        );
        // An allowed name's binding never opens a denied range.
        let mut rebound = Bindings::default();
        rebound.bind(Ipv4Addr::new(169, 254, 169, 254), "api.test");
        rebound.bind(Ipv4Addr::LOCALHOST, "api.test");
        for ip in [[169, 254, 169, 254], [127, 0, 0, 1]] {
            assert!(matches!(
                policy.decide(Transport::Tcp, at(ip, 443), &rebound),
                Verdict::Deny(Denial::Range(_))
            ));
        }
    }
}

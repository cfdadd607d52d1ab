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
use std::str::FromStr;
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
    /// Where the guest's own connections may go.
    pub egress: Egress,
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

/// Where the connections and datagrams the guest opens may go. DNS is
/// always answered by the stack, and never for more than this allows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Egress {
    /// Nowhere: the guest only serves the ports published, and its DNS
    /// queries leave nothing on the host.
    #[default]
    Closed,
    /// Anywhere outside the ranges the stack always denies (loopback,
    /// private, link-local, multicast, reserved).
    Open,
    /// Only where the allowlist says, decided by the names the guest's
    /// connections are for.
    Allowlist(Allowlist),
}

impl Egress {
    /// Whether the guest may open anything at all.
    pub fn is_closed(&self) -> bool {
        matches!(self, Egress::Closed)
    }
}

/// The names and address ranges a guest may reach.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allowlist {
    /// Names, reached through the addresses DNS gave the guest for them.
    pub hosts: Vec<AllowedHost>,
    /// Address ranges, reached directly.
    pub cidrs: Vec<AllowedCidr>,
}

/// Most rules of each kind an allowlist holds.
pub const MAX_RULES: usize = 256;

/// A name the guest may reach: on ports 80 and 443 (where the stack reads
/// which name each connection is for) unless a port is given.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AllowedHost {
    /// The names it covers.
    pub name: HostPattern,
    /// The one TCP port it opens, or `None` for HTTP (80) and HTTPS (443).
    pub port: Option<u16>,
}

/// A DNS name, or with a leading `*.` every name below it (but not the
/// name itself). Lowercase, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    name: String,
    subdomains: bool,
}

impl HostPattern {
    /// Whether `name` (lowercase, without a trailing dot) is covered.
    pub fn matches(&self, name: &str) -> bool {
        if !self.subdomains {
            return name == self.name;
        }
        name.len() > self.name.len() + 1
            && name.ends_with(self.name.as_str())
            && name.as_bytes()[name.len() - self.name.len() - 1] == b'.'
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.subdomains {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

/// An IPv4 range the guest may reach directly: every port, TCP and UDP,
/// unless a port is given (then that TCP or UDP port only). A range the
/// stack otherwise denies (a private network, say) is reachable when a
/// rule names it; the host's own addresses never are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllowedCidr {
    /// The range's first address.
    pub network: Ipv4Addr,
    /// Its prefix length, 0 to 32.
    pub prefix: u8,
    /// The one port it opens, or `None` for all.
    pub port: Option<u16>,
}

impl AllowedCidr {
    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Whether the rule opens `port`.
    pub fn opens(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// The prefix's bits set: a /0 has none.
    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }
}

/// Why a text is not an allow rule: one sentence, with the form expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not {what}: {reason}")]
pub struct BadRule {
    /// What was given, at most 100 characters of it.
    pub text: String,
    /// What it should have been, with an example.
    pub what: &'static str,
    /// What is wrong.
    pub reason: String,
}

const HOST_RULE: &str =
    "a host to allow (NAME[:PORT], as example.com, *.example.com or example.com:8443)";
const CIDR_RULE: &str =
    "an address range to allow (ADDRESS[/PREFIX][:PORT], as 203.0.113.0/24 or 198.51.100.7:8080)";

fn bad_rule(text: &str, what: &'static str, reason: impl Into<String>) -> BadRule {
    BadRule {
        text: text.chars().take(100).collect(),
        what,
        reason: reason.into(),
    }
}

/// Splits a trailing `:PORT` off `text`.
fn split_port<'a>(text: &'a str, what: &'static str) -> Result<(&'a str, Option<u16>), BadRule> {
    let Some((head, port)) = text.rsplit_once(':') else {
        return Ok((text, None));
    };
    match number::<u16>(port) {
        Some(port) if port != 0 => Ok((head, Some(port))),
        _ => Err(bad_rule(
            text,
            what,
            "the port must be a number from 1 to 65535",
        )),
    }
}

/// `text` as a number, when it is only decimal digits (no sign).
fn number<T: FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl FromStr for AllowedHost {
    type Err = BadRule;

    fn from_str(text: &str) -> Result<AllowedHost, BadRule> {
        let (name, port) = split_port(text, HOST_RULE)?;
        let (subdomains, rest) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        let rest = rest.strip_suffix('.').unwrap_or(rest).to_ascii_lowercase();
        if let Err(reason) = check_host_name(&rest) {
            return Err(bad_rule(text, HOST_RULE, reason));
        }
        if rest.parse::<Ipv4Addr>().is_ok() {
            return Err(bad_rule(
                text,
                HOST_RULE,
                "that is an address; allow it with an address range (--allow-cidr)",
            ));
        }
        Ok(AllowedHost {
            name: HostPattern {
                name: rest,
                subdomains,
            },
            port,
        })
    }
}

/// Whether `name` (lowercase) is a DNS host name: dot-separated labels of
/// letters, digits, `-` and `_`, none empty, longer than 63 or starting or
/// ending with `-`, 253 characters at most.
pub fn check_host_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the name is empty");
    }
    if name.len() > 253 {
        return Err("a name is at most 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("a name has no empty labels (nothing between two dots)");
        }
        if label.len() > 63 {
            return Err("a label is at most 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err("a name holds only letters, digits, '-', '_' and dots ('*.' may start it)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label does not start or end with '-'");
        }
    }
    Ok(())
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

impl FromStr for AllowedCidr {
    type Err = BadRule;

    fn from_str(text: &str) -> Result<AllowedCidr, BadRule> {
        let (range, port) = split_port(text, CIDR_RULE)?;
        let (address, prefix) = match range.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (range, None),
        };
        let network: Ipv4Addr = address.parse().map_err(|_| {
            bad_rule(
                text,
                CIDR_RULE,
                format!("{address:?} is not an IPv4 address"),
            )
        })?;
        let prefix = match prefix {
            None => 32,
            Some(prefix) => match number::<u8>(prefix) {
                Some(prefix) if prefix <= 32 => prefix,
                _ => {
                    return Err(bad_rule(
                        text,
                        CIDR_RULE,
                        "the prefix length must be a number from 0 to 32",
                    ))
                }
            },
        };
        let rule = AllowedCidr {
            network,
            prefix,
            port,
        };
        if u32::from(network) & !rule.mask() != 0 {
            return Err(bad_rule(
                text,
                CIDR_RULE,
                format!(
                    "the address has bits set past the prefix; the range starts at {}",
                    Ipv4Addr::from(u32::from(network) & rule.mask())
                ),
            ));
        }
        Ok(rule)
    }
}

impl fmt::Display for AllowedCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// How many of the guest's flows and queries the stack refused, by
/// reason: each connection, UDP flow or DNS query counted once, however
/// many packets it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DenialCounts {
    /// DNS queries for names the allowlist does not name, or refused for
    /// their size.
    pub dns: u64,
    /// Connections to addresses nothing allows (no answer bound them to an
    /// allowed name, no range covers them, or a range the stack denies).
    pub ip: u64,
    /// TLS connections whose ClientHello named no allowed server.
    pub sni: u64,
    /// HTTP requests for a host not allowed, or another host than the
    /// connection's first request.
    pub host: u64,
    /// Connections to an allowed address on a port its rule does not open.
    pub port: u64,
    /// UDP flows other than DNS that no range allows.
    pub udp: u64,
    /// DNS answers refused because they named only addresses the guest
    /// may not reach (rebinding).
    pub rebind: u64,
}

impl DenialCounts {
    /// Every count with its reason's name, in a fixed order.
    pub fn by_reason(&self) -> [(&'static str, u64); 7] {
        [
            ("dns", self.dns),
            ("ip", self.ip),
            ("sni", self.sni),
            ("host", self.host),
            ("port", self.port),
            ("udp", self.udp),
            ("rebind", self.rebind),
        ]
    }

    /// All refusals together.
    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }
}

impl fmt::Display for DenialCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, (reason, count)) in self.by_reason().iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{reason} {count}")?;
        }
        Ok(())
    }
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

    /// What the stack refused the guest so far.
    fn denials(&self) -> DenialCounts;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str) -> AllowedHost {
        text.parse().expect(text)
    }

    fn cidr(text: &str) -> AllowedCidr {
        text.parse().expect(text)
    }

    #[test]
    fn host_rules_parse_names_wildcards_and_ports() {
        let rule = host("Example.COM.");
        assert_eq!(rule.port, None);
        assert!(rule.name.matches("example.com"));
        assert!(!rule.name.matches("www.example.com"));
        assert_eq!(rule.to_string(), "example.com");

        let wildcard = host("*.example.com:8443");
        assert_eq!(wildcard.port, Some(8443));
        assert!(wildcard.name.matches("a.example.com"));
        assert!(wildcard.name.matches("a.b.example.com"));
        assert!(!wildcard.name.matches("example.com"));
        assert!(!wildcard.name.matches("badexample.com"));
        assert!(!wildcard.name.matches(".example.com"));
        assert_eq!(wildcard.to_string(), "*.example.com:8443");
        assert!(host("_dmarc.example.com")
            .name
            .matches("_dmarc.example.com"));
    }

    #[test]
    fn bad_host_rules_say_what_is_wrong() {
        for (text, reason) in [
            ("", "empty"),
            ("exa mple.com", "only letters"),
            ("*.", "empty"),
            ("*", "only letters"),
            ("a..b", "empty labels"),
            ("a.*.b", "only letters"),
            ("-a.com", "'-'"),
            ("example.com:0", "port"),
            ("example.com:70000", "port"),
            ("example.com:+80", "port"),
            ("example.com:", "port"),
            ("10.0.0.1", "--allow-cidr"),
            ("[::1]:80", "only letters"),
        ] {
            let error = text.parse::<AllowedHost>().expect_err(text);
            assert!(error.to_string().contains(reason), "{text}: {error}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(long.parse::<AllowedHost>().is_err());
        let huge = "a.".repeat(200) + "com";
        let error = huge.parse::<AllowedHost>().expect_err("too long");
        assert!(error.text.len() <= 100);
    }

    #[test]
    fn cidr_rules_parse_ranges_addresses_and_ports() {
        let rule = cidr("198.18.5.2/32:8080");
        assert!(rule.contains(Ipv4Addr::new(198, 18, 5, 2)));
        assert!(!rule.contains(Ipv4Addr::new(198, 18, 5, 3)));
        assert!(rule.opens(8080) && !rule.opens(8081));
        assert_eq!(rule.to_string(), "198.18.5.2/32:8080");

        let bare = cidr("203.0.113.7");
        assert_eq!(bare.prefix, 32);
        assert!(bare.opens(1));

        let all = cidr("0.0.0.0/0");
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        let net = cidr("10.0.0.0/8:53");
        assert!(net.contains(Ipv4Addr::new(10, 255, 0, 1)));
        assert!(!net.contains(Ipv4Addr::new(11, 0, 0, 1)));
    }

    #[test]
    fn bad_cidr_rules_say_what_is_wrong() {
        for (text, reason) in [
            ("300.1.2.3/8", "not an IPv4 address"),
            ("10.0.0.0/33", "prefix length"),
            ("10.0.0.0/", "prefix length"),
            ("10.0.0.0/+8", "prefix length"),
            ("10.0.0.5/8", "starts at 10.0.0.0"),
            ("10.0.0.0/8:0", "port"),
            ("10.0.0.0/8:65536", "port"),
            ("fd00::/8", "port"),
            ("example.com", "not an IPv4 address"),
        ] {
            let error = text.parse::<AllowedCidr>().expect_err(text);
            assert!(error.to_string().contains(reason), "{text}: {error}");
        }
    }

    #[test]
    fn denial_counts_print_every_reason_in_order() {
        let counts = DenialCounts {
            dns: 3,
            sni: 1,
            rebind: 2,
            ..Default::default()
        };
        assert_eq!(
            counts.to_string(),
            "dns 3, ip 0, sni 1, host 0, port 0, udp 0, rebind 2"
        );
        assert_eq!(counts.total(), 6);
    }
}

//! Address ranges: [`Cidr`], and the ranges a guest never reaches through
//! the stack unless a later allow rule names them ([`DENIED`]).
//!
//! The list closes the ways to the host and its neighbours: loopback, the
//! private and shared (CGNAT) networks, link-local (cloud metadata at
//! 169.254.169.254 included), multicast, reserved and broadcast, and on
//! IPv6 their counterparts plus every form that carries an IPv4 address
//! inside (mapped, compatible, NAT64, 6to4, Teredo), so that no spelling of
//! `127.0.0.1` gets through.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address range: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a text is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an address range (ADDRESS/PREFIX, as 10.0.0.0/8 or fd00::/8): {reason}")]
pub struct BadCidr {
    /// What was given, at most 100 characters of it.
    pub text: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl Cidr {
    /// The range of `prefix` leading bits of `address`; the bits after the
    /// prefix must be zero.
    pub fn new(address: IpAddr, prefix: u8) -> Option<Cidr> {
        let width = match address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > width {
            return None;
        }
        let cidr = Cidr {
            network: address,
            prefix,
        };
        (bits(address) & !cidr.mask() == 0).then_some(cidr)
    }

    /// Its first address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// Its prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u128 {
        let width = match self.network {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if self.prefix == 0 {
            return 0;
        }
        let ones = u128::MAX << (128 - u32::from(self.prefix));
        // An IPv4 address is held in the low 32 bits.
        ones >> (128 - width)
    }

    /// Whether `ip` is in the range. IPv4 ranges hold only IPv4 addresses
    /// and IPv6 ranges only IPv6 ones; [`denied`] looks inside the IPv6
    /// forms that carry IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let same_family = matches!(
            (self.network, ip),
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_))
        );
        same_family && bits(ip) & self.mask() == bits(self.network)
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(text: &str) -> Result<Cidr, BadCidr> {
        let bad = |reason| BadCidr {
            text: text.chars().take(100).collect(),
            reason,
        };
        let (address, prefix) = text.split_once('/').ok_or_else(|| bad("no /PREFIX"))?;
        let address: IpAddr = address.parse().map_err(|_| bad("not an IP address"))?;
        if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the prefix is not a number"));
        }
        let prefix: u8 = prefix.parse().map_err(|_| bad("the prefix is too long"))?;
        match Cidr::new(address, prefix) {
            Some(cidr) => Ok(cidr),
            None if prefix > if address.is_ipv4() { 32 } else { 128 } => {
                Err(bad("the prefix is longer than the address"))
            }
            None => Err(bad("it has bits set after the prefix")),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A range the stack never reaches, and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeniedRange {
    /// The range.
    pub cidr: Cidr,
    /// What it is, for a log line or a refusal.
    pub what: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8, what: &'static str) -> DeniedRange {
    DeniedRange {
        cidr: Cidr {
            network: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        },
        what,
    }
}

const fn v6(segments: [u16; 8], prefix: u8, what: &'static str) -> DeniedRange {
    let [a, b, c, d, e, f, g, h] = segments;
    DeniedRange {
        cidr: Cidr {
            network: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        },
        what,
    }
}

/// Every denied range.
pub const DENIED: &[DeniedRange] = &[
    v4(0, 0, 0, 0, 8, "\"this network\" (0.0.0.0/8)"),
    v4(127, 0, 0, 0, 8, "the host's loopback"),
    v4(10, 0, 0, 0, 8, "a private network (10.0.0.0/8)"),
    v4(172, 16, 0, 0, 12, "a private network (172.16.0.0/12)"),
    v4(192, 168, 0, 0, 16, "a private network (192.168.0.0/16)"),
    v4(100, 64, 0, 0, 10, "shared address space (100.64.0.0/10)"),
    v4(
        169,
        254,
        0,
        0,
        16,
        "link-local, cloud metadata included (169.254.0.0/16)",
    ),
    v4(224, 0, 0, 0, 4, "multicast (224.0.0.0/4)"),
    v4(240, 0, 0, 0, 4, "reserved and broadcast (240.0.0.0/4)"),
    v6(
        [0; 8],
        96,
        "unspecified, loopback or IPv4-compatible (::/96)",
    ),
    v6(
        [0, 0, 0, 0, 0, 0xffff, 0, 0],
        96,
        "IPv4-mapped (::ffff:0:0/96)",
    ),
    v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96, "NAT64 (64:ff9b::/96)"),
    v6(
        [0x64, 0xff9b, 1, 0, 0, 0, 0, 0],
        48,
        "local NAT64 (64:ff9b:1::/48)",
    ),
    v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "6to4 (2002::/16)"),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo (2001::/32)"),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local (fc00::/7)"),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local (fe80::/10)"),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast (ff00::/8)"),
];

/// The denied range `ip` is in, if any.
pub fn denied(ip: IpAddr) -> Option<&'static DeniedRange> {
    DENIED.iter().find(|range| range.cidr.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn ranges_parse_print_and_hold_what_they_should() {
        let cidr: Cidr = "172.16.0.0/12".parse().expect("a range");
        assert_eq!(cidr.to_string(), "172.16.0.0/12");
        assert!(cidr.contains(ip("172.31.255.255")));
        assert!(!cidr.contains(ip("172.32.0.0")));
        assert!(
            !cidr.contains(ip("::ffff:172.16.0.1")),
            "families stay apart"
        );
        let all: Cidr = "0.0.0.0/0".parse().expect("everything");
        assert!(all.contains(ip("8.8.8.8")) && !all.contains(ip("::1")));
        let one: Cidr = "2001:db8::1/128".parse().expect("one address");
        assert!(one.contains(ip("2001:db8::1")) && !one.contains(ip("2001:db8::2")));
        let v6: Cidr = "fd00::/8".parse().expect("a v6 range");
        assert!(v6.contains(ip("fdff:ffff::1")) && !v6.contains(ip("fe00::")));
    }

    #[test]
    fn bad_ranges_say_why() {
        for (text, reason) in [
            ("10.0.0.0", "no /PREFIX"),
            ("10.0.0/8", "not an IP address"),
            ("10.0.0.0/", "the prefix is not a number"),
            ("10.0.0.0/+8", "the prefix is not a number"),
            ("10.0.0.0/33", "the prefix is longer than the address"),
            ("::/129", "the prefix is longer than the address"),
            ("10.0.0.1/8", "it has bits set after the prefix"),
            ("10.0.0.0/0008", "the prefix is not a number"),
        ] {
            let error = text.parse::<Cidr>().expect_err(text);
            assert_eq!(error.reason, reason, "{text}");
            assert!(error.to_string().contains(text));
        }
    }

    #[test]
    fn every_spelling_of_the_host_and_its_neighbours_is_denied() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.251",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(denied(ip(text)).is_some(), "{text} is not denied");
        }
    }

    #[test]
    fn public_addresses_and_the_test_range_are_not_denied() {
        for text in [
            "1.1.1.1",
            "9.9.9.9",
            "8.8.8.8",
            "198.18.0.1",
            "198.19.255.254",
            "172.32.0.1",
            "100.128.0.1",
            "169.253.255.255",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2001:db8::1",
            "2003::1",
        ] {
            assert_eq!(denied(ip(text)), None, "{text} is denied");
        }
        assert_eq!(
            denied(ip("169.254.169.254")).map(|r| r.what),
            Some("link-local, cloud metadata included (169.254.0.0/16)")
        );
    }
}

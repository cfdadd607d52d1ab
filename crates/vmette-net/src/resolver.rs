//! How the host's own programs resolve names, for the stack's DNS answers:
//! `/etc/hosts` first, then the nameservers of `/etc/resolv.conf`, or an
//! upstream the user names instead. The files are the host's, not the
//! guest's, but they are still read with bounds (size, entries, name
//! rules), since a broken or enormous file must not stall a VM's DNS.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// Most bytes of `/etc/hosts` or `/etc/resolv.conf` read.
pub const FILE_LIMIT: u64 = 1 << 20;
/// Most names kept from `/etc/hosts`.
pub const HOSTS_LIMIT: usize = 65_536;
/// Most nameservers used, as glibc does (`MAXNS`).
pub const NAMESERVERS_LIMIT: usize = 3;

/// A DNS name in the form the stack compares: lowercase, without the root's
/// trailing dot, checked against the DNS length rules (labels of 1 to 63
/// bytes, 253 in all) and made of letters, digits, `-` and `_`.
pub fn normalized_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let sound = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    sound.then(|| name.to_ascii_lowercase())
}

/// The names of `/etc/hosts`: each with its addresses in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hosts {
    names: HashMap<String, Vec<IpAddr>>,
}

impl Hosts {
    /// Parses the text of a hosts file: `ADDRESS NAME [ALIAS…]` per line,
    /// `#` to the end of a line a comment. Lines that do not parse, and
    /// names past [`HOSTS_LIMIT`], are left out, as the C library does.
    pub fn parse(text: &str) -> Hosts {
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let Some(address) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
                continue;
            };
            for name in words.filter_map(normalized_name) {
                if names.len() >= HOSTS_LIMIT && !names.contains_key(&name) {
                    continue;
                }
                let addresses = names.entry(name).or_default();
                if !addresses.contains(&address) {
                    addresses.push(address);
                }
            }
        }
        Hosts { names }
    }

    /// The addresses of `name`, in file order; empty if the file does not
    /// name it.
    pub fn lookup(&self, name: &str) -> &[IpAddr] {
        normalized_name(name)
            .and_then(|name| self.names.get(&name))
            .map_or(&[], Vec::as_slice)
    }

    /// How many names it holds.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether it holds no name.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// A DNS server as users name one: `IP` (port 53) or `IP:PORT` (an IPv6
/// one as `[IP]:PORT`).
pub fn server_address(text: &str) -> Option<SocketAddr> {
    match text.parse::<IpAddr>() {
        Ok(ip) => Some(SocketAddr::new(ip, 53)),
        Err(_) => text.parse().ok(),
    }
}

/// The nameservers of a `resolv.conf` text, in order, at most
/// [`NAMESERVERS_LIMIT`], each on port 53. An IPv6 link-local server's
/// zone (`fe80::1%eth0`) is not kept, so such a server is left out.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|address| address.parse::<IpAddr>().ok())
        })
        .take(NAMESERVERS_LIMIT)
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Where names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Names answered from the hosts file first.
    pub hosts: Hosts,
    /// Servers asked, in order, for every other name.
    pub upstreams: Vec<SocketAddr>,
}

/// Why the host's resolver configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// No nameserver is left to ask.
    #[error("{path} names no nameserver vmette can use, so guests could not resolve names; name one with the upstream DNS option")]
    NoNameserver {
        /// The file.
        path: String,
    },
}

impl ResolverConfig {
    /// The host's configuration: `/etc/hosts` and `/etc/resolv.conf`.
    pub fn host() -> Result<ResolverConfig, ResolverError> {
        ResolverConfig::from_files(Path::new("/etc/hosts"), Path::new("/etc/resolv.conf"))
    }

    /// The configuration in `hosts` (missing: no names) and `resolv_conf`.
    pub fn from_files(hosts: &Path, resolv_conf: &Path) -> Result<ResolverConfig, ResolverError> {
        let hosts = match read_bounded(hosts) {
            Ok(text) => Hosts::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Hosts::default(),
            Err(source) => {
                return Err(ResolverError::Read {
                    path: hosts.display().to_string(),
                    source,
                })
            }
        };
        let text = read_bounded(resolv_conf).map_err(|source| ResolverError::Read {
            path: resolv_conf.display().to_string(),
            source,
        })?;
        let upstreams = nameservers(&text);
        if upstreams.is_empty() {
            return Err(ResolverError::NoNameserver {
                path: resolv_conf.display().to_string(),
            });
        }
        Ok(ResolverConfig { hosts, upstreams })
    }

    /// Every name resolved by `upstreams` alone (the hosts file is the
    /// host's, and a user who names a server wants that server's answers).
    pub fn upstream(upstreams: Vec<SocketAddr>) -> ResolverConfig {
        ResolverConfig {
            hosts: Hosts::default(),
            upstreams,
        }
    }
}

/// At most [`FILE_LIMIT`] bytes of `path`, as text (bytes that are not
/// UTF-8 replaced, so one bad line spoils only itself).
fn read_bounded(path: &Path) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(FILE_LIMIT)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn names_are_compared_lowercase_without_the_root_dot() {
        assert_eq!(normalized_name("Example.COM."), Some("example.com".into()));
        assert_eq!(
            normalized_name("_dmarc.a-b.example"),
            Some("_dmarc.a-b.example".into())
        );
        for bad in [
            "",
            ".",
            "a..b",
            "a b",
            "é.example",
            "a/b",
            &"x".repeat(64),
            &"a.".repeat(128),
        ] {
            assert_eq!(normalized_name(bad), None, "{bad:?}");
        }
        assert!(normalized_name(&format!("{}.{}", "a".repeat(63), "b".repeat(63))).is_some());
    }

    #[test]
    fn the_hosts_file_is_read_as_the_c_library_reads_it() {
        let hosts = Hosts::parse(
            "127.0.0.1 localhost\n\
             ::1 localhost ip6-localhost # a comment\n\
             198.18.0.10\tweb.test Web alias.test\n\
             198.18.0.11 web.test\n\
             # 198.18.0.12 commented.test\n\
             not-an-address broken.test\n\
             198.18.0.13 bad..name good.test\n",
        );
        assert_eq!(hosts.lookup("localhost"), [ip("127.0.0.1"), ip("::1")]);
        assert_eq!(
            hosts.lookup("WEB.test."),
            [ip("198.18.0.10"), ip("198.18.0.11")]
        );
        assert_eq!(hosts.lookup("alias.test"), [ip("198.18.0.10")]);
        assert_eq!(hosts.lookup("good.test"), [ip("198.18.0.13")]);
        for absent in ["commented.test", "broken.test", "bad..name", "nothere.test"] {
            assert!(hosts.lookup(absent).is_empty(), "{absent}");
        }
    }

    #[test]
    fn a_huge_hosts_file_keeps_a_bounded_number_of_names() {
        let text: String = (0..HOSTS_LIMIT + 100)
            .map(|n| format!("198.18.0.1 h{n}.test\n"))
            .collect();
        let hosts = Hosts::parse(&text);
        assert_eq!(hosts.len(), HOSTS_LIMIT);
        assert!(hosts
            .lookup(&format!("h{}.test", HOSTS_LIMIT + 50))
            .is_empty());
    }

    #[test]
    fn nameservers_come_in_order_at_most_three() {
        let servers = nameservers(
            "# generated\nsearch example\nnameserver 198.18.0.53\nnameserver ::1 ; comment\n\
             nameserver fe80::1%eth0\nnameserver not-an-ip\nnameserver 9.9.9.9\nnameserver 1.1.1.1\n\
             options edns0\n",
        );
        assert_eq!(
            servers,
            ["198.18.0.53:53", "[::1]:53", "9.9.9.9:53"]
                .map(|s| s.parse::<SocketAddr>().expect("addr"))
        );
    }

    #[test]
    fn files_are_read_with_bounds_and_a_missing_nameserver_is_a_sentence() {
        let dir = tempfile::tempdir().expect("a directory");
        let dir = dir.path();
        let hosts = dir.join("hosts");
        let resolv = dir.join("resolv.conf");
        std::fs::write(&hosts, "198.18.0.10 web.test\n").expect("hosts");
        std::fs::write(&resolv, "search test\n").expect("resolv.conf");
        let error = ResolverConfig::from_files(&hosts, &resolv).expect_err("no nameserver");
        assert!(error.to_string().contains("names no nameserver"), "{error}");
        let mut text = "nameserver 198.18.0.53\n".to_string();
        text.push_str(&"#".repeat(2 << 20));
        std::fs::write(&resolv, text).expect("resolv.conf");
        let config = ResolverConfig::from_files(&hosts, &resolv).expect("a config");
        assert_eq!(config.upstreams, ["198.18.0.53:53".parse().expect("addr")]);
        assert_eq!(config.hosts.lookup("web.test"), [ip("198.18.0.10")]);
        let config =
            ResolverConfig::from_files(&dir.join("absent"), &resolv).expect("no hosts file");
        assert!(config.hosts.is_empty());
    }
}

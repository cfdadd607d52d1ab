//! What a connection is for, read from its first bytes. The egress
//! allowlist names hosts, but a guest's TCP connection carries only an
//! address, which many names share and which the guest may have chosen
//! itself. So for HTTPS and plain HTTP the stack accepts the guest's
//! connection, reads what the guest sends on the host, and learns the name
//! the connection is for (the TLS ClientHello's server name, the HTTP
//! request's Host) before it connects anywhere upstream; then it keeps
//! reading every request of a plain-HTTP connection, so a keep-alive
//! connection cannot turn to another host after its first request.
//!
//! * [`tls::client_hello`]: the server name of a ClientHello, reassembled
//!   from whatever records and segments it came in;
//! * [`http::RequestGate`]: how much of a guest's plain-HTTP stream may go
//!   upstream, request by request.
//!
//! Both only look: the guest is hostile, so every length it declares is
//! bounded before it is trusted, and nothing here panics or allocates
//! more than a request head or a hello.

pub mod http;
pub mod tls;

use vmette_core::network::check_host_name;

/// `name` as the allowlist compares it (lowercase, no trailing dot), if
/// it is a host name by the rule allow rules are held to
/// ([`check_host_name`]).
fn host_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    check_host_name(&name).is_ok().then_some(name)
}

/// xorshift64: enough randomness to throw bytes at the parsers' tests.
#[cfg(test)]
pub(crate) struct Random(pub u64);

#[cfg(test)]
impl Random {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % bound as u64).expect("a small number")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_normalized() {
        assert_eq!(host_name("Allowed.TEST."), Some("allowed.test".into()));
        assert_eq!(host_name("a_b.test"), Some("a_b.test".into()));
        assert_eq!(host_name("10.0.0.1"), Some("10.0.0.1".into()));
    }

    #[test]
    fn what_is_not_a_host_name() {
        let long_label = "a".repeat(64);
        let long_name = ["a"; 127].join(".") + ".bb";
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            "-a.test",
            "a-.test",
            "a b.test",
            "a*.test",
            "[::1]",
            "a:80",
            "é.test",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert_eq!(host_name(bad), None, "{bad:?}");
        }
    }
}

//! The count of what the stack refused one guest, by reason, shared by the
//! loop, the DNS workers and the attachment that reports it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vmette_core::DenialCounts;

use crate::lock;
use crate::throttle::Throttle;

/// Why a flow or query was refused, as the counts group it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A DNS query for a name not allowed, or too large.
    Dns,
    /// A connection to an address nothing allows.
    Ip,
    /// A TLS connection for a server not allowed.
    Sni,
    /// An HTTP request for a host not allowed.
    Host,
    /// A connection to an allowed address on a port not opened.
    Port,
    /// A UDP flow nothing allows.
    Udp,
    /// A DNS answer that named only addresses the guest may not reach.
    Rebind,
}

/// Counts by reason; each flow or query is counted once by whoever
/// refuses it, and logged (at `info`, which `-v` shows) at most every few
/// seconds, since a guest refuses itself as often as it likes.
pub struct Denials {
    counts: [AtomicU64; 7],
    log: Mutex<Throttle>,
}

impl Default for Denials {
    fn default() -> Denials {
        Denials {
            counts: Default::default(),
            log: Mutex::new(Throttle::new()),
        }
    }
}

impl Denials {
    /// Counts one refusal of `what` and logs it, unless one was logged
    /// moments ago.
    pub fn refuse(&self, reason: Reason, what: fmt::Arguments<'_>) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(quiet) = lock(&self.log).admit() {
            tracing::info!("refused {what} ({quiet} more refused since the last message)");
        }
    }

    /// The counts now.
    pub fn snapshot(&self) -> DenialCounts {
        let at = |reason: Reason| self.counts[reason as usize].load(Ordering::Relaxed);
        DenialCounts {
            dns: at(Reason::Dns),
            ip: at(Reason::Ip),
            sni: at(Reason::Sni),
            host: at(Reason::Host),
            port: at(Reason::Port),
            udp: at(Reason::Udp),
            rebind: at(Reason::Rebind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_has_its_own_count() {
        let denials = Denials::default();
        for (reason, times) in [
            (Reason::Dns, 1),
            (Reason::Ip, 2),
            (Reason::Sni, 3),
            (Reason::Host, 4),
            (Reason::Port, 5),
            (Reason::Udp, 6),
            (Reason::Rebind, 7),
        ] {
            for _ in 0..times {
                denials.refuse(reason, format_args!("a test"));
            }
        }
        let counts = denials.snapshot();
        assert_eq!(counts.by_reason().map(|(_, n)| n), [1, 2, 3, 4, 5, 6, 7]);
    }
}

//! Connections to ports 80 and 443 of an allowed name, which the stack
//! accepts from the guest before connecting anywhere: it reads which name
//! the connection is for (the ClientHello's server name, the request's
//! Host), resolves that name itself and connects there, never to the
//! address the guest chose. On HTTP every later request of the connection
//! is read too, and must name the same host.

use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use smoltcp::socket::tcp;

use super::{host_to_guest, moved, FlowKey, FlowKind, Moved, TcpFlow, CONNECT_TIMEOUT};
use crate::denials::Reason;
use crate::inspect::http::{Gate, RequestGate, HEAD_LIMIT};
use crate::inspect::tls::{client_hello, Hello, HELLO_LIMIT};
use crate::policy::{Policy, Protocol};

/// How long the guest has to name its server once connected.
const READ_PATIENCE: Duration = Duration::from_secs(10);
/// How long resolving the name and connecting to it may take together.
const CONNECT_PATIENCE: Duration = Duration::from_secs(5).saturating_add(CONNECT_TIMEOUT);
/// The guest's bytes an HTTP connection holds while its requests are
/// read: room for one whole head past what waits for the host.
const GATED_BUFFER: usize = 4 * HEAD_LIMIT;

/// Where an inspected connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the guest's first bytes.
    Reading,
    /// Asking DNS for the name they named.
    Resolving,
    /// Connecting to it.
    Connecting,
    /// Connected: bytes flow, through the request gate on HTTP.
    Open,
}

/// An inspected connection's state.
pub struct Inspection {
    /// The guest's connection.
    pub key: FlowKey,
    protocol: Protocol,
    phase: Phase,
    since: Instant,
    /// The guest's bytes not yet written to the host.
    pending: Vec<u8>,
    /// How many leading bytes of `pending` may go to the host.
    approved: usize,
    gate: RequestGate,
    name: Option<String>,
}

/// What a turn of the pump asks of the stack.
pub enum Outcome {
    /// Nothing.
    Going,
    /// Resolve this allowed name, then connect the flow to it.
    Resolve(String),
    /// Close the connection, counting the refusal, for this reason.
    Refused(Reason, String),
}

impl Inspection {
    /// A connection the guest opened to `key`'s destination, to be read
    /// as `protocol`.
    pub fn new(key: FlowKey, protocol: Protocol) -> Inspection {
        Inspection {
            key,
            protocol,
            phase: Phase::Reading,
            since: Instant::now(),
            pending: Vec::new(),
            approved: 0,
            gate: RequestGate::new(),
            name: None,
        }
    }

    /// The name resolved: connecting to it.
    pub fn connecting(&mut self) {
        self.phase = Phase::Connecting;
        self.since = Instant::now();
    }

    /// Connected to the name.
    pub fn connected(&mut self) {
        self.phase = Phase::Open;
    }

    /// When the connection waited too long: `Some` with the reason to
    /// count, when it is the guest that named nothing in time.
    pub fn overdue(&self, now: Instant) -> Option<Option<Reason>> {
        match self.phase {
            Phase::Reading if now >= self.since + READ_PATIENCE => Some(Some(self.reason())),
            Phase::Resolving | Phase::Connecting if now >= self.since + CONNECT_PATIENCE => {
                Some(None)
            }
            _ => None,
        }
    }

    /// The name the connection goes to, or its destination before that.
    pub fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("{name}:{}", self.key.1.port()),
            None => self.key.1.to_string(),
        }
    }

    fn reason(&self) -> Reason {
        match self.protocol {
            Protocol::Tls => Reason::Sni,
            Protocol::Http => Reason::Host,
        }
    }

    fn refused(&self, why: impl std::fmt::Display) -> Outcome {
        let what = match self.protocol {
            Protocol::Tls => "TLS",
            Protocol::Http => "HTTP",
        };
        Outcome::Refused(
            self.reason(),
            format!("{what} from the guest to {}: {why}", self.key.1),
        )
    }

    /// Takes the guest's bytes into `pending`, up to `limit` in all.
    fn fill(&mut self, socket: &mut tcp::Socket<'_>, limit: usize) {
        while self.pending.len() < limit && socket.can_recv() {
            let room = limit - self.pending.len();
            let pending = &mut self.pending;
            let taken = socket.recv(|data| {
                let n = data.len().min(room);
                pending.extend_from_slice(&data[..n]);
                (n, n)
            });
            if !matches!(taken, Ok(n) if n > 0) {
                break;
            }
        }
    }

    /// Reads the first bytes until they name a server.
    fn read(&mut self, socket: &mut tcp::Socket<'_>, policy: &Policy) -> Outcome {
        let port = self.key.1.port();
        match self.protocol {
            Protocol::Tls => {
                self.fill(socket, HELLO_LIMIT + 1);
                match client_hello(&self.pending) {
                    Hello::Incomplete => {}
                    Hello::Sni(name) if policy.admits(&name, port) => return self.resolve(name),
                    Hello::Sni(name) => {
                        return self.refused(format_args!("{name} is not an allowed name"))
                    }
                    Hello::NoSni => return self.refused("the ClientHello names no server"),
                    Hello::Malformed => return self.refused("that is not a TLS ClientHello"),
                }
            }
            Protocol::Http => {
                self.fill(socket, HEAD_LIMIT + 1);
                if let Err(outcome) = self.approve() {
                    return outcome;
                }
                if let Some(host) = self.gate.host().map(str::to_string) {
                    if !policy.admits(&host, port) {
                        return self.refused(format_args!("{host} is not an allowed host"));
                    }
                    return self.resolve(host);
                }
            }
        }
        if guest_done(socket) {
            if self.pending.is_empty() {
                // Connected and closed without a word: nothing to refuse.
                socket.close();
                return Outcome::Going;
            }
            return self.refused("the guest closed before naming a server");
        }
        Outcome::Going
    }

    fn resolve(&mut self, name: String) -> Outcome {
        if self.protocol == Protocol::Tls {
            self.approved = self.pending.len();
        }
        self.name = Some(name.clone());
        self.phase = Phase::Resolving;
        self.since = Instant::now();
        Outcome::Resolve(name)
    }

    /// Lets through what the request gate passes of the pending bytes;
    /// after the ClientHello, everything.
    fn approve(&mut self) -> Result<(), Outcome> {
        if self.protocol == Protocol::Tls {
            self.approved = self.pending.len();
            return Ok(());
        }
        while self.approved < self.pending.len() {
            match self.gate.inspect(&self.pending[self.approved..]) {
                Ok(Gate::Forward(n)) if n > 0 => {
                    self.approved = (self.approved + n).min(self.pending.len());
                    // The first head names the host; nothing more is read
                    // before it is allowed.
                    if self.phase == Phase::Reading {
                        break;
                    }
                }
                Ok(Gate::Forward(_) | Gate::NeedMore) => break,
                Err(denial) => return Err(self.refused(denial)),
            }
        }
        Ok(())
    }
}

/// Whether the guest sent all it will.
fn guest_done(socket: &tcp::Socket<'_>) -> bool {
    !socket.may_recv() && !socket.can_recv()
}

impl TcpFlow {
    /// Whether the flow waits for the host connection to its name.
    pub(super) fn connecting(&self) -> bool {
        matches!(&self.kind, FlowKind::Inspected(i) if i.phase == Phase::Connecting)
    }
}

/// One turn of an inspected flow: reading its first bytes, or moving its
/// bytes once connected.
pub fn pump(socket: &mut tcp::Socket<'_>, flow: &mut TcpFlow, policy: &Policy) -> Outcome {
    if matches!(
        socket.state(),
        tcp::State::Closed | tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived
    ) {
        return Outcome::Going;
    }
    let TcpFlow {
        kind,
        host,
        host_readable,
        host_write_blocked,
        host_eof,
        guest_eof,
        ..
    } = flow;
    let FlowKind::Inspected(inspection) = kind else {
        return Outcome::Going;
    };
    match inspection.phase {
        Phase::Reading => return inspection.read(socket, policy),
        Phase::Resolving | Phase::Connecting => return Outcome::Going,
        Phase::Open => {}
    }
    let Some(stream) = host.as_mut() else {
        return Outcome::Going;
    };
    if !host_to_guest(socket, stream, host_readable, host_eof) {
        return Outcome::Going;
    }
    inspection.fill(socket, GATED_BUFFER);
    if let Err(outcome) = inspection.approve() {
        return outcome;
    }
    while inspection.approved > 0 && !*host_write_blocked {
        let (written, how) = moved(stream.write(&inspection.pending[..inspection.approved]));
        inspection.pending.drain(..written);
        inspection.approved -= written;
        match how {
            Moved::Bytes => {}
            Moved::Blocked => *host_write_blocked = true,
            Moved::End | Moved::Failed => {
                socket.abort();
                return Outcome::Going;
            }
        }
    }
    // The guest is done, and what it sent that may go is gone: the rest
    // (half a request) never will.
    if !*guest_eof && inspection.approved == 0 && guest_done(socket) {
        *guest_eof = true;
        let _ = stream.shutdown(Shutdown::Write);
    }
    // Past the ClientHello a TLS connection is opaque: an ordinary flow.
    if inspection.protocol == Protocol::Tls && inspection.pending.is_empty() {
        let key = inspection.key;
        *kind = FlowKind::Outbound(key);
    }
    Outcome::Going
}

#[cfg(test)]
impl Inspection {
    /// Moves the start of the phase `by` into the past.
    pub fn age(&mut self, by: Duration) {
        self.since = self.since.checked_sub(by).unwrap_or(self.since);
    }
}

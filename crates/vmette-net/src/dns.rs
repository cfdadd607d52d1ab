//! DNS for the guest: every query, to any address on port 53, is answered
//! here. Names are resolved on the host (its hosts file, then its
//! nameservers, or the upstream the user named), addresses the guest must
//! never reach are taken out of the answers, and each address handed to
//! the guest is remembered with the name it was asked for.
//!
//! The guest's query is never forwarded as it came: the stack parses it,
//! takes its one question, and asks the upstream a fresh query of its own
//! (its own id, no options the guest chose), so nothing but a name and a
//! type leaves the host.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::denials::{Denials, Reason};
use crate::policy::Policy;
use crate::resolver::{normalized_name, ResolverConfig};
use crate::{connected_udp, lock};

/// Largest query the stack reads from the guest, over UDP or TCP. A
/// question is at most 255 bytes of name plus a header and an OPT record;
/// more is not a query.
pub const QUERY_LIMIT: usize = 1024;

/// Largest answer the stack reads from an upstream.
pub const ANSWER_LIMIT: usize = 65_535;

/// The size of a UDP answer a guest gets without EDNS.
const CLASSIC_UDP: usize = 512;

/// The most an answer over UDP may be, whatever the guest's EDNS says:
/// the size DNS flag day 2020 settled on, which needs no fragments.
const EDNS_UDP: u16 = 1232;

/// How long one upstream gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a query takes in all, over every upstream.
const QUERY_DEADLINE: Duration = Duration::from_secs(5);

/// The TTL of answers from the hosts file, as glibc's nscd uses.
const HOSTS_TTL: u32 = 60;

/// Most addresses remembered with their names.
pub const BINDINGS_LIMIT: usize = 4096;

/// The transport a query came over, which bounds its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// UDP: the answer fits the guest's buffer or is truncated.
    Udp,
    /// TCP: up to 65,535 bytes.
    Tcp,
}

/// Addresses the guest was given, each with the names it was asked for
/// (the question's name, at the top of any CNAME chain). The egress policy
/// decides by these.
#[derive(Debug, Default)]
pub struct Bindings {
    names: HashMap<Ipv4Addr, Vec<String>>,
    order: VecDeque<Ipv4Addr>,
}

impl Bindings {
    /// Remembers that `ip` answered `name`; the oldest address is
    /// forgotten past [`BINDINGS_LIMIT`].
    pub fn bind(&mut self, ip: Ipv4Addr, name: &str) {
        let names = self.names.entry(ip).or_default();
        if names.iter().any(|n| n == name) {
            return;
        }
        if names.is_empty() {
            self.order.push_back(ip);
        }
        // A name per address is usual; a handful is plenty for a policy.
        if names.len() >= 8 {
            names.remove(0);
        }
        names.push(name.to_string());
        while self.order.len() > BINDINGS_LIMIT {
            if let Some(old) = self.order.pop_front() {
                self.names.remove(&old);
            }
        }
    }

    /// The names `ip` was given for.
    pub fn names(&self, ip: Ipv4Addr) -> &[String] {
        self.names.get(&ip).map_or(&[], Vec::as_slice)
    }
}

/// Answers the guest's queries; shared by the stack's DNS workers.
pub struct Dns {
    config: ResolverConfig,
    policy: Policy,
    bindings: Arc<Mutex<Bindings>>,
    denials: Arc<Denials>,
}

impl Dns {
    /// Answers by `config` only what `policy` lets the guest resolve,
    /// never with an address it will not hand out, recording what it
    /// answers in `bindings` and what it refuses in `denials`.
    pub fn new(
        config: ResolverConfig,
        policy: Policy,
        bindings: Arc<Mutex<Bindings>>,
        denials: Arc<Denials>,
    ) -> Dns {
        Dns {
            config,
            policy,
            bindings,
            denials,
        }
    }

    /// The answer to `query`, or `None` for bytes that are not a query
    /// the stack answers (not a query, more than one question): those are
    /// dropped, as a server drops garbage. A query over [`QUERY_LIMIT`]
    /// is refused unread.
    pub fn answer(&self, query: &[u8], carrier: Carrier) -> Option<Vec<u8>> {
        if query.len() > QUERY_LIMIT {
            let refused = refused_unread(query);
            if refused.is_some() {
                self.denials.refuse(
                    Reason::Dns,
                    format_args!("a DNS query of {} bytes, over {QUERY_LIMIT}", query.len()),
                );
            }
            return refused;
        }
        let request = Message::from_vec(query).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let reply = match self.check(&request) {
            Ok(question) => self.resolve(&request, question),
            Err(code) => reply_to(&request, code),
        };
        encode_for(&request, reply, carrier)
    }

    /// The question of a query the stack answers, or the code it gets.
    fn check<'a>(&self, request: &'a Message) -> Result<&'a Query, ResponseCode> {
        if request.metadata.op_code != OpCode::Query {
            return Err(ResponseCode::NotImp);
        }
        let [question] = request.queries.as_slice() else {
            return Err(ResponseCode::FormErr);
        };
        if question.query_class() != DNSClass::IN {
            return Err(ResponseCode::NotImp);
        }
        if normalized_name(&question.name().to_ascii()).is_none() {
            return Err(ResponseCode::FormErr);
        }
        match question.query_type() {
            RecordType::AXFR | RecordType::IXFR | RecordType::ANY => Err(ResponseCode::Refused),
            _ => Ok(question),
        }
    }

    fn resolve(&self, request: &Message, question: &Query) -> Message {
        let asked = normalized_name(&question.name().to_ascii()).unwrap_or_default();
        let mut reply = reply_to(request, ResponseCode::NoError);
        // A name the allowlist does not name is not resolved, from the
        // hosts file or upstream: a query that leaves the host is a
        // channel out (its labels carry what they like). A guest that may
        // open nothing gets the hosts file's names, and no recursion.
        let closed = self.policy.egress.is_closed();
        if !closed && !self.policy.resolves(&asked) {
            return self.refuse_name(reply, &asked);
        }
        // The guest has no IPv6: an empty answer sends it to A at once.
        if question.query_type() == RecordType::AAAA {
            return reply;
        }
        let from_hosts = self.config.hosts.lookup(&asked);
        if !from_hosts.is_empty() {
            return self.answer_from_hosts(reply, question, &asked, from_hosts);
        }
        if closed {
            return self.refuse_name(reply, &asked);
        }
        let Some(fresh) = lowercase_query(&asked, question.query_type()) else {
            reply.metadata.response_code = ResponseCode::FormErr;
            return reply;
        };
        match self.ask_upstreams(&fresh) {
            Some(upstream) => self.filtered(reply, question, &asked, upstream),
            None => {
                reply.metadata.response_code = ResponseCode::ServFail;
                reply
            }
        }
    }

    fn refuse_name(&self, mut reply: Message, asked: &str) -> Message {
        self.denials.refuse(
            Reason::Dns,
            format_args!("to resolve {asked}: the guest may not reach it"),
        );
        reply.metadata.response_code = ResponseCode::NXDomain;
        reply
    }

    fn answer_from_hosts(
        &self,
        mut reply: Message,
        question: &Query,
        asked: &str,
        addresses: &[IpAddr],
    ) -> Message {
        let allowed: Vec<Ipv4Addr> = ipv4_only(addresses)
            .into_iter()
            .filter(|ip| self.policy.answerable(*ip))
            .collect();
        if allowed.is_empty() {
            self.denials.refuse(
                Reason::Rebind,
                format_args!("to resolve {asked}: the hosts file names only addresses the guest may not reach"),
            );
            reply.metadata.response_code = ResponseCode::NXDomain;
            return reply;
        }
        if question.query_type() == RecordType::A {
            let mut bindings = lock(&self.bindings);
            for ip in allowed {
                bindings.bind(ip, asked);
                reply.answers.push(Record::from_rdata(
                    question.name().clone(),
                    HOSTS_TTL,
                    RData::A(A(ip)),
                ));
            }
        }
        reply
    }

    /// The upstream's answer with what the guest may not have taken out:
    /// addresses in the denied ranges (a name that resolves into them is
    /// refused as rebinding), IPv6 addresses, records for names outside
    /// the question's CNAME chain, and everything but an SOA in the other
    /// sections.
    fn filtered(
        &self,
        mut reply: Message,
        question: &Query,
        asked: &str,
        upstream: Message,
    ) -> Message {
        reply.metadata.response_code = upstream.metadata.response_code;
        let mut refused = false;
        let mut kept = Vec::new();
        for record in on_chain(question.name(), upstream.answers) {
            match &record.data {
                RData::A(A(ip)) if !self.policy.answerable(*ip) => refused = true,
                RData::A(A(ip)) => {
                    lock(&self.bindings).bind(*ip, asked);
                    kept.push(record);
                }
                RData::AAAA(_) => {}
                _ => kept.push(record),
            }
        }
        let has_address = kept.iter().any(|r| matches!(r.data, RData::A(_)));
        if refused && !has_address && question.query_type() == RecordType::A {
            self.denials.refuse(
                Reason::Rebind,
                format_args!("to resolve {asked}: it resolves only to addresses the guest may not reach (rebinding)"),
            );
            reply.metadata.response_code = ResponseCode::NXDomain;
            return reply;
        }
        reply.answers = kept;
        reply.authorities = upstream
            .authorities
            .into_iter()
            .filter(|r| r.record_type() == RecordType::SOA)
            .collect();
        reply
    }

    /// The addresses the stack connects to for `name` (lowercase, without
    /// a trailing dot), which a connection to an allowed name named: from
    /// the hosts file or a fresh upstream query, and only those the guest
    /// may reach. None when there are none; a name whose only addresses
    /// are denied counts as rebinding.
    pub fn addresses_for(&self, name: &str) -> Vec<Ipv4Addr> {
        let from_hosts = self.config.hosts.lookup(name);
        let found: Vec<Ipv4Addr> = if from_hosts.is_empty() {
            let Some(question) = lowercase_query(name, RecordType::A) else {
                return Vec::new();
            };
            let Some(upstream) = self.ask_upstreams(&question) else {
                return Vec::new();
            };
            on_chain(question.name(), upstream.answers)
                .filter_map(|record| match record.data {
                    RData::A(A(ip)) => Some(ip),
                    _ => None,
                })
                .collect()
        } else {
            ipv4_only(from_hosts)
        };
        let reachable: Vec<Ipv4Addr> = found
            .iter()
            .copied()
            .filter(|ip| self.policy.answerable(*ip))
            .collect();
        if reachable.is_empty() && !found.is_empty() {
            self.denials.refuse(
                Reason::Rebind,
                format_args!("a connection to {name}: it resolves only to addresses the guest may not reach (rebinding)"),
            );
        }
        reachable
    }

    fn ask_upstreams(&self, question: &Query) -> Option<Message> {
        let deadline = Instant::now() + QUERY_DEADLINE;
        for upstream in &self.config.upstreams {
            if Instant::now() >= deadline {
                break;
            }
            match ask(*upstream, question, deadline) {
                Ok(answer) => return Some(answer),
                Err(e) => tracing::debug!(%upstream, "DNS: the upstream did not answer: {e}"),
            }
        }
        None
    }
}

/// A fresh question for `name` (lowercase, without a trailing dot), asked
/// in lowercase: the letter case a guest chose (DNS 0x20) is a bit per
/// letter of its own, and must not leave the host.
fn lowercase_query(name: &str, kind: RecordType) -> Option<Query> {
    let owner = Name::from_ascii(format!("{name}.")).ok()?;
    Some(Query::query(owner, kind))
}

/// The records of `answers` on the CNAME chain that starts at `name`, in
/// order: each owned by `name` or by the target of a CNAME kept before it.
/// Any other record is not the question's, and may be a poisoning attempt.
fn on_chain(name: &Name, answers: Vec<Record>) -> impl Iterator<Item = Record> {
    let mut chain = vec![name.to_lowercase()];
    answers.into_iter().filter(move |record| {
        if !chain.contains(&record.name.to_lowercase()) {
            return false;
        }
        if let RData::CNAME(target) = &record.data {
            chain.push(target.0.to_lowercase());
        }
        true
    })
}

/// The IPv4 addresses among `addresses`: the guest has no IPv6.
fn ipv4_only(addresses: &[IpAddr]) -> Vec<Ipv4Addr> {
    addresses
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// The REFUSED reply to a message too long to read: its header's id,
/// opcode and recursion flag, no sections. `None` when it is no query.
fn refused_unread(query: &[u8]) -> Option<Vec<u8>> {
    let header = query.get(..4)?;
    if header[2] & 0x80 != 0 {
        return None;
    }
    let flags = 0x80 | (header[2] & 0x79);
    // Recursion available, REFUSED (5).
    let mut reply = vec![header[0], header[1], flags, 0x85];
    reply.extend_from_slice(&[0; 8]);
    Some(reply)
}

/// An empty reply to `request` with `code`.
fn reply_to(request: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.response_code = code;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = request.queries.iter().take(1).cloned().collect();
    reply
}

/// `reply` encoded for the guest's transport: over UDP, cut to what the
/// guest can take, with the truncation flag, so that it asks over TCP.
fn encode_for(request: &Message, mut reply: Message, carrier: Carrier) -> Option<Vec<u8>> {
    let room = match (carrier, &request.edns) {
        (Carrier::Tcp, _) => ANSWER_LIMIT,
        (Carrier::Udp, None) => CLASSIC_UDP,
        (Carrier::Udp, Some(edns)) => usize::from(edns.max_payload().clamp(512, EDNS_UDP)),
    };
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_UDP);
        reply.edns = Some(edns);
    }
    let bytes = reply.to_vec().ok()?;
    if bytes.len() <= room {
        return Some(bytes);
    }
    reply.answers.clear();
    reply.authorities.clear();
    reply.additionals.clear();
    reply.metadata.truncation = true;
    reply.to_vec().ok()
}

/// Asks `upstream` the question over UDP, then over TCP when the answer
/// was truncated.
fn ask(upstream: SocketAddr, question: &Query, deadline: Instant) -> io::Result<Message> {
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.queries.push(question.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_UDP);
    query.edns = Some(edns);
    let bytes = query.to_vec().map_err(io::Error::other)?;

    let answer = ask_udp(upstream, &bytes, deadline)?;
    let answer = if answer.metadata.truncation {
        ask_tcp(upstream, &bytes, deadline)?
    } else {
        answer
    };
    let matches = answer.metadata.id == query.metadata.id
        && answer.metadata.message_type == MessageType::Response
        && answer.queries.len() == 1
        && answer.queries[0].name().to_lowercase() == question.name().to_lowercase()
        && answer.queries[0].query_type() == question.query_type();
    if !matches {
        return Err(io::Error::other("the answer is not for the question asked"));
    }
    Ok(answer)
}

fn ask_udp(upstream: SocketAddr, query: &[u8], deadline: Instant) -> io::Result<Message> {
    let socket = connected_udp(upstream)?;
    socket.send(query)?;
    let id = u16::from_be_bytes([query[0], query[1]]);
    let mut buffer = vec![0; usize::from(EDNS_UDP).max(4096)];
    loop {
        let left = remaining(deadline)?;
        socket.set_read_timeout(Some(left.min(UPSTREAM_TIMEOUT)))?;
        let n = socket.recv(&mut buffer)?;
        // A stray datagram (a late answer, a spoof) is not the answer.
        if n >= 2 && u16::from_be_bytes([buffer[0], buffer[1]]) == id {
            return Message::from_vec(&buffer[..n]).map_err(io::Error::other);
        }
    }
}

fn ask_tcp(upstream: SocketAddr, query: &[u8], deadline: Instant) -> io::Result<Message> {
    let mut stream =
        TcpStream::connect_timeout(&upstream, remaining(deadline)?.min(UPSTREAM_TIMEOUT))?;
    stream.set_read_timeout(Some(remaining(deadline)?.min(UPSTREAM_TIMEOUT)))?;
    stream.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
    let len = u16::try_from(query.len()).map_err(io::Error::other)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut answer = vec![0; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer)?;
    Message::from_vec(&answer).map_err(io::Error::other)
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolver::Hosts;
    use hickory_proto::rr::Name;
    use std::net::UdpSocket;

    fn policy() -> Policy {
        Policy {
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            egress: vmette_core::Egress::Open,
            host_ports: vec![],
        }
    }

    fn allowing(hosts: &[&str]) -> Policy {
        Policy {
            egress: vmette_core::Egress::Allowlist(vmette_core::Allowlist {
                hosts: hosts.iter().map(|h| h.parse().expect("rule")).collect(),
                cidrs: Vec::new(),
            }),
            ..policy()
        }
    }

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message
            .queries
            .push(Query::query(Name::from_ascii(name).expect("name"), kind));
        message.to_vec().expect("encode")
    }

    /// A one-shot upstream on loopback that answers with `answers`.
    fn upstream(answers: Vec<Record>) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let address = socket.local_addr().expect("address");
        std::thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            let (n, from) = socket.recv_from(&mut buffer).expect("query");
            let request = Message::from_vec(&buffer[..n]).expect("parse");
            let mut reply = reply_to(&request, ResponseCode::NoError);
            reply.answers = answers;
            socket
                .send_to(&reply.to_vec().expect("encode"), from)
                .expect("reply");
        });
        address
    }

    fn a(name: &str, ip: [u8; 4]) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).expect("name"),
            30,
            RData::A(A(ip.into())),
        )
    }

    fn cname(name: &str, target: &str) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).expect("name"),
            30,
            RData::CNAME(hickory_proto::rr::rdata::CNAME(
                Name::from_ascii(target).expect("name"),
            )),
        )
    }

    fn resolver(config: ResolverConfig) -> (Dns, Arc<Mutex<Bindings>>) {
        let (dns, bindings, _) = resolver_with(config, policy());
        (dns, bindings)
    }

    fn resolver_with(
        config: ResolverConfig,
        policy: Policy,
    ) -> (Dns, Arc<Mutex<Bindings>>, Arc<Denials>) {
        let bindings = Arc::new(Mutex::new(Bindings::default()));
        let denials = Arc::new(Denials::default());
        let dns = Dns::new(config, policy, Arc::clone(&bindings), Arc::clone(&denials));
        (dns, bindings, denials)
    }

    fn parse(bytes: Option<Vec<u8>>) -> Message {
        Message::from_vec(&bytes.expect("an answer")).expect("parse")
    }

    #[test]
    fn answers_follow_the_cname_chain_and_bind_to_the_asked_name() {
        let server = upstream(vec![
            cname("www.example.test.", "edge.cdn.test."),
            a("edge.cdn.test.", [198, 18, 0, 10]),
            // Not on the chain: a poisoning attempt.
            a("other.test.", [198, 18, 0, 99]),
        ]);
        let (dns, bindings) = resolver(ResolverConfig::upstream(vec![server]));
        let reply = parse(dns.answer(&query("WWW.example.test.", RecordType::A), Carrier::Udp));
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(reply.answers.len(), 2);
        let bindings = lock(&bindings);
        assert_eq!(
            bindings.names([198, 18, 0, 10].into()),
            ["www.example.test"]
        );
        assert!(bindings.names([198, 18, 0, 99].into()).is_empty());
    }

    #[test]
    fn a_name_that_resolves_into_a_denied_range_is_refused() {
        let server = upstream(vec![a("rebind.test.", [127, 0, 0, 1])]);
        let (dns, bindings) = resolver(ResolverConfig::upstream(vec![server]));
        let reply = parse(dns.answer(&query("rebind.test.", RecordType::A), Carrier::Udp));
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert!(reply.answers.is_empty());
        assert!(lock(&bindings).names(Ipv4Addr::LOCALHOST).is_empty());

        let mixed = upstream(vec![
            a("mixed.test.", [10, 0, 0, 1]),
            a("mixed.test.", [198, 18, 0, 7]),
        ]);
        let (dns, _) = resolver(ResolverConfig::upstream(vec![mixed]));
        let reply = parse(dns.answer(&query("mixed.test.", RecordType::A), Carrier::Udp));
        assert_eq!(reply.answers.len(), 1);
    }

    #[test]
    fn the_hosts_file_comes_first_and_aaaa_is_empty() {
        let config = ResolverConfig {
            hosts: Hosts::parse("198.18.0.5 files.test\n127.0.0.1 localhost\n"),
            // Nothing listens here: a query that reached it would fail.
            upstreams: vec!["127.0.0.1:9".parse().expect("address")],
        };
        let (dns, _) = resolver(config);
        let reply = parse(dns.answer(&query("files.test.", RecordType::A), Carrier::Udp));
        assert_eq!(reply.answers.len(), 1);
        let reply = parse(dns.answer(&query("localhost.", RecordType::A), Carrier::Udp));
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        let reply = parse(dns.answer(&query("files.test.", RecordType::AAAA), Carrier::Udp));
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty());
    }

    #[test]
    fn garbage_and_oversized_queries_get_nothing_and_odd_ones_a_code() {
        let (dns, _) = resolver(ResolverConfig::upstream(vec![]));
        assert!(dns.answer(b"\x00\x01garbage", Carrier::Udp).is_none());
        let mut long = query("example.test.", RecordType::A);
        long.resize(QUERY_LIMIT + 1, 0);
        let reply = parse(dns.answer(&long, Carrier::Udp));
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert_eq!(reply.metadata.id, u16::from_be_bytes([long[0], long[1]]));
        // A long answer, not a query, gets nothing.
        long[2] |= 0x80;
        assert!(dns.answer(&long, Carrier::Udp).is_none());
        let reply = parse(dns.answer(&query("example.test.", RecordType::ANY), Carrier::Udp));
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        let mut two = Message::query();
        for name in ["a.test.", "b.test."] {
            two.queries.push(Query::query(
                Name::from_ascii(name).expect("name"),
                RecordType::A,
            ));
        }
        let reply = parse(dns.answer(&two.to_vec().expect("encode"), Carrier::Udp));
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        // No upstream left to ask: a failure the guest can tell.
        let reply = parse(dns.answer(&query("example.test.", RecordType::A), Carrier::Udp));
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn a_long_udp_answer_is_truncated_so_the_guest_asks_over_tcp() {
        let many: Vec<Record> = (0..60).map(|i| a("big.test.", [198, 18, 1, i])).collect();
        let server = upstream(many);
        let (dns, _) = resolver(ResolverConfig::upstream(vec![server]));
        let reply = parse(dns.answer(&query("big.test.", RecordType::A), Carrier::Udp));
        assert!(reply.metadata.truncation);
        assert!(reply.answers.is_empty());
    }

    #[test]
    fn an_allowlist_resolves_only_its_names_and_counts_the_rest() {
        let server = upstream(vec![a("allowed.test.", [198, 18, 1, 10])]);
        let config = ResolverConfig {
            hosts: Hosts::parse("198.18.0.5 files.test\n"),
            upstreams: vec![server],
        };
        let (dns, bindings, denials) =
            resolver_with(config, allowing(&["allowed.test", "*.rebind.test"]));
        // Names not allowed reach neither the hosts file nor an upstream,
        // whatever the type; the one upstream answers only allowed.test.
        for (name, kind) in [
            ("secret-data.exfil.denied.test.", RecordType::A),
            ("files.test.", RecordType::A),
            ("denied.test.", RecordType::AAAA),
            ("rebind.test.", RecordType::A),
        ] {
            let reply = parse(dns.answer(&query(name, kind), Carrier::Udp));
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NXDomain,
                "{name}"
            );
        }
        let reply = parse(dns.answer(&query("allowed.test.", RecordType::A), Carrier::Udp));
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(
            lock(&bindings).names([198, 18, 1, 10].into()),
            ["allowed.test"]
        );
        assert_eq!(denials.snapshot().dns, 4);

        let lo = upstream(vec![a("lo.rebind.test.", [127, 0, 0, 1])]);
        let (dns, _, denials) = resolver_with(
            ResolverConfig::upstream(vec![lo]),
            allowing(&["*.rebind.test"]),
        );
        let reply = parse(dns.answer(&query("lo.rebind.test.", RecordType::A), Carrier::Udp));
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(denials.snapshot().rebind, 1);
    }

    #[test]
    fn connections_resolve_names_afresh_and_only_to_reachable_addresses() {
        let server = upstream(vec![
            cname("www.allowed.test.", "edge.allowed.test."),
            a("edge.allowed.test.", [198, 18, 1, 10]),
            a("other.test.", [198, 18, 9, 9]),
        ]);
        let (dns, bindings, _) = resolver_with(
            ResolverConfig::upstream(vec![server]),
            allowing(&["*.allowed.test"]),
        );
        assert_eq!(
            dns.addresses_for("www.allowed.test"),
            [Ipv4Addr::new(198, 18, 1, 10)]
        );
        // What the stack resolves for itself binds nothing for the guest.
        assert!(lock(&bindings).names([198, 18, 1, 10].into()).is_empty());

        let private = upstream(vec![a("private.rebind.test.", [10, 0, 0, 5])]);
        let (dns, _, denials) = resolver_with(
            ResolverConfig::upstream(vec![private]),
            allowing(&["*.rebind.test"]),
        );
        assert!(dns.addresses_for("private.rebind.test").is_empty());
        assert_eq!(denials.snapshot().rebind, 1);
    }

    #[test]
    fn bindings_are_bounded() {
        let mut bindings = Bindings::default();
        for i in 0..(BINDINGS_LIMIT as u32 + 10) {
            bindings.bind(Ipv4Addr::from(0xc612_0000 + i), "many.test");
        }
        assert!(bindings.names(Ipv4Addr::from(0xc612_0000)).is_empty());
        assert_eq!(
            bindings.names(Ipv4Addr::from(0xc612_0000 + 20)),
            ["many.test"]
        );
    }

    /// A one-shot upstream that answers `answers` and hands back the raw
    /// query it received.
    fn recording_upstream(
        answers: Vec<Record>,
    ) -> (SocketAddr, std::sync::mpsc::Receiver<Vec<u8>>) {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let address = socket.local_addr().expect("address");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            let Ok((n, from)) = socket.recv_from(&mut buffer) else {
                return;
            };
            let _ = tx.send(buffer[..n].to_vec());
            let request = Message::from_vec(&buffer[..n]).expect("parse");
            let mut reply = reply_to(&request, ResponseCode::NoError);
            reply.answers = answers;
            let _ = socket.send_to(&reply.to_vec().expect("encode"), from);
        });
        (address, rx)
    }

    /// A query for the raw `labels`, as a guest may write them.
    fn raw_query(labels: &[&[u8]], kind: u16) -> Vec<u8> {
        let mut bytes = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in labels {
            bytes.push(u8::try_from(label.len()).expect("label"));
            bytes.extend_from_slice(label);
        }
        bytes.push(0);
        bytes.extend_from_slice(&kind.to_be_bytes());
        bytes.extend_from_slice(&[0, 1]);
        bytes
    }

    /// Hostile: the letter case of an allowed name (DNS 0x20) is a bit per
    /// letter the guest chooses; the upstream must see only the name.
    #[test]
    fn hostile_the_guest_case_of_an_allowed_name_does_not_leave_the_host() {
        let (server, asked) = recording_upstream(vec![a("allowed.test.", [198, 18, 0, 10])]);
        let (dns, _, _) = resolver_with(
            ResolverConfig::upstream(vec![server]),
            allowing(&["allowed.test"]),
        );
        let reply = parse(dns.answer(&query("AlLoWeD.tEsT.", RecordType::A), Carrier::Udp));
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        let sent = asked
            .recv_timeout(Duration::from_secs(2))
            .expect("asked upstream");
        let sent = Message::from_vec(&sent).expect("parse");
        assert_eq!(
            sent.queries[0].name().to_string(),
            "allowed.test.",
            "the upstream saw the guest's letter case"
        );
    }

    /// Hostile: a label holding a dot, a backslash or non-ASCII bytes is
    /// never matched as an allowed name, nor asked upstream.
    #[test]
    fn hostile_labels_with_dots_escapes_or_unicode_are_not_allowed_names() {
        let (server, asked) = recording_upstream(vec![]);
        let (dns, _, _) = resolver_with(
            ResolverConfig::upstream(vec![server]),
            allowing(&["*.allowed.test", "allowed.test"]),
        );
        for labels in [
            &[&b"secret.x"[..], b"allowed", b"test"][..],
            &[b"allowed.test"],
            &[b"x", b"allowed\\", b"test"],
            &[b"x\0", b"allowed", b"test"],
            &[b"x", "allowed\u{3002}test".as_bytes()],
            &["exfil\u{3002}allowed".as_bytes(), b"test"],
            &["\u{ff41}llowed".as_bytes(), b"test"],
            &[b"x", b"allowed", b"test", "\u{00ad}".as_bytes()],
            &[
                &[b'a'; 63][..],
                &[b'b'; 63],
                &[b'c'; 63],
                &[b'd'; 50],
                b"allowed",
                b"test",
            ],
        ] {
            let reply = dns.answer(&raw_query(labels, 16), Carrier::Udp);
            if let Some(reply) = reply {
                let reply = Message::from_vec(&reply).expect("parse");
                assert_ne!(
                    reply.metadata.response_code,
                    ResponseCode::NoError,
                    "{labels:?}"
                );
            }
        }
        assert!(
            asked.recv_timeout(Duration::from_millis(300)).is_err(),
            "a hostile name was asked upstream"
        );
    }
}

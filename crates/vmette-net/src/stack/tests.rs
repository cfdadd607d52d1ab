//! The loop against a hostile guest, turned by hand: a guest-side smoltcp
//! interface (or hand-built frames) on the other end of the socket pair.
//! Each test is an attack the hostile review of the stack found, held.

use std::os::fd::{AsRawFd, OwnedFd};

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::wire::{EthernetRepr, IpAddress, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber};

use super::*;
use crate::addressing::GUEST_MAC;
use crate::dns::Bindings;
use crate::resolver::ResolverConfig;

/// The guest's NIC: its end of the pair, which it may stop reading.
struct GuestNic {
    socket: UnixDatagram,
    reading: bool,
    frame_limit: usize,
}

struct GuestRx(Vec<u8>);
struct GuestTx<'a>(&'a UnixDatagram);

impl phy::RxToken for GuestRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for GuestTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        let _ = self.0.send(&frame);
        result
    }
}

impl phy::Device for GuestNic {
    type RxToken<'a> = GuestRx;
    type TxToken<'a> = GuestTx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(GuestRx, GuestTx<'_>)> {
        if !self.reading {
            return None;
        }
        let mut frame = vec![0; 70_000];
        let n = self.socket.recv(&mut frame).ok()?;
        frame.truncate(n);
        Some((GuestRx(frame), GuestTx(&self.socket)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<GuestTx<'_>> {
        Some(GuestTx(&self.socket))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.frame_limit;
        caps
    }
}

struct Guest {
    nic: GuestNic,
    iface: Interface,
    sockets: SocketSet<'static>,
}

impl Guest {
    fn poll(&mut self) {
        self.iface.poll(now(), &mut self.nic, &mut self.sockets);
    }

    fn send_raw(&self, frame: &[u8]) {
        self.nic.socket.send(frame).expect("send a frame");
    }

    /// A TCP socket of the guest's, connecting to `to` from `port`.
    fn connect(&mut self, to: SocketAddrV4, port: u16, rx: usize, tx: usize) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx]),
            tcp::SocketBuffer::new(vec![0; tx]),
        );
        socket
            .connect(self.iface.context(), to, port)
            .expect("connect");
        self.sockets.add(socket)
    }

    fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }
}

fn policy(host_ports: Vec<u16>, outbound: bool) -> Policy {
    Policy {
        gateway: GATEWAY,
        egress: if outbound {
            vmette_core::Egress::Open
        } else {
            vmette_core::Egress::Closed
        },
        host_ports,
    }
}

/// A stack and a guest whose frames are at most `frame_limit` bytes.
fn lab(policy: Policy, frame_limit: usize) -> (Stack, Handle, Guest) {
    let (stack_end, guest_end) = UnixDatagram::pair().expect("pair");
    stack_end.set_nonblocking(true).expect("non-blocking");
    guest_end.set_nonblocking(true).expect("non-blocking");
    // Nothing listens on the discard port: no query gets an answer.
    let upstream = ResolverConfig::upstream(vec!["127.0.0.1:9".parse().expect("address")]);
    let bindings = Arc::new(Mutex::new(Bindings::default()));
    let denials = Arc::new(Denials::default());
    let dns = Dns::new(
        upstream,
        policy.clone(),
        Arc::clone(&bindings),
        Arc::clone(&denials),
    );
    let (stack, handle) = Stack::new(
        Frames::new(OwnedFd::from(stack_end), MTU),
        policy,
        dns,
        bindings,
        denials,
    )
    .expect("stack");
    let mut nic = GuestNic {
        socket: guest_end,
        reading: true,
        frame_limit,
    };
    let mut config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
    config.random_seed = 7;
    let mut iface = Interface::new(config, &mut nic, now());
    iface.update_ip_addrs(|addresses| {
        let _ = addresses.push(IpCidr::new(GUEST.into(), PREFIX_LEN));
    });
    let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
    let guest = Guest {
        nic,
        iface,
        sockets: SocketSet::new(Vec::new()),
    };
    (stack, handle, guest)
}

fn full_size() -> usize {
    usize::from(MTU) + ETHERNET_HEADER
}

/// Turns the loop and the guest for `time`.
fn run_for(stack: &mut Stack, guest: &mut Guest, time: Duration) {
    let start = Instant::now();
    while start.elapsed() < time {
        guest.poll();
        stack.turn().expect("turn");
    }
}

/// A TCP segment from the guest, built by hand.
fn segment(
    dst_mac: [u8; 6],
    port: u16,
    to: SocketAddrV4,
    control: TcpControl,
    seq: i32,
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: port,
        dst_port: to.port(),
        control,
        seq_number: TcpSeqNumber(seq),
        ack_number: None,
        window_len: 65535,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: GUEST,
        dst_addr: *to.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let ethernet = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0; ethernet.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    ethernet.emit(&mut eth);
    let mut packet = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    let mut tcp_packet = TcpPacket::new_unchecked(packet.payload_mut());
    tcp.emit(
        &mut tcp_packet,
        &IpAddress::Ipv4(GUEST),
        &IpAddress::Ipv4(*to.ip()),
        &ChecksumCapabilities::default(),
    );
    frame
}

fn dns_query(name: &str, kind: hickory_proto::rr::RecordType) -> Vec<u8> {
    let mut message = hickory_proto::op::Message::query();
    message.queries.push(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii(name).expect("name"),
        kind,
    ));
    let query = message.to_vec().expect("encode");
    let mut framed = u16::try_from(query.len())
        .expect("short")
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(&query);
    framed
}

#[test]
fn a_guest_that_stops_reading_does_not_spin_the_loop() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("non-blocking");
    let port = listener.local_addr().expect("address").port();
    // A small MSS: a flow's data no longer fits the 64 frames of the queue.
    let (mut stack, _handle, mut guest) = lab(policy(vec![port], false), 576 + ETHERNET_HEADER);
    let socket = guest.connect(SocketAddrV4::new(GATEWAY, port), 40000, 4 << 20, 4096);
    let mut host = None;
    let start = Instant::now();
    while host.is_none() || guest.tcp(socket).state() != tcp::State::Established {
        assert!(start.elapsed() < Duration::from_secs(5), "no connection");
        guest.poll();
        stack.turn().expect("turn");
        host = host.or_else(|| listener.accept().ok().map(|(stream, _)| stream));
    }
    let mut host = host.expect("accepted");
    std::thread::spawn(move || {
        let chunk = vec![7u8; 1 << 16];
        for _ in 0..256 {
            if host.write_all(&chunk).is_err() {
                return;
            }
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    guest.nic.reading = false;
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(500) {
        stack.turn().expect("turn");
    }
    let (start, mut turns) = (Instant::now(), 0);
    while start.elapsed() < Duration::from_secs(1) {
        stack.turn().expect("turn");
        turns += 1;
    }
    assert!(turns < 100, "the loop turned {turns} times in a second");
}

#[test]
fn a_dns_connection_that_never_reads_holds_one_answer() {
    let (mut stack, _handle, mut guest) = lab(policy(vec![], false), full_size());
    let socket = guest.connect(SocketAddrV4::new(GATEWAY, 53), 40001, 512, 1 << 20);
    // ANY is refused at once, with no upstream to wait for.
    let name = format!(
        "{}.{}.{}.test.",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63)
    );
    let query = dns_query(&name, hickory_proto::rr::RecordType::ANY);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        let s = guest.tcp(socket);
        while s.can_send() && s.send_capacity() - s.send_queue() >= query.len() {
            s.send_slice(&query).expect("send");
        }
        guest.poll();
        stack.turn().expect("turn");
    }
    let held: usize = stack
        .tcp
        .values()
        .map(|flow| match &flow.kind {
            FlowKind::Dns { outbox, .. } => outbox.len(),
            _ => 0,
        })
        .sum();
    assert!(held <= 2 + 1024, "the stack holds {held} bytes of answers");
}

#[test]
fn a_query_that_is_not_one_closes_its_dns_connection() {
    let (mut stack, _handle, mut guest) = lab(policy(vec![], false), full_size());
    let socket = guest.connect(SocketAddrV4::new(GATEWAY, 53), 40002, 65536, 65536);
    let mut sent = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) && !(sent && stack.tcp.is_empty()) {
        if !sent && guest.tcp(socket).may_send() {
            guest
                .tcp(socket)
                .send_slice(&[0, 3, b'x', b'y', b'z'])
                .expect("send");
            sent = true;
        }
        guest.poll();
        stack.turn().expect("turn");
    }
    assert!(stack.tcp.is_empty(), "a flow is left");
}

#[test]
fn a_syn_smoltcp_would_drop_leaves_no_flow_and_connections_do_not_cross() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("non-blocking");
    let port = listener.local_addr().expect("address").port();
    let (mut stack, _handle, mut guest) = lab(policy(vec![port], false), full_size());
    let to = SocketAddrV4::new(GATEWAY, port);
    // To another MAC, and from port 0: smoltcp would drop both.
    guest.send_raw(&segment(
        [2, 0, 0, 0, 0, 0x99],
        1234,
        to,
        TcpControl::Syn,
        1000,
    ));
    guest.send_raw(&segment(GATEWAY_MAC, 0, to, TcpControl::Syn, 2000));
    let mut accepted = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        stack.turn().expect("turn");
        accepted.extend(listener.accept().ok().map(|(stream, _)| stream));
    }
    assert!(stack.tcp.is_empty(), "flows were left");
    assert!(
        accepted.is_empty(),
        "the host was connected for a dropped SYN"
    );

    let socket = guest.connect(to, 40003, 65536, 65536);
    let mut wrote = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if !wrote && guest.tcp(socket).can_send() {
            guest.tcp(socket).send_slice(b"from 40003").expect("send");
            wrote = true;
        }
        guest.poll();
        stack.turn().expect("turn");
        accepted.extend(listener.accept().ok().map(|(stream, _)| stream));
    }
    assert_eq!(accepted.len(), 1);
    let mut got = [0u8; 16];
    accepted[0].set_nonblocking(false).expect("blocking");
    let n = accepted[0].read(&mut got).expect("read");
    assert_eq!(&got[..n], b"from 40003");
}

#[test]
fn a_new_connection_waits_while_the_guest_is_behind() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("non-blocking");
    let port = listener.local_addr().expect("address").port();
    let (mut stack, _handle, guest) = lab(policy(vec![port], false), full_size());
    // The guest has not read for a while: its end of the pair is full, and
    // so is the stack's queue of frames to it.
    let fd = stack.frames.fd().as_raw_fd();
    while nix::sys::socket::send(fd, &[0u8; 1000], nix::sys::socket::MsgFlags::MSG_DONTWAIT).is_ok()
    {
    }
    for _ in 0..64 {
        stack.frames.push(vec![0; 60]);
    }
    guest.send_raw(&segment(
        GATEWAY_MAC,
        5555,
        SocketAddrV4::new(GATEWAY, port),
        TcpControl::Syn,
        1,
    ));
    let mut host = None;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        stack.turn().expect("turn");
        host = host.or_else(|| listener.accept().ok().map(|(stream, _)| stream));
    }
    let mut host = host.expect("the host connection");
    host.set_nonblocking(true).expect("non-blocking");
    let read = host.read(&mut [0u8; 16]);
    assert!(
        !matches!(read, Ok(0)),
        "the host saw the guest close before it connected"
    );
}

#[test]
fn the_hosts_own_addresses_are_refused() {
    // The address this host would use outward, if it has one.
    let probe = UdpSocket::bind("0.0.0.0:0").expect("bind");
    let own = probe
        .connect("198.51.100.1:9")
        .and_then(|()| probe.local_addr())
        .ok()
        .and_then(|a| match a.ip() {
            std::net::IpAddr::V4(ip) if crate::cidr::denied(ip.into()).is_none() => Some(ip),
            _ => None,
        });
    let Some(own) = own else {
        // Only private or no addresses here: the ranges deny them already.
        assert!(crate::policy::is_host_address(
            std::net::Ipv4Addr::LOCALHOST
        ));
        return;
    };
    let listener = TcpListener::bind("0.0.0.0:0").expect("bind");
    listener.set_nonblocking(true).expect("non-blocking");
    let port = listener.local_addr().expect("address").port();
    let (mut stack, _handle, mut guest) = lab(policy(vec![], true), full_size());
    guest.connect(SocketAddrV4::new(own, port), 40010, 65536, 65536);
    run_for(&mut stack, &mut guest, Duration::from_secs(2));
    assert!(
        listener.accept().is_err(),
        "the guest reached a service at {own}:{port}"
    );
}

#[test]
fn without_outbound_dns_asks_no_upstream() {
    let upstream = UdpSocket::bind("127.0.0.1:0").expect("bind");
    upstream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let dns = Dns::new(
        ResolverConfig::upstream(vec![upstream.local_addr().expect("address")]),
        policy(vec![], false),
        Arc::new(Mutex::new(Bindings::default())),
        Arc::new(Denials::default()),
    );
    let query = dns_query("c2VjcmV0.exfil.test.", hickory_proto::rr::RecordType::TXT);
    let answer = dns
        .answer(&query[2..], crate::dns::Carrier::Udp)
        .expect("an answer");
    let answer = hickory_proto::op::Message::from_vec(&answer).expect("parse");
    assert_eq!(
        answer.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
    assert!(
        upstream.recv(&mut [0u8; 512]).is_err(),
        "the upstream was asked"
    );
}

/// A guest under `--allow-host allowed.test` whose DNS bound
/// 198.18.1.10 to allowed.test.
fn allowlist_lab() -> (Stack, Handle, Guest) {
    let policy = Policy {
        gateway: GATEWAY,
        egress: vmette_core::Egress::Allowlist(vmette_core::Allowlist {
            hosts: vec!["allowed.test".parse().expect("rule")],
            cidrs: Vec::new(),
        }),
        host_ports: Vec::new(),
    };
    let (stack, handle, guest) = lab(policy, full_size());
    lock(&stack.bindings).bind(ALLOWED, "allowed.test");
    (stack, handle, guest)
}

const ALLOWED: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 1, 10);

/// Connects to `to`, sends `bytes` once connected, and turns the loop
/// for a second: whether the connection was ever established.
fn send_and_wait(stack: &mut Stack, guest: &mut Guest, to: SocketAddrV4, bytes: &[u8]) -> bool {
    let handle = guest.connect(to, 40100, 65536, 65536);
    let mut established = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        guest.poll();
        stack.turn().expect("turn");
        let socket = guest.tcp(handle);
        if socket.state() == tcp::State::Established && !established {
            established = true;
            socket.send_slice(bytes).expect("send");
        }
    }
    assert_eq!(
        guest.tcp(handle).state(),
        tcp::State::Closed,
        "the connection to {to} was not closed"
    );
    guest.sockets.remove(handle);
    established
}

#[test]
fn an_allowed_address_is_read_before_anything_opens_and_refusals_count_once() {
    let (mut stack, _handle, mut guest) = allowlist_lab();
    let https = SocketAddrV4::new(ALLOWED, 443);
    let hello = crate::inspect::tls::tests::named(b"denied.test");
    assert!(send_and_wait(&mut stack, &mut guest, https, &hello));
    assert_eq!(stack.denials.snapshot().sni, 1);

    let http = SocketAddrV4::new(ALLOWED, 80);
    let request = b"GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n";
    assert!(send_and_wait(&mut stack, &mut guest, http, request));
    assert_eq!(stack.denials.snapshot().host, 1);

    // Another port of the allowed address, and any port of another one,
    // are refused at the SYN.
    let ssh = SocketAddrV4::new(ALLOWED, 22);
    assert!(!send_and_wait(&mut stack, &mut guest, ssh, b""));
    let raw = SocketAddrV4::new([198, 18, 2, 10].into(), 443);
    assert!(!send_and_wait(&mut stack, &mut guest, raw, b""));
    let counts = stack.denials.snapshot();
    assert_eq!((counts.port, counts.ip), (1, 1), "{counts}");
    assert_eq!(counts.total(), 4, "{counts}");
    assert!(stack.tcp.is_empty(), "a refused flow was kept");
}

#[test]
fn a_connection_that_names_nothing_in_time_is_closed() {
    let (mut stack, _handle, mut guest) = allowlist_lab();
    let https = SocketAddrV4::new(ALLOWED, 443);
    // Half a ClientHello, then silence.
    let hello = crate::inspect::tls::tests::named(b"allowed.test");
    let handle = guest.connect(https, 40200, 65536, 65536);
    let start = Instant::now();
    let mut sent = false;
    while start.elapsed() < Duration::from_secs(1) {
        guest.poll();
        stack.turn().expect("turn");
        let socket = guest.tcp(handle);
        if socket.state() == tcp::State::Established && !sent {
            sent = true;
            socket.send_slice(&hello[..20]).expect("send");
        }
    }
    assert!(sent);
    for flow in stack.tcp.values_mut() {
        if let FlowKind::Inspected(inspection) = &mut flow.kind {
            inspection.age(Duration::from_secs(11));
        }
    }
    // The stack resets the guest's connection and forgets it.
    stack.turn().expect("turn");
    let mut frame = [0u8; 2000];
    let mut reset = false;
    while let Ok(n) = guest.nic.socket.recv(&mut frame) {
        let Ok(ip) = Ipv4Packet::new_checked(&frame[ETHERNET_HEADER..n]) else {
            continue;
        };
        let Ok(segment) = TcpPacket::new_checked(ip.payload()) else {
            continue;
        };
        reset |= segment.rst() && segment.src_port() == 443 && segment.dst_port() == 40200;
    }
    assert!(reset, "no reset for the silent connection");
    assert!(stack.tcp.is_empty());
    assert_eq!(stack.denials.snapshot().sni, 1);
}

/// Hostile: on an address bound to an allowed name, the name a
/// connection names must itself be allowed: an address literal, a
/// lookalike, or a Host with the allowed name only in its port or user
/// part opens nothing, and each refusal counts once.
#[test]
fn hostile_names_on_an_allowed_address_are_refused() {
    let (mut stack, _handle, mut guest) = allowlist_lab();
    let https = SocketAddrV4::new(ALLOWED, 443);
    for name in [
        &b"198.18.1.10"[..],
        b"allowed.test.evil.test",
        b"evil-allowed.test",
        b"allowed.test\0.evil.test",
    ] {
        let hello = crate::inspect::tls::tests::named(name);
        assert!(send_and_wait(&mut stack, &mut guest, https, &hello));
    }
    assert_eq!(stack.denials.snapshot().sni, 4);

    let http = SocketAddrV4::new(ALLOWED, 80);
    for request in [
        &b"GET / HTTP/1.1\r\nHost: 198.18.1.10\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: evil.test:80@allowed.test\r\n\r\n",
        b"GET http://evil.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: evil.test\r\n\r\n",
        b"CONNECT evil.test:443 HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
    ] {
        assert!(send_and_wait(&mut stack, &mut guest, http, request));
    }
    let counts = stack.denials.snapshot();
    assert_eq!(counts.host, 5, "{counts}");
    assert_eq!(counts.total(), 9, "{counts}");
    assert!(stack.tcp.is_empty(), "a refused flow was kept");
}

/// An IPv4 packet of a UDP datagram from the guest's `port` to `to`.
fn guest_udp(port: u16, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp = smoltcp::wire::UdpRepr {
        src_port: port,
        dst_port: to.port(),
    };
    let ip = Ipv4Repr {
        src_addr: GUEST,
        dst_addr: *to.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let mut bytes = vec![0; ip.buffer_len() + ip.payload_len];
    let mut packet = Ipv4Packet::new_unchecked(&mut bytes);
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    let mut datagram = UdpPacket::new_unchecked(packet.payload_mut());
    udp.emit(
        &mut datagram,
        &GUEST.into(),
        &(*to.ip()).into(),
        payload.len(),
        |buffer| buffer.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    bytes
}

/// Hostile: a refused UDP flow counts once, even past the memory of
/// refused flows: a guest that fills it must not have every datagram of
/// one more flow counted.
#[test]
fn hostile_refused_udp_flows_count_once_past_the_memory() {
    let (mut stack, _handle, _guest) = allowlist_lab();
    let to = SocketAddrV4::new([198, 18, 9, 9].into(), 9000);
    let send = |stack: &mut Stack, port: usize| {
        let bytes = guest_udp(20000 + u16::try_from(port).expect("port"), to, b"x");
        let packet = Ipv4Packet::new_checked(&bytes[..]).expect("packet");
        stack.classify_udp(&packet);
    };
    for port in 0..REFUSED_UDP_MEMORY {
        send(&mut stack, port);
    }
    for _ in 0..100 {
        send(&mut stack, REFUSED_UDP_MEMORY);
    }
    let counted = stack.denials.snapshot().udp;
    assert_eq!(
        counted,
        u64::try_from(REFUSED_UDP_MEMORY + 1).expect("count"),
        "{counted} refusals counted for {} flows",
        REFUSED_UDP_MEMORY + 1
    );
    assert!(stack.refused_udp.len() <= REFUSED_UDP_MEMORY);
}

/// Hostile: a query over the size bound is refused over TCP as over
/// UDP, and counted as `dns` (docs/network.md: "A query over 1024 bytes
/// is refused (REFUSED) unread"), not just reset uncounted.
#[test]
fn hostile_an_oversized_query_over_tcp_is_counted() {
    let (mut stack, _handle, mut guest) = allowlist_lab();
    let socket = guest.connect(SocketAddrV4::new(GATEWAY, 53), 40003, 65536, 65536);
    let mut sent = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) && !(sent && stack.tcp.is_empty()) {
        if !sent && guest.tcp(socket).may_send() {
            let len = u16::try_from(QUERY_LIMIT + 1).expect("length");
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend(std::iter::repeat_n(0u8, QUERY_LIMIT + 1));
            guest.tcp(socket).send_slice(&framed).expect("send");
            sent = true;
        }
        guest.poll();
        stack.turn().expect("turn");
    }
    assert!(stack.tcp.is_empty(), "a flow is left");
    assert_eq!(
        stack.denials.snapshot().dns,
        1,
        "the oversized query was not counted"
    );
}

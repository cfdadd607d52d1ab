//! The stack's loop: one thread per VM that owns every socket of its
//! network and waits on all of them with `poll(2)`.
//!
//! Frames from the guest are classified before smoltcp sees any: ARP and
//! pings to the gateway pass; UDP is translated here (DNS to the resolver,
//! the rest to host sockets); a TCP SYN opens a flow only once
//! [`Policy::decide`] allowed it and the host connection is up, so the
//! guest's SYN is answered by the real outcome (a SYN-ACK, or a reset)
//! and smoltcp holds a socket only for a connection that exists on both
//! sides. Everything else (IPv6, fragments, spoofed sources) is dropped.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpCidr,
    IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};

use crate::addressing::{GATEWAY, GATEWAY_MAC, GUEST, MTU, PREFIX_LEN};
use crate::denials::{Denials, Reason};
use crate::dns::{Bindings, Carrier, Dns, QUERY_LIMIT};
use crate::frames::{Frames, ETHERNET_HEADER};
use crate::policy::{Policy, Transport, Verdict};
use crate::throttle::Throttle;
use crate::wire;
use crate::{connected_udp, lock};

/// Most TCP connections a guest has open at once (pending, open, closing,
/// DNS and published ones together). Each holds two socket buffers.
pub const TCP_FLOWS_LIMIT: usize = 256;
/// Most UDP flows (guest port and destination) a guest has at once.
pub const UDP_FLOWS_LIMIT: usize = 256;
/// A UDP flow with no datagram either way for this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// How long a host connection may take before the guest gets a reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long smoltcp waits for the guest to acknowledge what it sent.
const TCP_PATIENCE: Duration = Duration::from_secs(60);
/// Guest to host: what smoltcp buffers of a connection's incoming bytes.
const TCP_RX_BUFFER: usize = 256 << 10;
/// Host to guest: what smoltcp keeps in flight and queued.
const TCP_TX_BUFFER: usize = 512 << 10;
/// The longest a DNS-over-TCP connection from the guest stays open.
const DNS_TCP_PATIENCE: Duration = Duration::from_secs(30);
/// DNS queries waiting for a worker at most; more are dropped (the guest
/// asks again).
const DNS_QUEUE: usize = 64;
/// Threads answering DNS for one VM: a slow upstream holds up only one.
const DNS_WORKERS: usize = 2;
/// Frames read from the guest per turn of the loop, so that a flood
/// cannot starve the host side.
const FRAMES_PER_TURN: usize = 256;
/// The longest the loop sleeps, so that timeouts are looked at.
const HOUSEKEEPING: Duration = Duration::from_millis(500);
/// Host ports of the gateway's own connections to published guest ports.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 32768..=60999;
/// Refused UDP flows remembered, so that each is counted once.
const REFUSED_UDP_MEMORY: usize = 256;

/// What the owner of the stack asks of its loop.
pub enum Command {
    /// Serve this listener's connections on the guest's port.
    Publish {
        listener: TcpListener,
        guest_port: u16,
    },
    /// Close the listener on this address and its connections; answers
    /// whether there was one.
    Unpublish {
        host: SocketAddr,
        done: Sender<bool>,
    },
}

/// Wakes the loop from another thread.
#[derive(Clone)]
pub struct Waker(Arc<UnixDatagram>);

impl Waker {
    /// Makes the loop's next `poll` return.
    pub fn wake(&self) {
        // A full queue already holds a wake-up.
        let _ = self.0.send(&[1]);
    }
}

/// The pieces that outlive a loop's construction: how to reach it.
pub struct Handle {
    pub commands: Sender<Command>,
    pub waker: Waker,
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

type FlowId = u64;

/// A guest connection's key: its source port and destination.
type FlowKey = (u16, SocketAddrV4);

enum FlowKind {
    /// To a host the guest named, through a host socket.
    Outbound(FlowKey),
    /// From a host client to a published guest port.
    Published(SocketAddr),
    /// To a name the stack reads from the connection's first bytes.
    Inspected(Box<Inspection>),
    /// DNS over TCP, answered by the stack.
    Dns {
        key: FlowKey,
        inbox: Vec<u8>,
        outbox: Vec<u8>,
        asked: bool,
        opened: Instant,
    },
}

struct TcpFlow {
    kind: FlowKind,
    /// The smoltcp socket, once the host side is connected.
    socket: Option<SocketHandle>,
    host: Option<TcpStream>,
    /// The guest's SYN, held until the host connection is up: the frame,
    /// its sequence number and payload length, and when it came.
    held: Option<HeldSyn>,
    /// The host side is up (or there is none): the held SYN may go to
    /// smoltcp.
    connected: bool,
    host_readable: bool,
    host_write_blocked: bool,
    host_eof: bool,
    guest_eof: bool,
}

impl FlowKind {
    /// The guest connection's key, for the flows the guest opened.
    fn key(&self) -> Option<FlowKey> {
        match self {
            FlowKind::Outbound(key) | FlowKind::Dns { key, .. } => Some(*key),
            FlowKind::Inspected(inspection) => Some(inspection.key),
            FlowKind::Published(_) => None,
        }
    }
}

struct HeldSyn {
    frame: Vec<u8>,
    seq: smoltcp::wire::TcpSeqNumber,
    len: usize,
    since: Instant,
}

struct UdpFlow {
    socket: UdpSocket,
    last_used: Instant,
}

struct Listener {
    listener: TcpListener,
    host: SocketAddr,
    guest_port: u16,
}

/// What a DNS worker is asked.
enum DnsJob {
    /// The guest's query, to answer.
    Query {
        query: Vec<u8>,
        carrier: Carrier,
        reply_to: ReplyTo,
    },
    /// The addresses of a name an inspected connection goes to.
    Resolve { name: String, flow: FlowId },
}

#[derive(Clone, Copy)]
enum ReplyTo {
    Udp { server: SocketAddrV4, port: u16 },
    Tcp(FlowId),
}

enum DnsDone {
    Answer {
        /// `None` for bytes that were not a query the stack answers.
        answer: Option<Vec<u8>>,
        reply_to: ReplyTo,
    },
    Resolved {
        flow: FlowId,
        addresses: Vec<std::net::Ipv4Addr>,
    },
}

/// Where a ready file descriptor belongs.
#[derive(Clone, Copy)]
enum Target {
    Frames,
    Wake,
    Listener(usize),
    Tcp(FlowId),
    Udp(FlowKey),
}

/// One VM's network: the loop's state.
pub struct Stack {
    frames: Frames,
    iface: Interface,
    sockets: SocketSet<'static>,
    policy: Policy,
    bindings: Arc<Mutex<Bindings>>,
    denials: Arc<Denials>,
    /// UDP flows refused lately, with when: each is counted once.
    refused_udp: HashMap<FlowKey, Instant>,
    tcp: HashMap<FlowId, TcpFlow>,
    tcp_keys: HashMap<FlowKey, FlowId>,
    udp: HashMap<FlowKey, UdpFlow>,
    listeners: Vec<Listener>,
    commands: Receiver<Command>,
    wake: Arc<UnixDatagram>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    dns_jobs: SyncSender<DnsJob>,
    dns_done: Receiver<DnsDone>,
    next_flow: FlowId,
    next_port: u16,
    buffer: Vec<u8>,
    refused_full: Throttle,
    dns_dropped: Throttle,
}

fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::now()
}

impl Stack {
    /// A stack on `frames` deciding by `policy` with the `bindings` of the
    /// guest's DNS answers, answering DNS with `dns`, counting what it
    /// refuses in `denials`; the handle reaches its loop once
    /// [`Stack::run`] runs.
    pub fn new(
        frames: Frames,
        policy: Policy,
        dns: Dns,
        bindings: Arc<Mutex<Bindings>>,
        denials: Arc<Denials>,
    ) -> io::Result<(Stack, Handle)> {
        let mut frames = frames;
        let mut config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = RandomState::new().hash_one(std::process::id());
        let mut iface = Interface::new(config, &mut frames, now());
        iface.update_ip_addrs(|addresses| {
            // The table has room for two; one is used.
            let _ = addresses.push(IpCidr::new(GATEWAY.into(), PREFIX_LEN));
        });
        // Answer for every destination: the guest's packets to anywhere
        // end here, and the classifier decides which smoltcp sees.
        iface.set_any_ip(true);

        let (wake, wake_end) = UnixDatagram::pair()?;
        wake.set_nonblocking(true)?;
        wake_end.set_nonblocking(true)?;
        let (commands_tx, commands) = mpsc::channel();
        let (dns_jobs, dns_done) = start_dns_workers(dns, Waker(Arc::new(wake_end.try_clone()?)))?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handle = Handle {
            commands: commands_tx,
            waker: Waker(Arc::new(wake_end)),
            stop: Arc::clone(&stop),
        };
        let stack = Stack {
            frames,
            iface,
            sockets: SocketSet::new(Vec::new()),
            policy,
            bindings,
            denials,
            refused_udp: HashMap::new(),
            tcp: HashMap::new(),
            tcp_keys: HashMap::new(),
            udp: HashMap::new(),
            listeners: Vec::new(),
            commands,
            wake: Arc::new(wake),
            stop,
            dns_jobs,
            dns_done,
            next_flow: 1,
            next_port: *EPHEMERAL.start(),
            buffer: vec![0; usize::from(MTU) + ETHERNET_HEADER + 1],
            refused_full: Throttle::new(),
            dns_dropped: Throttle::new(),
        };
        Ok((stack, handle))
    }

    /// Serves the VM until the owner stops the loop.
    pub fn run(mut self) {
        while !self.stop.load(std::sync::atomic::Ordering::Acquire) {
            if let Err(e) = self.turn() {
                tracing::warn!("the network stack stopped: {e}");
                break;
            }
        }
        tracing::debug!(
            frames_dropped = self.frames.dropped(),
            "the network stack is done"
        );
    }

    fn turn(&mut self) -> io::Result<()> {
        let mut delay = self
            .iface
            .poll_delay(now(), &self.sockets)
            .map_or(HOUSEKEEPING, |d| Duration::from_micros(d.total_micros()))
            .min(HOUSEKEEPING);
        // smoltcp's "now" cannot be acted on while no frame to the guest
        // fits; the frame socket's POLLOUT wakes the loop once one does.
        if !self.frames.has_tx_room() {
            delay = HOUSEKEEPING;
        }
        for (target, flags) in self.wait(delay)? {
            self.ready(target, flags)?;
        }
        self.take_commands();
        self.take_dns_answers();
        self.expire();
        self.iface.poll(now(), &mut self.frames, &mut self.sockets);
        self.open_connected();
        self.pump();
        self.iface.poll(now(), &mut self.frames, &mut self.sockets);
        self.reap();
        self.frames.flush()
    }

    /// Waits up to `delay` for any socket the loop watches.
    fn wait<'s>(&'s self, delay: Duration) -> io::Result<Vec<(Target, PollFlags)>> {
        let mut fds: Vec<PollFd<'s>> = Vec::new();
        let mut targets = Vec::new();
        let mut watch = |fd: BorrowedFd<'s>, flags: PollFlags, target: Target| {
            if !flags.is_empty() {
                fds.push(PollFd::new(fd, flags));
                targets.push(target);
            }
        };
        let mut frame_flags = PollFlags::empty();
        if self.frames.has_room() {
            frame_flags |= PollFlags::POLLIN;
        }
        if self.frames.has_output() {
            frame_flags |= PollFlags::POLLOUT;
        }
        watch(self.frames.fd(), frame_flags, Target::Frames);
        watch(self.wake.as_fd(), PollFlags::POLLIN, Target::Wake);
        for (index, listener) in self.listeners.iter().enumerate() {
            watch(
                listener.listener.as_fd(),
                PollFlags::POLLIN,
                Target::Listener(index),
            );
        }
        for (id, flow) in &self.tcp {
            let Some(host) = &flow.host else { continue };
            let flags = if flow.connecting() {
                PollFlags::POLLOUT
            } else if flow.held.is_some() {
                if flow.connected {
                    PollFlags::empty()
                } else {
                    PollFlags::POLLOUT
                }
            } else {
                let mut flags = PollFlags::empty();
                if !flow.host_eof && self.has_send_room(flow) {
                    flags |= PollFlags::POLLIN;
                }
                if flow.host_write_blocked {
                    flags |= PollFlags::POLLOUT;
                }
                flags
            };
            watch(host.as_fd(), flags, Target::Tcp(*id));
        }
        for (key, flow) in &self.udp {
            watch(flow.socket.as_fd(), PollFlags::POLLIN, Target::Udp(*key));
        }
        let millis = u16::try_from(delay.as_millis()).unwrap_or(u16::MAX);
        // Round up, so a sub-millisecond delay does not spin.
        let timeout = PollTimeout::from(millis.max(u16::from(!delay.is_zero())));
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
            Err(errno) => return Err(errno.into()),
        }
        Ok(fds
            .iter()
            .zip(targets)
            .filter_map(|(fd, target)| {
                fd.revents()
                    .filter(|flags| !flags.is_empty())
                    .map(|flags| (target, flags))
            })
            .collect())
    }

    fn has_send_room(&self, flow: &TcpFlow) -> bool {
        flow.socket.is_some_and(|handle| {
            let socket = self.sockets.get::<tcp::Socket>(handle);
            socket.may_send() && socket.send_queue() < socket.send_capacity()
        })
    }

    fn ready(&mut self, target: Target, flags: PollFlags) -> io::Result<()> {
        match target {
            Target::Frames => {
                if flags.contains(PollFlags::POLLIN) {
                    self.read_frames()?;
                }
            }
            Target::Wake => {
                let mut drain = [0u8; 64];
                while self.wake.recv(&mut drain).is_ok() {}
            }
            Target::Listener(index) => self.accept(index),
            Target::Tcp(id) => self.tcp_ready(id, flags),
            Target::Udp(key) => self.udp_ready(key),
        }
        Ok(())
    }

    fn read_frames(&mut self) -> io::Result<()> {
        let mut buffer = std::mem::take(&mut self.buffer);
        for _ in 0..FRAMES_PER_TURN {
            if !self.frames.has_room() {
                break;
            }
            match self.frames.read(&mut buffer) {
                Ok(Some(len)) => self.classify(&buffer[..len]),
                Ok(None) => break,
                Err(e) => {
                    self.buffer = buffer;
                    return Err(e);
                }
            }
        }
        self.buffer = buffer;
        Ok(())
    }

    /// Decides what becomes of one frame from the guest.
    fn classify(&mut self, frame: &[u8]) {
        let Ok(ethernet) = EthernetFrame::new_checked(frame) else {
            return;
        };
        // smoltcp drops what is not for its MAC; the classifier does first,
        // so that nothing it lets through is dropped behind its back.
        let to_gateway = ethernet.dst_addr() == EthernetAddress(GATEWAY_MAC);
        let broadcast = ethernet.dst_addr() == EthernetAddress::BROADCAST;
        match ethernet.ethertype() {
            EthernetProtocol::Arp if !to_gateway && !broadcast => {}
            EthernetProtocol::Ipv4 if !to_gateway => {}
            EthernetProtocol::Arp => {
                // Every address answers to ARP (any_ip), except the
                // guest's own, which the guest must not find taken.
                let asks_for_guest = ArpPacket::new_checked(ethernet.payload())
                    .is_ok_and(|arp| arp.target_protocol_addr() == GUEST.octets());
                if !asks_for_guest {
                    self.frames.rx.push_back(frame.to_vec());
                }
            }
            EthernetProtocol::Ipv4 => self.classify_ipv4(frame, ethernet.payload()),
            // No IPv6 on this link; anything else is not for the stack.
            _ => {}
        }
    }

    fn classify_ipv4(&mut self, frame: &[u8], packet: &[u8]) {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return;
        };
        if !ip.verify_checksum()
            || ip.src_addr() != GUEST
            || ip.more_frags()
            || ip.frag_offset() != 0
            || !is_unicast(ip.dst_addr())
        {
            return;
        }
        match ip.next_header() {
            IpProtocol::Icmp if ip.dst_addr() == GATEWAY => {
                self.frames.rx.push_back(frame.to_vec());
            }
            IpProtocol::Tcp => self.classify_tcp(frame, &ip),
            IpProtocol::Udp => self.classify_udp(&ip),
            _ => {}
        }
    }

    fn classify_tcp(&mut self, frame: &[u8], ip: &Ipv4Packet<&[u8]>) {
        let Ok(segment) = TcpPacket::new_checked(ip.payload()) else {
            return;
        };
        if !segment.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()) {
            return;
        }
        if segment.src_port() == 0 {
            return;
        }
        let destination = SocketAddrV4::new(ip.dst_addr(), segment.dst_port());
        let key = (segment.src_port(), destination);
        let opening = segment.syn() && !segment.ack() && !segment.rst();
        if !opening || self.tcp_keys.contains_key(&key) {
            // A retransmitted SYN of a known flow is dropped: while the
            // host connects it is held already, and once the flow is open
            // smoltcp resends its SYN-ACK by itself.
            if !opening {
                self.frames.rx.push_back(frame.to_vec());
            }
            return;
        }
        let refuse = |stack: &mut Stack| {
            let reset = wire::reset_syn(
                destination,
                key.0,
                segment.seq_number(),
                segment.payload().len(),
            );
            stack.frames.push(reset);
        };
        if self.tcp.len() >= TCP_FLOWS_LIMIT {
            if let Some(quiet) = self.refused_full.admit() {
                tracing::warn!(
                    "the guest has {TCP_FLOWS_LIMIT} TCP connections open, the most one VM may; refusing one to {destination} ({quiet} more refused since the last message)"
                );
            }
            return refuse(self);
        }
        let held = HeldSyn {
            frame: frame.to_vec(),
            seq: segment.seq_number(),
            len: segment.payload().len(),
            since: Instant::now(),
        };
        let verdict = self
            .policy
            .decide(Transport::Tcp, destination, &lock(&self.bindings));
        match verdict {
            Verdict::Dns => {
                let id = self.add_flow(
                    FlowKind::Dns {
                        key,
                        inbox: Vec::new(),
                        outbox: Vec::new(),
                        asked: false,
                        opened: Instant::now(),
                    },
                    None,
                );
                if let Some(flow) = self.tcp.get_mut(&id) {
                    flow.held = Some(held);
                    flow.connected = true;
                }
            }
            Verdict::Connect(target) => match connect_nonblocking(target) {
                Ok(stream) => {
                    let id = self.add_flow(FlowKind::Outbound(key), Some(stream));
                    if let Some(flow) = self.tcp.get_mut(&id) {
                        flow.held = Some(held);
                    }
                }
                Err(e) => {
                    tracing::debug!("TCP to {destination}: {e}; refused");
                    refuse(self);
                }
            },
            Verdict::Inspect(protocol) => {
                let id = self.add_flow(
                    FlowKind::Inspected(Box::new(Inspection::new(key, protocol))),
                    None,
                );
                if let Some(flow) = self.tcp.get_mut(&id) {
                    flow.held = Some(held);
                    flow.connected = true;
                }
            }
            Verdict::Deny(denial) => {
                self.denials.refuse(
                    denial.reason(Transport::Tcp),
                    format_args!("TCP from the guest to {destination}: {denial}"),
                );
                refuse(self);
            }
        }
    }

    fn add_flow(&mut self, kind: FlowKind, host: Option<TcpStream>) -> FlowId {
        let id = self.next_flow;
        self.next_flow += 1;
        if let Some(key) = kind.key() {
            self.tcp_keys.insert(key, id);
        }
        self.tcp.insert(
            id,
            TcpFlow {
                kind,
                socket: None,
                host,
                held: None,
                connected: false,
                host_readable: false,
                host_write_blocked: false,
                host_eof: false,
                guest_eof: false,
            },
        );
        id
    }

    /// Opens the flows whose host side is up, one SYN at a time: each
    /// gets a smoltcp socket listening on its destination, and the SYN is
    /// handed over when smoltcp will process it at once (nothing else
    /// queued, room for the SYN-ACK). So no two sockets ever listen on one
    /// endpoint, and a SYN cannot reach another flow's socket. A SYN that
    /// smoltcp drops anyway leaves its socket listening; that flow is
    /// refused and forgotten.
    fn open_connected(&mut self) {
        let ready: Vec<FlowId> = self
            .tcp
            .iter()
            .filter(|(_, flow)| flow.connected && flow.held.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if !self.frames.rx_drained() || !self.frames.has_tx_room() {
                return;
            }
            let Some(flow) = self.tcp.get_mut(&id) else {
                continue;
            };
            let Some(key) = flow.kind.key() else {
                continue;
            };
            let Some(held) = flow.held.take() else {
                continue;
            };
            let mut socket = new_tcp_socket();
            // smoltcp refuses port 0; the guest gets a reset, as from a host.
            if socket.listen(key.1).is_err() {
                self.refuse_flow(id, key, &held);
                continue;
            }
            let handle = self.sockets.add(socket);
            flow.socket = Some(handle);
            self.frames.rx.push_back(held.frame.clone());
            self.iface.poll(now(), &mut self.frames, &mut self.sockets);
            if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
                self.sockets.remove(handle);
                self.refuse_flow(id, key, &held);
            }
        }
    }

    /// Forgets flow `id` and resets the guest's SYN.
    fn refuse_flow(&mut self, id: FlowId, key: FlowKey, held: &HeldSyn) {
        self.tcp.remove(&id);
        self.tcp_keys.remove(&key);
        self.frames
            .push(wire::reset_syn(key.1, key.0, held.seq, held.len));
    }

    fn tcp_ready(&mut self, id: FlowId, flags: PollFlags) {
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        // A host connection under way: a held SYN's, or an inspected
        // flow's to the name it named.
        if flow.held.is_some() || flow.connecting() {
            let outcome = match flow.host.as_ref().map(TcpStream::take_error) {
                Some(Ok(None)) => Ok(flags.contains(PollFlags::POLLOUT)),
                None => Ok(false),
                Some(Ok(Some(error)) | Err(error)) => Err(error),
            };
            match (outcome, &mut flow.kind) {
                (Ok(false), _) => {}
                (Ok(true), FlowKind::Inspected(inspection)) => {
                    inspection.connected();
                    flow.host_readable = true;
                }
                (Ok(true), _) => flow.connected = true,
                (Err(error), FlowKind::Inspected(inspection)) => {
                    tracing::debug!("TCP to {}: {error}; closed", inspection.describe());
                    self.abort_flow(id);
                }
                (Err(error), _) => self.fail_connect(id, &error.to_string()),
            }
            return;
        }
        if flags.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            flow.host_readable = true;
        }
        if flags.intersects(PollFlags::POLLOUT | PollFlags::POLLHUP | PollFlags::POLLERR) {
            flow.host_write_blocked = false;
        }
    }

    /// Refuses a held SYN with a reset and forgets its flow.
    fn fail_connect(&mut self, id: FlowId, why: &str) {
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        let Some(key) = flow.kind.key() else {
            return;
        };
        if let Some(held) = flow.held.take() {
            tracing::debug!("TCP to {}: {why}; refused", key.1);
            self.refuse_flow(id, key, &held);
        }
    }

    fn classify_udp(&mut self, ip: &Ipv4Packet<&[u8]>) {
        let Ok(datagram) = UdpPacket::new_checked(ip.payload()) else {
            return;
        };
        if !datagram.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()) {
            return;
        }
        let destination = SocketAddrV4::new(ip.dst_addr(), datagram.dst_port());
        let key = (datagram.src_port(), destination);
        // A flow that exists was allowed when it opened, and one refused
        // lately stays refused: the decision (and its look at the host's
        // addresses) is once per flow, not per datagram.
        let now = Instant::now();
        if let Some(flow) = self.udp.get_mut(&key) {
            flow.last_used = now;
            let _ = flow.socket.send(datagram.payload());
            return;
        }
        if self
            .refused_udp
            .get(&key)
            .is_some_and(|since| now < *since + UDP_IDLE)
        {
            return;
        }
        let verdict = self
            .policy
            .decide(Transport::Udp, destination, &lock(&self.bindings));
        match verdict {
            Verdict::Dns => {
                let job = DnsJob::Query {
                    query: datagram.payload().to_vec(),
                    carrier: Carrier::Udp,
                    reply_to: ReplyTo::Udp {
                        server: destination,
                        port: key.0,
                    },
                };
                self.ask_dns(job);
            }
            Verdict::Connect(target) => self.send_udp(key, target, datagram.payload()),
            // Only TCP is inspected; a UDP verdict never asks for it.
            Verdict::Inspect(_) => {}
            Verdict::Deny(denial) => {
                if self.refused_udp.len() >= REFUSED_UDP_MEMORY {
                    self.refused_udp.retain(|_, since| now < *since + UDP_IDLE);
                }
                // Full of fresh flows: the oldest is forgotten, rather than
                // every datagram of this one counted.
                if self.refused_udp.len() >= REFUSED_UDP_MEMORY {
                    let oldest = self
                        .refused_udp
                        .iter()
                        .min_by_key(|(_, since)| **since)
                        .map(|(key, _)| *key);
                    if let Some(oldest) = oldest {
                        self.refused_udp.remove(&oldest);
                    }
                }
                self.refused_udp.insert(key, now);
                self.denials.refuse(
                    denial.reason(Transport::Udp),
                    format_args!("UDP from the guest to {destination}: {denial}"),
                );
            }
        }
    }

    /// Queues a query for the workers; one that finds no room is dropped
    /// (over UDP the guest asks again; a TCP connection is closed, since
    /// its query would never be answered).
    fn ask_dns(&mut self, job: DnsJob) {
        let waiting = match &job {
            DnsJob::Query {
                reply_to: ReplyTo::Tcp(id),
                ..
            }
            | DnsJob::Resolve { flow: id, .. } => Some(*id),
            DnsJob::Query { .. } => None,
        };
        if let Err(TrySendError::Full(_)) = self.dns_jobs.try_send(job) {
            if let Some(quiet) = self.dns_dropped.admit() {
                tracing::warn!("the guest sends DNS queries faster than they are answered; dropping some ({quiet} more since the last message)");
            }
            if let Some(id) = waiting {
                self.abort_flow(id);
            }
        }
    }

    /// Resets a flow's connection to the guest; `reap` forgets it.
    fn abort_flow(&mut self, id: FlowId) {
        if let Some(handle) = self.tcp.get(&id).and_then(|flow| flow.socket) {
            self.sockets.get_mut::<tcp::Socket>(handle).abort();
        }
    }

    fn send_udp(&mut self, key: FlowKey, target: SocketAddr, payload: &[u8]) {
        if !self.udp.contains_key(&key) {
            if self.udp.len() >= UDP_FLOWS_LIMIT {
                if let Some(quiet) = self.refused_full.admit() {
                    tracing::warn!("the guest has {UDP_FLOWS_LIMIT} UDP flows open, the most one VM may; dropping one to {target} ({quiet} more since the last message)");
                }
                return;
            }
            let opened = connected_udp(target).and_then(|socket| {
                socket.set_nonblocking(true)?;
                Ok(socket)
            });
            match opened {
                Ok(socket) => {
                    self.udp.insert(
                        key,
                        UdpFlow {
                            socket,
                            last_used: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    tracing::debug!("UDP to {target}: {e}");
                    return;
                }
            }
        }
        if let Some(flow) = self.udp.get_mut(&key) {
            flow.last_used = Instant::now();
            // UDP may lose a datagram; a host that refuses it is the
            // guest's to notice.
            let _ = flow.socket.send(payload);
        }
    }

    fn udp_ready(&mut self, key: FlowKey) {
        let Some(flow) = self.udp.get_mut(&key) else {
            return;
        };
        let room = usize::from(MTU) - 28;
        for _ in 0..FRAMES_PER_TURN {
            match flow.socket.recv(&mut self.buffer) {
                Ok(n) if n <= room => {
                    flow.last_used = Instant::now();
                    self.frames
                        .push(wire::udp_to_guest(key.1, key.0, &self.buffer[..n]));
                }
                // Too large for the link without fragments: dropped.
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    fn accept(&mut self, index: usize) {
        loop {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            let (host, guest_port) = (listener.host, listener.guest_port);
            let stream = match listener.listener.accept() {
                Ok((stream, _)) => stream,
                Err(_) => return,
            };
            if self.tcp.len() >= TCP_FLOWS_LIMIT {
                if let Some(quiet) = self.refused_full.admit() {
                    tracing::warn!("{TCP_FLOWS_LIMIT} TCP connections are open to the guest, the most one VM may; closing one accepted on {host} ({quiet} more since the last message)");
                }
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let Some(port) = self.free_port() else {
                continue;
            };
            let mut socket = new_tcp_socket();
            let guest = SocketAddrV4::new(GUEST, guest_port);
            let local = SocketAddrV4::new(GATEWAY, port);
            if socket.connect(self.iface.context(), guest, local).is_err() {
                continue;
            }
            let handle = self.sockets.add(socket);
            let id = self.add_flow(FlowKind::Published(host), Some(stream));
            if let Some(flow) = self.tcp.get_mut(&id) {
                flow.socket = Some(handle);
                flow.host_readable = true;
            }
        }
    }

    /// A port of the gateway no published connection uses.
    fn free_port(&mut self) -> Option<u16> {
        let used: std::collections::HashSet<u16> = self
            .tcp
            .values()
            .filter(|flow| matches!(flow.kind, FlowKind::Published(_)))
            .filter_map(|flow| flow.socket)
            .filter_map(|handle| self.sockets.get::<tcp::Socket>(handle).local_endpoint())
            .map(|endpoint| endpoint.port)
            .collect();
        let span = usize::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port == *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                port + 1
            };
            if !used.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    fn take_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Publish {
                    listener,
                    guest_port,
                }) => {
                    let Ok(host) = listener.local_addr() else {
                        continue;
                    };
                    self.listeners.push(Listener {
                        listener,
                        host,
                        guest_port,
                    });
                }
                Ok(Command::Unpublish { host, done }) => {
                    let before = self.listeners.len();
                    self.listeners.retain(|l| l.host != host);
                    let found = self.listeners.len() != before;
                    for flow in self.tcp.values_mut() {
                        if matches!(flow.kind, FlowKind::Published(h) if h == host) {
                            if let Some(handle) = flow.socket {
                                self.sockets.get_mut::<tcp::Socket>(handle).abort();
                            }
                            flow.host = None;
                        }
                    }
                    let _ = done.send(found);
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.stop.store(true, std::sync::atomic::Ordering::Release);
                    return;
                }
            }
        }
    }

    fn take_dns_answers(&mut self) {
        while let Ok(done) = self.dns_done.try_recv() {
            let (answer, reply_to) = match done {
                DnsDone::Answer { answer, reply_to } => (answer, reply_to),
                DnsDone::Resolved { flow, addresses } => {
                    self.connect_inspected(flow, &addresses);
                    continue;
                }
            };
            match reply_to {
                ReplyTo::Udp { server, port } => {
                    if let Some(answer) = answer.filter(|a| a.len() <= usize::from(MTU) - 28) {
                        self.frames.push(wire::udp_to_guest(server, port, &answer));
                    }
                }
                ReplyTo::Tcp(id) => {
                    let Some(flow) = self.tcp.get_mut(&id) else {
                        continue;
                    };
                    let answer = answer.and_then(|a| Some((u16::try_from(a.len()).ok()?, a)));
                    match (&mut flow.kind, answer) {
                        (FlowKind::Dns { outbox, asked, .. }, Some((len, answer))) => {
                            outbox.extend_from_slice(&len.to_be_bytes());
                            outbox.extend_from_slice(&answer);
                            *asked = false;
                        }
                        _ => self.abort_flow(id),
                    }
                }
            }
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<FlowId> = self
            .tcp
            .iter()
            .filter(|(_, flow)| {
                flow.held
                    .as_ref()
                    .is_some_and(|h| now >= h.since + CONNECT_TIMEOUT)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.fail_connect(id, "the host did not answer in time");
        }
        // A DNS connection is a few queries; one that lingers holds a slot.
        let stale: Vec<FlowId> = self
            .tcp
            .iter()
            .filter(|(_, flow)| {
                matches!(flow.kind, FlowKind::Dns { opened, .. } if now >= opened + DNS_TCP_PATIENCE)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.abort_flow(id);
        }
        let overdue: Vec<(FlowId, Option<Reason>)> = self
            .tcp
            .iter()
            .filter_map(|(id, flow)| match &flow.kind {
                FlowKind::Inspected(inspection) => inspection.overdue(now).map(|r| (*id, r)),
                _ => None,
            })
            .collect();
        for (id, reason) in overdue {
            if let Some(reason) = reason {
                self.denials.refuse(
                    reason,
                    format_args!("a connection that named no server in time"),
                );
            }
            self.abort_flow(id);
        }
        self.udp.retain(|_, flow| now < flow.last_used + UDP_IDLE);
    }

    /// Moves bytes between every open flow's two sides.
    fn pump(&mut self) {
        let ids: Vec<FlowId> = self.tcp.keys().copied().collect();
        let mut asks = Vec::new();
        let mut refusals = Vec::new();
        for id in ids {
            let Some(flow) = self.tcp.get_mut(&id) else {
                continue;
            };
            let Some(handle) = flow.socket else {
                continue;
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            match &mut flow.kind {
                FlowKind::Dns {
                    inbox,
                    outbox,
                    asked,
                    ..
                } => {
                    if let Some(query) = pump_dns(socket, inbox, outbox, asked, &self.denials) {
                        asks.push(DnsJob::Query {
                            query,
                            carrier: Carrier::Tcp,
                            reply_to: ReplyTo::Tcp(id),
                        });
                    }
                }
                FlowKind::Outbound(_) | FlowKind::Published(_) => {
                    pump_host(socket, flow_host(flow))
                }
                FlowKind::Inspected(_) => match inspected::pump(socket, flow, &self.policy) {
                    inspected::Outcome::Going => {}
                    inspected::Outcome::Resolve(name) => {
                        asks.push(DnsJob::Resolve { name, flow: id })
                    }
                    inspected::Outcome::Refused(reason, why) => refusals.push((id, reason, why)),
                },
            }
        }
        for job in asks {
            self.ask_dns(job);
        }
        for (id, reason, why) in refusals {
            self.denials.refuse(reason, format_args!("{why}"));
            self.abort_flow(id);
            if let Some(flow) = self.tcp.get_mut(&id) {
                // Nothing more of it goes to the host.
                flow.host = None;
            }
        }
    }

    /// Connects an inspected flow to the first of the `addresses` its
    /// name resolved to that the guest may reach; closes it when none is.
    fn connect_inspected(&mut self, id: FlowId, addresses: &[std::net::Ipv4Addr]) {
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        let FlowKind::Inspected(inspection) = &mut flow.kind else {
            return;
        };
        let port = inspection.key.1.port();
        let target = addresses
            .iter()
            .find(|ip| self.policy.reachable(**ip).is_ok())
            .map(|ip| SocketAddr::from((*ip, port)));
        let stream = match target.map(connect_nonblocking) {
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                tracing::debug!("TCP to {}: {e}; closed", inspection.describe());
                return self.abort_flow(id);
            }
            None => {
                tracing::debug!(
                    "TCP to {}: the name has no address the guest may reach; closed",
                    inspection.describe()
                );
                return self.abort_flow(id);
            }
        };
        inspection.connecting();
        flow.host = Some(stream);
    }

    /// Forgets flows whose smoltcp socket has closed, and closes the host
    /// side of the rest as the guest's side closes.
    fn reap(&mut self) {
        let mut gone = Vec::new();
        for (id, flow) in &self.tcp {
            let Some(handle) = flow.socket else {
                continue;
            };
            match self.sockets.get::<tcp::Socket>(handle).state() {
                tcp::State::Closed | tcp::State::TimeWait => gone.push(*id),
                _ => {}
            }
        }
        for id in gone {
            if let Some(flow) = self.tcp.remove(&id) {
                if let Some(key) = flow.kind.key() {
                    self.tcp_keys.remove(&key);
                }
                if let Some(handle) = flow.socket {
                    self.sockets.remove(handle);
                }
            }
        }
    }
}

/// The host side of a flow with everything the pump needs of it.
struct HostSide<'a> {
    stream: Option<&'a mut TcpStream>,
    readable: &'a mut bool,
    write_blocked: &'a mut bool,
    eof: &'a mut bool,
    guest_eof: &'a mut bool,
}

fn flow_host(flow: &mut TcpFlow) -> HostSide<'_> {
    HostSide {
        stream: flow.host.as_mut(),
        readable: &mut flow.host_readable,
        write_blocked: &mut flow.host_write_blocked,
        eof: &mut flow.host_eof,
        guest_eof: &mut flow.guest_eof,
    }
}

enum Moved {
    Bytes,
    Blocked,
    End,
    Failed,
}

/// What one read or write of a host socket came to, as smoltcp's
/// `send` and `recv` closures report it: the bytes moved, and how.
fn moved(result: io::Result<usize>) -> (usize, Moved) {
    match result {
        Ok(0) => (0, Moved::End),
        Ok(n) => (n, Moved::Bytes),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, Moved::Blocked),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => (0, Moved::Bytes),
        Err(_) => (0, Moved::Failed),
    }
}

/// Host to guest while the socket has room and the host has bytes; guest
/// to host while the guest sent bytes and the host takes them; each end's
/// close passed on to the other.
fn pump_host(socket: &mut tcp::Socket<'_>, host: HostSide<'_>) {
    let Some(stream) = host.stream else {
        return;
    };
    // Until the handshake is done there is nothing to move, and no close
    // to pass on.
    if matches!(
        socket.state(),
        tcp::State::Closed | tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived
    ) {
        return;
    }
    if !host_to_guest(socket, stream, host.readable, host.eof) {
        return;
    }
    while !*host.write_blocked && socket.can_recv() {
        let moved = socket.recv(|data| moved(stream.write(data)));
        match moved {
            Ok(Moved::Bytes) => {}
            Ok(Moved::Blocked) => *host.write_blocked = true,
            Ok(Moved::End) => {}
            Ok(Moved::Failed) | Err(_) => {
                socket.abort();
                return;
            }
        }
    }
    if !*host.guest_eof && !socket.may_recv() && !socket.can_recv() {
        *host.guest_eof = true;
        let _ = stream.shutdown(Shutdown::Write);
    }
}

/// Host to guest while the socket has room and the host has bytes, the
/// host's close passed on; `false` when the connection failed and was
/// reset.
fn host_to_guest(
    socket: &mut tcp::Socket<'_>,
    stream: &mut TcpStream,
    readable: &mut bool,
    eof: &mut bool,
) -> bool {
    while *readable && !*eof && socket.may_send() && socket.send_queue() < socket.send_capacity() {
        let moved = socket.send(|room| moved(stream.read(room)));
        match moved {
            Ok(Moved::Bytes) => {}
            Ok(Moved::Blocked) => *readable = false,
            Ok(Moved::End) => {
                *eof = true;
                socket.close();
            }
            Ok(Moved::Failed) | Err(_) => {
                socket.abort();
                return false;
            }
        }
    }
    true
}

/// Reads length-prefixed queries from a DNS-over-TCP connection, one at a
/// time, and writes the answers back; returns a query to answer.
fn pump_dns(
    socket: &mut tcp::Socket<'_>,
    inbox: &mut Vec<u8>,
    outbox: &mut Vec<u8>,
    asked: &mut bool,
    denials: &Denials,
) -> Option<Vec<u8>> {
    if matches!(socket.state(), tcp::State::Listen | tcp::State::SynReceived) {
        return None;
    }
    if !outbox.is_empty() && socket.may_send() {
        if let Ok(sent) = socket.send_slice(outbox) {
            outbox.drain(..sent);
        }
    }
    while socket.can_recv() && inbox.len() < 2 + QUERY_LIMIT {
        let room = 2 + QUERY_LIMIT - inbox.len();
        let mut chunk = vec![0; room];
        match socket.recv_slice(&mut chunk) {
            Ok(n) if n > 0 => inbox.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    if inbox.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([inbox[0], inbox[1]]));
        if len > QUERY_LIMIT {
            // Refused unread, and counted, as over UDP; a stream cannot be
            // skipped past it, so the connection ends.
            denials.refuse(
                Reason::Dns,
                format_args!("a DNS query of {len} bytes over TCP, over {QUERY_LIMIT}"),
            );
            socket.abort();
            return None;
        }
        // One query at a time, and the next only once the answer is out:
        // a guest that asks without reading holds one answer, no more.
        if !*asked && outbox.is_empty() && inbox.len() >= 2 + len {
            let query = inbox[2..2 + len].to_vec();
            inbox.drain(..2 + len);
            *asked = true;
            return Some(query);
        }
    }
    // The guest is done asking once it closed its side.
    if socket.state() == tcp::State::CloseWait && !*asked && outbox.is_empty() {
        socket.close();
    }
    None
}

fn new_tcp_socket() -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_RX_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_TX_BUFFER]),
    );
    socket.set_nagle_enabled(false);
    // A peer that acknowledges nothing for this long (a published port's
    // guest that never answers, a guest that stopped reading) is gone.
    socket.set_timeout(Some(smoltcp::time::Duration::from_secs(
        TCP_PATIENCE.as_secs(),
    )));
    socket
}

fn is_unicast(ip: std::net::Ipv4Addr) -> bool {
    !(ip.is_broadcast() || ip.is_multicast() || ip.is_unspecified())
}

/// Starts connecting to `target` without waiting for the outcome.
fn connect_nonblocking(target: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

/// Starts the threads that answer DNS for one VM.
fn start_dns_workers(
    dns: Dns,
    waker: Waker,
) -> io::Result<(SyncSender<DnsJob>, Receiver<DnsDone>)> {
    let (jobs_tx, jobs) = mpsc::sync_channel::<DnsJob>(DNS_QUEUE);
    let (done_tx, done) = mpsc::channel();
    let jobs = Arc::new(Mutex::new(jobs));
    let dns = Arc::new(dns);
    for index in 0..DNS_WORKERS {
        let (jobs, done_tx, dns, waker) = (
            Arc::clone(&jobs),
            done_tx.clone(),
            Arc::clone(&dns),
            waker.clone(),
        );
        std::thread::Builder::new()
            .name(format!("vmette-dns{index}"))
            .spawn(move || loop {
                let job = match lock(&jobs).recv() {
                    Ok(job) => job,
                    Err(_) => return,
                };
                // Always an outcome, so a connection waiting for one is
                // never left waiting: no answer closes it.
                let done = match job {
                    DnsJob::Query {
                        query,
                        carrier,
                        reply_to,
                    } => DnsDone::Answer {
                        answer: dns.answer(&query, carrier),
                        reply_to,
                    },
                    DnsJob::Resolve { name, flow } => DnsDone::Resolved {
                        flow,
                        addresses: dns.addresses_for(&name),
                    },
                };
                if done_tx.send(done).is_err() {
                    return;
                }
                waker.wake();
            })?;
    }
    Ok((jobs_tx, done))
}

mod inspected;
#[cfg(test)]
mod tests;

use inspected::Inspection;

//! Frames the stack builds itself, outside smoltcp: UDP replies (the NAT
//! and DNS), and the resets that refuse a connection before any socket
//! exists for it.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet,
    Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
    ETHERNET_HEADER_LEN, IPV4_HEADER_LEN, TCP_HEADER_LEN, UDP_HEADER_LEN,
};

use crate::addressing::{GATEWAY_MAC, GUEST, GUEST_MAC};

/// A UDP datagram from `from` to the guest's `port`.
pub fn udp_to_guest(from: SocketAddrV4, port: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = UDP_HEADER_LEN + payload.len();
    let mut frame = frame_for(*from.ip(), IpProtocol::Udp, udp_len);
    let checksums = ChecksumCapabilities::default();
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
    UdpRepr {
        src_port: from.port(),
        dst_port: port,
    }
    .emit(
        &mut udp,
        &(*from.ip()).into(),
        &GUEST.into(),
        payload.len(),
        |room| room.copy_from_slice(payload),
        &checksums,
    );
    frame
}

/// The reset that refuses the guest's SYN from `port` to `to`, whose
/// sequence number was `seq` and which carried `len` bytes.
pub fn reset_syn(to: SocketAddrV4, port: u16, seq: TcpSeqNumber, len: usize) -> Vec<u8> {
    let mut frame = frame_for(*to.ip(), IpProtocol::Tcp, TCP_HEADER_LEN);
    let checksums = ChecksumCapabilities::default();
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    let mut tcp = TcpPacket::new_unchecked(ip.payload_mut());
    TcpRepr {
        src_port: to.port(),
        dst_port: port,
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        // The SYN counts as one.
        ack_number: Some(seq + 1 + len),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    }
    .emit(&mut tcp, &(*to.ip()).into(), &GUEST.into(), &checksums);
    frame
}

/// A frame from the gateway to the guest with an IPv4 header from `src`
/// and room for `len` bytes of `protocol`.
fn frame_for(src: Ipv4Addr, protocol: IpProtocol, len: usize) -> Vec<u8> {
    let mut frame = vec![0; ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + len];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: EthernetAddress(GATEWAY_MAC),
        dst_addr: EthernetAddress(GUEST_MAC),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    Ipv4Repr {
        src_addr: src,
        dst_addr: GUEST,
        next_header: protocol,
        payload_len: len,
        hop_limit: 64,
    }
    .emit(&mut ip, &ChecksumCapabilities::default());
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_parse_with_good_checksums() {
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 53);
        let frame = udp_to_guest(from, 40000, b"answer");
        let eth = EthernetFrame::new_checked(&frame[..]).expect("ethernet");
        let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
        assert!(ip.verify_checksum());
        let udp = UdpPacket::new_checked(ip.payload()).expect("udp");
        assert!(udp.verify_checksum(&(*from.ip()).into(), &GUEST.into()));
        assert_eq!(udp.payload(), b"answer");

        let frame = reset_syn(from, 40000, TcpSeqNumber(41), 0);
        let eth = EthernetFrame::new_checked(&frame[..]).expect("ethernet");
        let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
        let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
        assert!(tcp.verify_checksum(&(*from.ip()).into(), &GUEST.into()));
        assert!(tcp.rst() && tcp.ack());
        assert_eq!(tcp.ack_number(), TcpSeqNumber(42));
    }
}

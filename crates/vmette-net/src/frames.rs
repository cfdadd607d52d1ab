//! The stack's end of the frame socket, as a smoltcp device.
//!
//! Each datagram on the socket is one Ethernet frame. Frames from the
//! guest are read by the stack's loop, which classifies them before any
//! reach smoltcp; frames to the guest wait in a bounded queue until the
//! socket takes them, so a slow VM pushes back on smoltcp (which keeps the
//! data in its sockets) instead of losing frames.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{recv, send, MsgFlags};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Frames that wait for the socket at most; smoltcp waits beyond that.
const TX_QUEUE: usize = 64;

/// Frames to smoltcp that wait at most: the loop reads no more from the
/// socket while this many are queued.
pub const RX_QUEUE: usize = 256;

/// The Ethernet header.
pub const ETHERNET_HEADER: usize = 14;

/// The frame socket, and the frames waiting on either side of it.
pub struct Frames {
    socket: OwnedFd,
    frame_limit: usize,
    /// From the guest, for smoltcp.
    pub rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    dropped: u64,
}

impl Frames {
    /// The device on `socket` (non-blocking) for frames of an `mtu`-byte
    /// payload.
    pub fn new(socket: OwnedFd, mtu: u16) -> Frames {
        Frames {
            socket,
            frame_limit: usize::from(mtu) + ETHERNET_HEADER,
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            dropped: 0,
        }
    }

    /// The socket, for `poll`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Whether frames wait for the socket to take them.
    pub fn has_output(&self) -> bool {
        !self.tx.is_empty()
    }

    /// Whether smoltcp may queue another frame to the guest.
    pub fn has_tx_room(&self) -> bool {
        self.tx.len() < TX_QUEUE
    }

    /// Whether every frame from the guest has been handed to smoltcp.
    pub fn rx_drained(&self) -> bool {
        self.rx.is_empty()
    }

    /// Whether the loop may read more frames from the guest.
    pub fn has_room(&self) -> bool {
        self.rx.len() < RX_QUEUE
    }

    /// The next frame from the guest, if one is waiting; frames larger
    /// than the link allows are dropped.
    pub fn read(&mut self, buffer: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match recv(self.socket.as_raw_fd(), buffer, MsgFlags::MSG_TRUNC) {
                Ok(0) => return Ok(None),
                Ok(n) if n > self.frame_limit || n > buffer.len() => {
                    self.dropped += 1;
                    continue;
                }
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(errno.into()),
            }
        }
    }

    /// Queues a frame the stack built itself (a UDP reply, say); dropped
    /// when the queue is full, as a NIC drops, since UDP may lose it.
    pub fn push(&mut self, frame: Vec<u8>) {
        if self.tx.len() < TX_QUEUE {
            self.tx.push_back(frame);
        } else {
            self.dropped += 1;
        }
    }

    /// Hands the socket what it takes of the queued frames.
    pub fn flush(&mut self) -> io::Result<()> {
        while let Some(frame) = self.tx.front() {
            match send(self.socket.as_raw_fd(), frame, MsgFlags::MSG_DONTWAIT) {
                Ok(_) => {
                    self.tx.pop_front();
                }
                Err(Errno::EAGAIN | Errno::ENOBUFS) => return Ok(()),
                Err(Errno::EINTR) => {}
                // The VM is gone; the session notices on its own.
                Err(Errno::ECONNREFUSED | Errno::EPIPE) => {
                    self.tx.clear();
                    return Ok(());
                }
                Err(errno) => return Err(errno.into()),
            }
        }
        Ok(())
    }

    /// Frames dropped so far (too large, or no room).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// A frame from the guest, handed to smoltcp.
pub struct RxToken(Vec<u8>);

/// Room for one frame to the guest.
pub struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        self.0.push_back(frame);
        result
    }
}

impl Device for Frames {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken, TxToken<'_>)> {
        // A reply needs room too; without it the frame waits.
        if self.tx.len() >= TX_QUEUE {
            return None;
        }
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        (self.tx.len() < TX_QUEUE).then_some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.frame_limit;
        caps.max_burst_size = Some(TX_QUEUE);
        caps
    }
}

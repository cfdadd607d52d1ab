//! Wire protocol between the vmette host library and `vmette-guest`, the
//! agent that runs as PID 1 inside every vmette microVM.
//!
//! The host and the guest talk over one byte stream (the *control channel*):
//! a virtio-serial port under QEMU, a virtio-socket under Virtualization.framework.
//! Neither side cares which; this crate only sees `Read` and `Write`.
//!
//! # Conversation
//!
//! 1. The guest opens the channel and sends [`GuestMessage::Hello`] with its
//!    [`PROTOCOL_VERSION`]. A host that does not speak that version stops here.
//! 2. The host sends [`HostMessage::Boot`] with a [`BootEnvelope`]: which
//!    disk or share is the root, where the writable layer lives, which shares
//!    to mount. The guest assembles its root and answers
//!    [`GuestMessage::Ready`] or [`GuestMessage::BootFailed`].
//! 3. The host sends any number of [`HostMessage::Exec`] requests, each with
//!    an id the host chose. Execs run concurrently; every later message names
//!    its exec by that id. Output comes back as [`GuestMessage::Stdout`] and
//!    [`GuestMessage::Stderr`] chunks as it is produced, and each exec ends
//!    with exactly one [`GuestMessage::Exited`] or [`GuestMessage::ExecFailed`].
//! 4. The host ends the VM with [`HostMessage::PowerOff`].
//!
//! A one-shot `vmette run` is this conversation with a single exec.
//!
//! # Framing
//!
//! Every message is one frame: a little-endian `u32` body length, then the
//! body, a [postcard](https://docs.rs/postcard) encoding of the message. The
//! length is checked against [`MAX_FRAME_LEN`] before anything is allocated,
//! so a hostile peer cannot make the reader allocate more than that.
//!
//! # Flow control
//!
//! Guest → host output is credited per exec and per stream: the guest
//! keeps at most [`OUTPUT_WINDOW`] bytes of each stream unacknowledged and
//! sends more only as [`HostMessage::OutputCredit`] arrives, which the host
//! grants as its consumer takes the data. A slow or absent reader of one
//! exec stalls that exec's command on a full pipe and nothing else: other
//! execs and the control messages flow on. Host → guest stdin is
//! windowed: the host keeps at most [`STDIN_WINDOW`] bytes unacknowledged,
//! and the guest sends [`GuestMessage::StdinAck`] once it has written bytes
//! into the command's pipe, so a command that never reads its stdin cannot
//! make the guest buffer without bound.

#![warn(missing_docs)]

mod files;
mod frame;
mod messages;

pub use files::{
    DirEntry, FileError, FileErrorKind, FileKind, FileOp, FileReply, FileRequest, FileStat,
    MAX_FILE_MESSAGE, MAX_LIST_ENTRIES, MAX_NAME_LEN,
};
pub use frame::{read_frame, write_frame, FrameError, FRAME_HEADER_LEN, MAX_FRAME_LEN};
pub use messages::{
    BootEnvelope, ExecId, ExecRequest, ExitStatus, GuestMessage, GuestNetwork, HostMessage,
    InvalidMessage, OutputStream, OverlayUpper, PtySize, RootSource, ShareMount, MAX_ARGS,
    MAX_CHUNK_LEN, MAX_ENV, MAX_MTU, MAX_PTY_SIDE, MAX_SHARES, MIN_MTU, OUTPUT_WINDOW,
    PROTOCOL_VERSION, STDIN_WINDOW,
};

/// Name of the virtio-serial port the guest agent looks for. Engines that
/// use virtio-serial for the control channel give the port this name.
pub const CONTROL_PORT_NAME: &str = "vmette.ctl";

/// Virtio-socket port the guest agent listens on when the engine uses
/// virtio-socket for the control channel.
pub const CONTROL_VSOCK_PORT: u32 = 1025;

//! The control channel. The engine names the transport on the kernel
//! command line: `vmette.control=vsock:PORT` makes the agent listen on that
//! virtio-socket port and serve the first host connection (what
//! Virtualization.framework offers); otherwise it opens the virtio-serial
//! port named [`vmette_proto::CONTROL_PORT_NAME`] (what QEMU offers). The
//! protocol treats either as a plain byte stream.
//!
//! One thread owns the writing side and drains a bounded queue of
//! messages; the main thread owns the reading side.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vmette_proto::{
    read_frame, write_frame, FrameError, GuestMessage, HostMessage, InvalidMessage,
};

/// Messages queued for the writer before senders block. Bounded so that a
/// host that reads slowly stalls the command (on a full pipe) instead of
/// filling guest memory.
const OUTBOX_LEN: usize = 64;

/// How long to wait for the kernel to publish the control port.
const PORT_WAIT: Duration = Duration::from_secs(10);

/// The open control channel, before it is split into inbox and outbox.
pub struct Channel {
    reader: Box<dyn Read + Send>,
    outbox: Outbox,
    transport: Transport,
}

/// Which kind of channel the engine provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// A virtio-serial port: reads see end-of-file while no host is
    /// connected, which means "wait".
    Serial,
    /// A virtio-socket connection: end-of-file means the host is gone.
    Vsock(u32),
}

impl Transport {
    /// Reads the transport from the kernel command line.
    fn from_cmdline(cmdline: &str) -> Transport {
        cmdline
            .split_whitespace()
            .filter_map(|arg| arg.strip_prefix("vmette.control=vsock:"))
            .filter_map(|port| port.parse().ok())
            .next_back()
            .map_or(Transport::Serial, Transport::Vsock)
    }
}

/// Sends messages to the host. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    queue: mpsc::SyncSender<Outgoing>,
}

enum Outgoing {
    Message(GuestMessage),
    Flush(mpsc::Sender<()>),
}

/// Receives validated messages from the host.
pub struct Inbox {
    reader: Box<dyn Read + Send>,
    transport: Transport,
    outbox: Outbox,
}

impl Channel {
    /// Opens the control channel the engine provides and starts the writer
    /// thread.
    pub fn open() -> io::Result<Channel> {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let transport = Transport::from_cmdline(&cmdline);
        let file = match transport {
            Transport::Serial => match find_serial_port()? {
                Some(path) => OpenOptions::new().read(true).write(true).open(&path)?,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "no virtio-serial port named vmette.ctl appeared",
                    ))
                }
            },
            Transport::Vsock(port) => accept_vsock(port)?,
        };
        let (reader, writer): (Box<dyn Read + Send>, Box<dyn Write + Send>) =
            (Box::new(file.try_clone()?), Box::new(file));
        let (queue, outgoing) = mpsc::sync_channel(OUTBOX_LEN);
        thread::Builder::new()
            .name("channel-writer".into())
            .spawn(move || write_loop(writer, outgoing))?;
        Ok(Channel {
            reader,
            outbox: Outbox { queue },
            transport,
        })
    }

    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    pub fn inbox(self) -> Inbox {
        Inbox {
            reader: self.reader,
            transport: self.transport,
            outbox: self.outbox,
        }
    }
}

fn write_loop(mut writer: Box<dyn Write + Send>, outgoing: mpsc::Receiver<Outgoing>) {
    for item in outgoing {
        match item {
            Outgoing::Message(message) => {
                if let Err(e) = write_frame(&mut writer, &message) {
                    eprintln!("vmette-guest: control channel write failed: {e}");
                }
            }
            Outgoing::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

impl Outbox {
    /// Queues a message; it is written in order with every other message.
    pub fn send(&self, message: GuestMessage) {
        // The writer thread lives as long as the process; a send error
        // could only mean it died, and then nothing can reach the host.
        let _ = self.queue.send(Outgoing::Message(message));
    }

    /// Waits until everything queued so far has been written.
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if self.queue.send(Outgoing::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(5));
        }
    }
}

impl Inbox {
    /// The next valid message from the host. A virtio-serial port reads as
    /// end-of-file while no host is connected, so there an end of stream
    /// between frames means "wait"; on a virtio socket it means the host is
    /// gone, which ends the VM like a power-off request.
    pub fn next(&mut self) -> Result<HostMessage, FrameError> {
        loop {
            match read_frame::<_, HostMessage>(&mut self.reader)? {
                Some(message) => match message.validate() {
                    Ok(()) => return Ok(message),
                    Err(e) => self.refuse(&message, &e),
                },
                None if self.transport == Transport::Serial => {
                    thread::sleep(Duration::from_millis(10))
                }
                None => return Ok(HostMessage::PowerOff),
            }
        }
    }
}

impl Inbox {
    /// Answers a message that breaks the protocol's rules, so the host
    /// learns why instead of waiting for an answer that never comes.
    fn refuse(&self, message: &HostMessage, error: &InvalidMessage) {
        eprintln!("vmette-guest: refusing a host message: {error}");
        match message {
            HostMessage::Exec(request) => self.outbox.send(GuestMessage::ExecFailed {
                id: request.id,
                message: format!("the request was refused: {error}"),
                code: 125,
            }),
            HostMessage::Boot(_) => self.outbox.send(GuestMessage::BootFailed {
                message: format!("the boot envelope was refused: {error}"),
            }),
            _ => {}
        }
    }
}

/// Listens on the virtio-socket `port` and accepts the host's connection.
fn accept_vsock(port: u32) -> io::Result<File> {
    use nix::sys::socket::{
        accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
    };
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        listener.as_raw_fd(),
        &VsockAddr::new(libc::VMADDR_CID_ANY, port),
    )?;
    listen(&listener, Backlog::new(1)?)?;
    // Close-on-exec, like every descriptor of the agent's: a command must
    // not inherit the control channel and write into it.
    let connection = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept returned a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(connection) }))
}

/// Polls sysfs for the port whose name is the control port's.
fn find_serial_port() -> io::Result<Option<PathBuf>> {
    let deadline = Instant::now() + PORT_WAIT;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let name_file = entry.path().join("name");
                let mut name = String::new();
                if File::open(&name_file)
                    .and_then(|mut f| f.read_to_string(&mut name))
                    .is_ok()
                    && name.trim_end() == vmette_proto::CONTROL_PORT_NAME
                {
                    let device = PathBuf::from("/dev").join(entry.file_name());
                    if device.exists() {
                        return Ok(Some(device));
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transport_comes_from_the_kernel_command_line() {
        assert_eq!(
            Transport::from_cmdline("console=ttyS0 quiet"),
            Transport::Serial
        );
        assert_eq!(
            Transport::from_cmdline("console=hvc0 vmette.control=vsock:1025"),
            Transport::Vsock(1025)
        );
        assert_eq!(
            Transport::from_cmdline("vmette.control=vsock:nope"),
            Transport::Serial
        );
    }
}

//! The control channel: the virtio-serial port named
//! [`vmette_proto::CONTROL_PORT_NAME`]. The protocol treats it as a plain
//! byte stream, so another transport only changes [`Channel::open`].
//!
//! One thread owns the writing side and drains a bounded queue of
//! messages; the main thread owns the reading side.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vmette_proto::{read_frame, write_frame, FrameError, GuestMessage, HostMessage};

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
}

impl Channel {
    /// Finds and opens the control port and starts the writer thread.
    pub fn open() -> io::Result<Channel> {
        let (reader, writer): (Box<dyn Read + Send>, Box<dyn Write + Send>) =
            match find_serial_port()? {
                Some(path) => {
                    let file = OpenOptions::new().read(true).write(true).open(&path)?;
                    (Box::new(file.try_clone()?), Box::new(file))
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "no virtio-serial port named vmette.ctl appeared",
                    ))
                }
            };
        let (queue, outgoing) = mpsc::sync_channel(OUTBOX_LEN);
        thread::Builder::new()
            .name("channel-writer".into())
            .spawn(move || write_loop(writer, outgoing))?;
        Ok(Channel {
            reader,
            outbox: Outbox { queue },
        })
    }

    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    pub fn inbox(self) -> Inbox {
        Inbox {
            reader: self.reader,
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
    /// end-of-file while no host is connected, so an end of stream between
    /// frames means "wait", not "gone".
    pub fn next(&mut self) -> Result<HostMessage, FrameError> {
        loop {
            match read_frame::<_, HostMessage>(&mut self.reader)? {
                Some(message) => match message.validate() {
                    Ok(()) => return Ok(message),
                    Err(e) => eprintln!("vmette-guest: refusing a host message: {e}"),
                },
                None => thread::sleep(Duration::from_millis(10)),
            }
        }
    }
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

//! The host's end of the control channel: a writer thread fed by a queue,
//! and a reader thread that validates every guest message and turns it into
//! an [`Event`].
//!
//! Nothing that sends ever blocks on the socket: a guest that stops
//! reading stalls only the writer thread, never the run loop, which can
//! still honour its deadline and Ctrl-C by killing the VM (which closes
//! the socket and ends the writer).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use vmette_proto::{
    read_frame, write_frame, FrameError, GuestMessage, HostMessage, MAX_CHUNK_LEN, STDIN_WINDOW,
};

use crate::session::ExecStdin;
use crate::Error;

/// How long one write to the guest may block before the channel counts as
/// broken. The guest agent reads continuously, so only a wedged guest
/// makes a write wait this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most events waiting for the run loop. When the host falls behind (a
/// slow terminal), the reader stops reading, the guest's writes stall, and
/// the guest command blocks on a full pipe: a flood of output from the
/// guest costs the host at most this many frames of memory.
pub const EVENT_QUEUE: usize = 64;

/// What the run loop waits for.
#[derive(Debug)]
pub enum Event {
    /// A validated message from the guest.
    Guest(GuestMessage),
    /// The channel ended; `None` for a clean end of stream.
    Closed(Option<FrameError>),
    /// The guest sent a message that fails validation.
    Invalid(String),
}

/// Queues host messages for the writer thread; cheap to clone, never blocks.
#[derive(Clone)]
pub struct ControlSender {
    queue: Sender<HostMessage>,
}

impl ControlSender {
    /// Queues `message`. Fails only once the writer is gone, after a write
    /// failed; whole frames are written or none, so the stream never
    /// carries half a frame followed by another.
    pub fn send(&self, message: HostMessage) -> Result<(), Error> {
        self.queue
            .send(message)
            .map_err(|_| Error::Channel(FrameError::Io(std::io::ErrorKind::BrokenPipe.into())))
    }
}

/// Starts the writer and reader threads on a connected control stream; the
/// reader feeds `events`, and so does the writer if a write fails.
pub fn start(stream: UnixStream, events: SyncSender<Event>) -> Result<ControlSender, Error> {
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(Error::io("cannot configure the control channel"))?;
    let reader = stream
        .try_clone()
        .map_err(Error::io("cannot clone the control channel"))?;
    let writer_events = events.clone();
    thread::Builder::new()
        .name("vmette-control-read".into())
        .spawn(move || read_loop(reader, &events))
        .map_err(Error::io("cannot start the control reader"))?;
    let (queue, outgoing) = mpsc::channel();
    thread::Builder::new()
        .name("vmette-control-write".into())
        .spawn(move || write_loop(stream, &outgoing, &writer_events))
        .map_err(Error::io("cannot start the control writer"))?;
    Ok(ControlSender { queue })
}

fn write_loop(
    mut stream: UnixStream,
    outgoing: &mpsc::Receiver<HostMessage>,
    events: &SyncSender<Event>,
) {
    for message in outgoing {
        if let Err(error) = write_frame(&mut stream, &message) {
            let _ = events.send(Event::Closed(Some(error)));
            return;
        }
    }
}

fn read_loop(mut reader: UnixStream, events: &SyncSender<Event>) {
    loop {
        let event = match read_frame::<_, GuestMessage>(&mut reader) {
            Ok(Some(message)) => match message.validate() {
                Ok(()) => Event::Guest(message),
                Err(e) => Event::Invalid(e.to_string()),
            },
            Ok(None) => Event::Closed(None),
            Err(e) => Event::Closed(Some(e)),
        };
        let last = matches!(event, Event::Closed(_) | Event::Invalid(_));
        if events.send(event).is_err() || last {
            return;
        }
    }
}

/// Counts stdin bytes sent but not yet acknowledged, so that at most
/// [`STDIN_WINDOW`] are in flight.
#[derive(Default)]
pub struct StdinWindow {
    state: Mutex<WindowState>,
    changed: Condvar,
}

#[derive(Default)]
struct WindowState {
    in_flight: usize,
    closed: bool,
}

impl StdinWindow {
    /// Waits for room for `bytes`; `false` once the window is closed.
    pub(crate) fn reserve(&self, bytes: usize) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !state.closed && state.in_flight + bytes > STDIN_WINDOW {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            return false;
        }
        state.in_flight += bytes;
        true
    }

    /// The guest acknowledged `bytes`; `false` when it acknowledges more
    /// than was sent, which only a broken or hostile guest does.
    #[must_use]
    pub fn release(&self, bytes: usize) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if bytes > state.in_flight {
            return false;
        }
        state.in_flight -= bytes;
        self.changed.notify_all();
        true
    }

    /// Stops the pump: the exec ended.
    pub fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.closed = true;
        self.changed.notify_all();
    }
}

/// Forwards `source` to an exec's stdin in windowed chunks, then sends
/// end-of-file. Runs on its own thread: a source that blocks for ever (a
/// terminal, a pipe nobody closes) blocks only this thread, never the run.
pub fn pump_stdin(mut source: impl Read + Send + 'static, stdin: ExecStdin) {
    let spawned = thread::Builder::new()
        .name("vmette-stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_CHUNK_LEN];
            loop {
                let n = match source.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                if stdin.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            let _ = stdin.close();
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the stdin thread: {e}");
    }
}

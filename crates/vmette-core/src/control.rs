//! The host's end of the control channel: a writer shared by the threads
//! that send, and a reader thread that validates every guest message and
//! turns it into an [`Event`].

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use vmette_proto::{
    read_frame, write_frame, ExecId, FrameError, GuestMessage, HostMessage, MAX_CHUNK_LEN,
    STDIN_WINDOW,
};

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
    /// The caller asked to interrupt the run with this signal.
    Interrupt(i32),
}

/// Sends host messages; cheap to clone, safe to share between threads.
#[derive(Clone)]
pub struct ControlSender {
    stream: Arc<Mutex<UnixStream>>,
}

impl ControlSender {
    pub fn send(&self, message: &HostMessage) -> Result<(), Error> {
        let mut stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        write_frame(&mut *stream, message).map_err(Error::Channel)
    }
}

/// Splits a connected control stream into a sender and a reader thread that
/// feeds `events`.
pub fn start(stream: UnixStream, events: SyncSender<Event>) -> Result<ControlSender, Error> {
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(Error::io("cannot configure the control channel"))?;
    let reader = stream
        .try_clone()
        .map_err(Error::io("cannot clone the control channel"))?;
    thread::Builder::new()
        .name("vmette-control".into())
        .spawn(move || read_loop(reader, &events))
        .map_err(Error::io("cannot start the control reader"))?;
    Ok(ControlSender {
        stream: Arc::new(Mutex::new(stream)),
    })
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
    fn reserve(&self, bytes: usize) -> bool {
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

    /// The guest acknowledged `bytes`.
    pub fn release(&self, bytes: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.in_flight = state.in_flight.saturating_sub(bytes);
        self.changed.notify_all();
    }

    /// Stops the pump: the exec ended.
    pub fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.closed = true;
        self.changed.notify_all();
    }
}

/// Forwards `source` to the exec's stdin in windowed chunks, then sends
/// end-of-file. Runs on its own thread: a source that blocks for ever (a
/// terminal, a pipe nobody closes) blocks only this thread, never the run.
pub fn pump_stdin(
    id: ExecId,
    mut source: impl Read + Send + 'static,
    sender: ControlSender,
    window: Arc<StdinWindow>,
) {
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
                if !window.reserve(n) {
                    return;
                }
                let chunk = HostMessage::Stdin {
                    id,
                    data: buf[..n].to_vec(),
                };
                if sender.send(&chunk).is_err() {
                    return;
                }
            }
            let _ = sender.send(&HostMessage::StdinEof { id });
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the stdin thread: {e}");
    }
}

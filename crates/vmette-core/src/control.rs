//! The host's end of the control channel: a writer thread fed by a queue,
//! and a reader thread that validates every guest message and turns it into
//! an [`Event`].
//!
//! Nothing the session's monitor sends ever blocks on the socket: a guest
//! that stops reading stalls only the writer thread, never the monitor,
//! which can still honour deadlines and stop requests by killing the VM.
//! What waits for the writer is bounded: stdin data by
//! [`QUEUED_DATA_LIMIT`] (its senders wait for room), output credit by
//! merging all credit for one stream into one pending count, and each frame
//! by [`FRAME_DEADLINE`], after which a guest that reads too slowly has
//! broken the channel.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use vmette_proto::{
    read_frame, write_frame, ExecId, FrameError, GuestMessage, HostMessage, OutputStream,
    MAX_CHUNK_LEN, OUTPUT_WINDOW, STDIN_WINDOW,
};

use crate::session::ExecStdin;
use crate::Error;

/// How long the guest may take to read one whole frame. The agent reads
/// continuously, so only a wedged or hostile guest takes this long.
const FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// Most stdin bytes queued for the writer, over all execs. Stdin senders
/// wait while the queue holds this much, so a guest that acknowledges
/// stdin it has not been sent yet cannot make the host buffer more.
pub const QUEUED_DATA_LIMIT: usize = 1 << 20;

/// Most events waiting for the monitor. When the host falls behind, the
/// reader stops reading, and the guest's writes stall: a flood of frames
/// costs the host at most this many frames of memory.
pub const EVENT_QUEUE: usize = 64;

/// What the monitor waits for.
#[derive(Debug)]
pub enum Event {
    /// A validated message from the guest.
    Guest(GuestMessage),
    /// The channel ended; `None` for a clean end of stream.
    Closed(Option<FrameError>),
    /// The guest sent a message that fails validation, a frame that cannot
    /// be one, or stopped reading.
    Invalid(String),
    /// The host asks the monitor to look at the session's state now (a
    /// stop was requested), rather than at its next tick.
    Wake,
}

/// Queues host messages for the writer thread; cheap to clone.
#[derive(Clone)]
pub struct ControlSender {
    outgoing: Arc<Outgoing>,
}

struct Outgoing {
    state: Mutex<OutgoingState>,
    changed: Condvar,
}

#[derive(Default)]
struct OutgoingState {
    messages: VecDeque<HostMessage>,
    /// Stdin bytes among `messages`.
    queued_data: usize,
    /// Credit not yet written, one count per stream.
    credit: HashMap<(ExecId, OutputStream), usize>,
    /// The writer is gone, or the session told it to go.
    closed: bool,
}

fn broken_pipe() -> Error {
    Error::Channel(FrameError::Io(std::io::ErrorKind::BrokenPipe.into()))
}

impl ControlSender {
    fn lock(&self) -> MutexGuard<'_, OutgoingState> {
        self.outgoing
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `message`. Stdin data waits while [`QUEUED_DATA_LIMIT`] bytes
    /// are queued; everything else is queued at once. Fails once the writer
    /// is gone; whole frames are written or none, so the stream never
    /// carries half a frame followed by another.
    pub fn send(&self, message: HostMessage) -> Result<(), Error> {
        let data = match &message {
            HostMessage::Stdin { data, .. } => data.len(),
            _ => 0,
        };
        let mut state = self.lock();
        while data > 0 && !state.closed && state.queued_data + data > QUEUED_DATA_LIMIT {
            state = self
                .outgoing
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            return Err(broken_pipe());
        }
        state.queued_data += data;
        state.messages.push_back(message);
        self.outgoing.changed.notify_all();
        Ok(())
    }

    /// Grants the guest `bytes` more of an exec's output stream. Credit
    /// not yet written is merged, so credit never piles up in the queue.
    pub fn credit(&self, id: ExecId, stream: OutputStream, bytes: usize) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        let pending = state.credit.entry((id, stream)).or_default();
        *pending = (*pending + bytes).min(OUTPUT_WINDOW);
        self.outgoing.changed.notify_all();
    }

    /// Ends the writer once it has written what is queued; later sends fail.
    pub fn close(&self) {
        self.lock().closed = true;
        self.outgoing.changed.notify_all();
    }

    /// The next frames to write: all pending credit, then one message;
    /// `None` once closed with nothing left.
    fn next_batch(&self) -> Option<Vec<HostMessage>> {
        let mut state = self.lock();
        loop {
            let mut batch: Vec<HostMessage> = state
                .credit
                .drain()
                .map(|((id, stream), bytes)| HostMessage::OutputCredit {
                    id,
                    stream,
                    bytes: bytes as u32,
                })
                .collect();
            if let Some(message) = state.messages.pop_front() {
                batch.push(message);
            }
            if !batch.is_empty() {
                return Some(batch);
            }
            if state.closed {
                return None;
            }
            state = self
                .outgoing
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// A stdin chunk left the queue.
    fn written(&self, message: &HostMessage) {
        if let HostMessage::Stdin { data, .. } = message {
            let mut state = self.lock();
            state.queued_data = state.queued_data.saturating_sub(data.len());
            self.outgoing.changed.notify_all();
        }
    }
}

/// Starts the writer and reader threads on a connected control stream; the
/// reader feeds `events`, and so does the writer if a write fails.
pub fn start(stream: UnixStream, events: SyncSender<Event>) -> Result<ControlSender, Error> {
    let reader = stream
        .try_clone()
        .map_err(Error::io("cannot clone the control channel"))?;
    let writer_events = events.clone();
    thread::Builder::new()
        .name("vmette-control-read".into())
        .spawn(move || read_loop(reader, &events))
        .map_err(Error::io("cannot start the control reader"))?;
    let sender = ControlSender {
        outgoing: Arc::new(Outgoing {
            state: Mutex::new(OutgoingState::default()),
            changed: Condvar::new(),
        }),
    };
    let writer = sender.clone();
    thread::Builder::new()
        .name("vmette-control-write".into())
        .spawn(move || write_loop(stream, &writer, &writer_events))
        .map_err(Error::io("cannot start the control writer"))?;
    Ok(sender)
}

fn write_loop(mut stream: UnixStream, sender: &ControlSender, events: &SyncSender<Event>) {
    let mut frame = Vec::new();
    while let Some(batch) = sender.next_batch() {
        for message in batch {
            frame.clear();
            let written = write_frame(&mut frame, &message)
                .and_then(|()| write_by(&mut stream, &frame, Instant::now() + FRAME_DEADLINE));
            sender.written(&message);
            if let Err(error) = written {
                sender.close();
                let event = match error {
                    FrameError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        Event::Invalid(format!(
                            "the guest did not read a frame within {FRAME_DEADLINE:?}"
                        ))
                    }
                    other => Event::Closed(Some(other)),
                };
                let _ = events.send(event);
                return;
            }
        }
    }
}

/// Writes all of `bytes` before `deadline`, however slowly the peer reads.
fn write_by(
    stream: &mut UnixStream,
    mut bytes: &[u8],
    deadline: Instant,
) -> Result<(), FrameError> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FrameError::Io(std::io::ErrorKind::TimedOut.into()));
        }
        stream
            .set_write_timeout(Some(left))
            .map_err(FrameError::Io)?;
        match stream.write(bytes) {
            Ok(0) => return Err(FrameError::Io(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(FrameError::Io(std::io::ErrorKind::TimedOut.into()))
            }
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

fn read_loop(mut reader: UnixStream, events: &SyncSender<Event>) {
    loop {
        let event = match read_frame::<_, GuestMessage>(&mut reader) {
            Ok(Some(message)) => match message.validate() {
                Ok(()) => Event::Guest(message),
                Err(e) => Event::Invalid(e.to_string()),
            },
            Ok(None) => Event::Closed(None),
            // A frame no honest agent sends breaks the protocol; a stream
            // that ends or fails is the VM going away.
            Err(e @ (FrameError::TooLarge(_) | FrameError::Malformed(_))) => {
                Event::Invalid(e.to_string())
            }
            Err(e) => Event::Closed(Some(e)),
        };
        let last = matches!(event, Event::Closed(_) | Event::Invalid(_));
        if events.send(event).is_err() || last {
            return;
        }
    }
}

/// What [`StdinWindow::reserve`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reserved {
    /// Room for the bytes.
    Granted,
    /// The exec ended.
    Closed,
    /// The deadline passed first.
    TimedOut,
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
    /// Waits for room for `bytes`, until `deadline` if there is one.
    pub(crate) fn reserve(&self, bytes: usize, deadline: Option<Instant>) -> Reserved {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !state.closed && state.in_flight + bytes > STDIN_WINDOW {
            state = match deadline {
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Reserved::TimedOut;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        if state.closed {
            return Reserved::Closed;
        }
        state.in_flight += bytes;
        Reserved::Granted
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

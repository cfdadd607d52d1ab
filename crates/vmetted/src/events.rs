//! An exec's output as numbered events, kept for clients that read it as
//! Server-Sent Events.
//!
//! A pump thread moves events from the library's [`vmette::Exec`] into a
//! bounded buffer, and only while the buffer has room: the exec's credit
//! is granted as the pump takes events, so while nobody reads, the exec is
//! paused, never its output dropped. An event leaves the buffer once a
//! client has been sent it. A client that comes back with `Last-Event-ID`
//! gets everything after that id; if another client took part of it
//! meanwhile, first a `gap` event saying how many bytes it missed.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use base64::Engine as _;
use vmette::{Exec, ExecEvent, ExecStatus};
use vmette_api::EventData;

/// Most output bytes an exec's buffer holds before its pump waits.
pub const BUFFER_BYTES: usize = 1 << 20;

/// How many delivered events are remembered, for gap reports.
const DELIVERED_MEMORY: usize = 4096;

/// One event, numbered.
#[derive(Debug, Clone)]
pub struct Numbered {
    /// `stdout`, `stderr`, `pty`, `exit`, `failed` or `gap`.
    pub kind: &'static str,
    /// What the client gets as the event's data; its `seq` is the SSE id.
    pub data: EventData,
    /// Output bytes in this event (for the buffer's bound and gaps).
    bytes: u64,
}

/// The events of one exec.
pub struct Events {
    state: Mutex<State>,
    /// Wakes the pump when a client took events.
    room: Condvar,
    /// Wakes clients when events arrive.
    pub arrived: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Numbered>,
    queued_bytes: usize,
    next_seq: u64,
    /// `(seq, bytes)` of events already delivered, most recent last.
    delivered: VecDeque<(u64, u64)>,
    /// The exit or failure event has been queued.
    ended: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a client gets next.
pub enum Next {
    /// These events, in order.
    Events(Vec<Numbered>),
    /// Nothing yet; wait for [`Events::arrived`].
    Wait,
    /// The exec ended and the client has had everything.
    End,
}

impl Events {
    /// Starts pumping `exec`'s events into a new buffer.
    pub fn pump(exec: Arc<Exec>, pty: bool) -> std::io::Result<Arc<Events>> {
        let events = Arc::new(Events {
            state: Mutex::new(State {
                next_seq: 1,
                ..State::default()
            }),
            room: Condvar::new(),
            arrived: tokio::sync::Notify::new(),
        });
        let sink = Arc::clone(&events);
        std::thread::Builder::new()
            .name("vmetted-exec".into())
            .spawn(move || sink.run(&exec, pty))?;
        Ok(events)
    }

    fn run(&self, exec: &Exec, pty: bool) {
        loop {
            {
                let mut state = lock(&self.state);
                while state.queued_bytes >= BUFFER_BYTES {
                    state = self
                        .room
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
            let event = match exec.next_event() {
                Some(ExecEvent::Stdout(data)) => output(if pty { "pty" } else { "stdout" }, &data),
                Some(ExecEvent::Stderr(data)) => output("stderr", &data),
                Some(ExecEvent::Exit(status)) => exit(&status),
                None => return,
            };
            let last = matches!(event.kind, "exit" | "failed");
            self.push(event);
            if last {
                return;
            }
        }
    }

    fn push(&self, mut event: Numbered) {
        let mut state = lock(&self.state);
        event.data.seq = state.next_seq;
        state.next_seq += 1;
        state.queued_bytes += event.bytes as usize;
        if matches!(event.kind, "exit" | "failed") {
            state.ended = true;
        }
        state.queue.push_back(event);
        drop(state);
        self.arrived.notify_waiters();
    }

    /// The events after `after` (a client's last seen id, 0 for none),
    /// taken out of the buffer as they are handed over.
    pub fn next(&self, after: u64) -> Next {
        let mut state = lock(&self.state);
        let mut out = Vec::new();
        let first = state.queue.front().map_or(state.next_seq, |e| e.data.seq);
        if after + 1 < first {
            // Someone else took events this client has not seen.
            let missed: u64 = state
                .delivered
                .iter()
                .filter(|(seq, _)| *seq > after)
                .map(|(_, bytes)| bytes)
                .sum();
            out.push(Numbered {
                kind: "gap",
                data: EventData {
                    seq: first - 1,
                    missed_bytes: Some(missed),
                    ..EventData::default()
                },
                bytes: 0,
            });
        }
        while let Some(event) = state.queue.pop_front() {
            state.queued_bytes -= event.bytes as usize;
            state.delivered.push_back((event.data.seq, event.bytes));
            if state.delivered.len() > DELIVERED_MEMORY {
                state.delivered.pop_front();
            }
            if event.data.seq > after {
                out.push(event);
            }
        }
        if !out.is_empty() {
            drop(state);
            self.room.notify_all();
            return Next::Events(out);
        }
        if state.ended {
            Next::End
        } else {
            Next::Wait
        }
    }

    /// Whether the exit has been queued and everything handed over.
    pub fn drained(&self) -> bool {
        let state = lock(&self.state);
        state.ended && state.queue.is_empty()
    }
}

fn event(kind: &'static str, data: EventData) -> Numbered {
    Numbered {
        kind,
        data,
        bytes: 0,
    }
}

fn output(kind: &'static str, data: &[u8]) -> Numbered {
    Numbered {
        kind,
        data: EventData {
            data: Some(base64::engine::general_purpose::STANDARD.encode(data)),
            ..EventData::default()
        },
        bytes: data.len() as u64,
    }
}

fn exit(status: &ExecStatus) -> Numbered {
    let ended = |reason: &str| EventData {
        exit_code: Some(status.shell_code()),
        reason: Some(reason.into()),
        ..EventData::default()
    };
    match status {
        ExecStatus::Exited(_) => event("exit", ended("exited")),
        ExecStatus::Signaled(signal) => event(
            "exit",
            EventData {
                signal: Some(*signal),
                ..ended("signaled")
            },
        ),
        ExecStatus::TimedOut => event("exit", ended("timed_out")),
        ExecStatus::SessionEnded(reason) => event(
            "exit",
            EventData {
                message: Some(reason.to_string()),
                ..ended("session_ended")
            },
        ),
        ExecStatus::NotStarted { message, .. } => event(
            "failed",
            EventData {
                exit_code: Some(status.shell_code()),
                message: Some(message.clone()),
                ..EventData::default()
            },
        ),
    }
}

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
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use base64::Engine as _;
use vmette::{Exec, ExecEvent, ExecStatus};
use vmette_api::{EventData, ExecEnd};

use crate::api::lock;

/// Most bytes an exec's buffer holds before its pump waits, output and a
/// fixed cost per event together, so that a flood of tiny events is
/// bounded as tightly as a few large ones.
pub const BUFFER_BYTES: usize = 1 << 20;

/// What each queued event counts against [`BUFFER_BYTES`] besides its
/// output: its own struct and bookkeeping.
const EVENT_COST: usize = 256;

/// Adjacent output of one kind is merged into one event up to this size,
/// so that many small writes cost few events.
const MERGE_UP_TO: usize = 64 * 1024;

/// Most events handed to a client at once.
const BATCH: usize = 64;

/// How many delivered events are remembered, for gap reports.
const DELIVERED_MEMORY: usize = 4096;

/// One event, numbered.
#[derive(Debug, Clone)]
pub struct Numbered {
    /// `stdout`, `stderr`, `pty`, `exit`, `failed` or `gap`.
    pub kind: &'static str,
    /// What the client gets as the event's data (without the output
    /// bytes, which [`Numbered::data`] adds); its `seq` is the SSE id.
    meta: EventData,
    /// Output bytes, raw; base64 only when sent.
    output: Vec<u8>,
}

impl Numbered {
    /// The event's sequence number.
    pub fn seq(&self) -> u64 {
        self.meta.seq
    }

    /// Its output bytes, if it is output.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// The event's data as the client gets it.
    pub fn data(&self) -> EventData {
        let mut data = self.meta.clone();
        if !self.output.is_empty() {
            data.data = Some(base64::engine::general_purpose::STANDARD.encode(&self.output));
        }
        data
    }

    fn cost(&self) -> usize {
        self.output.len() + EVENT_COST
    }
}

/// The events of one exec.
pub struct Events {
    state: Mutex<State>,
    /// Wakes the pump when a client took events, or the buffer closed.
    room: Condvar,
    /// Wakes clients when events arrive.
    arrived: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Numbered>,
    queued_cost: usize,
    next_seq: u64,
    /// `(seq, bytes)` of events already delivered, most recent last.
    delivered: VecDeque<(u64, u64)>,
    /// The exit or failure event has been queued.
    ended: bool,
    /// The exit or failure event, kept once delivered so that a client
    /// that lost its connection just before it still learns the status.
    last: Option<Numbered>,
    /// Nobody will read any more (the session is gone): the pump stops.
    closed: bool,
}

/// What a client gets next.
enum Next {
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

    /// Stops the pump and releases the buffer: nobody will read it.
    pub fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.queue.clear();
        state.queued_cost = 0;
        drop(state);
        self.room.notify_all();
        self.arrived.notify_waiters();
    }

    fn run(&self, exec: &Exec, pty: bool) {
        loop {
            {
                let mut state = lock(&self.state);
                while state.queued_cost >= BUFFER_BYTES && !state.closed {
                    state = self
                        .room
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if state.closed {
                    return;
                }
            }
            let event = match exec.next_event() {
                Some(ExecEvent::Stdout(data)) => output(if pty { "pty" } else { "stdout" }, data),
                Some(ExecEvent::Stderr(data)) => output("stderr", data),
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
        if state.closed {
            return;
        }
        // Output right after output of the same kind, not yet handed out,
        // joins it.
        if !event.output.is_empty() {
            if let Some(tail) = state.queue.back_mut() {
                if tail.kind == event.kind && tail.output.len() + event.output.len() <= MERGE_UP_TO
                {
                    tail.output.extend_from_slice(&event.output);
                    state.queued_cost += event.output.len();
                    drop(state);
                    self.arrived.notify_waiters();
                    return;
                }
            }
        }
        event.meta.seq = state.next_seq;
        state.next_seq += 1;
        state.queued_cost += event.cost();
        if matches!(event.kind, "exit" | "failed") {
            state.ended = true;
        }
        state.queue.push_back(event);
        drop(state);
        self.arrived.notify_waiters();
    }

    /// The events after `after` (a client's last seen id, 0 for none),
    /// taken out of the buffer as they are handed over.
    fn next(&self, after: u64) -> Next {
        let mut state = lock(&self.state);
        // An id this exec never gave out is as good as the last one.
        let after = after.min(state.next_seq.saturating_sub(1));
        let mut out = Vec::new();
        let first = state.queue.front().map_or(state.next_seq, Numbered::seq);
        if after.saturating_add(1) < first {
            // Someone else took events this client has not seen.
            let missed: u64 = state
                .delivered
                .iter()
                .filter(|(seq, _)| *seq > after)
                .map(|(_, bytes)| bytes)
                .sum();
            if missed > 0 {
                out.push(Numbered {
                    kind: "gap",
                    meta: EventData {
                        seq: first - 1,
                        missed_bytes: Some(missed),
                        ..EventData::default()
                    },
                    output: Vec::new(),
                });
            }
            if let Some(last) = state.last.clone().filter(|last| last.seq() > after) {
                out.push(last);
            }
        }
        while out.len() < BATCH {
            let Some(event) = state.queue.pop_front() else {
                break;
            };
            state.queued_cost -= event.cost();
            state
                .delivered
                .push_back((event.seq(), event.output.len() as u64));
            if state.delivered.len() > DELIVERED_MEMORY {
                state.delivered.pop_front();
            }
            if matches!(event.kind, "exit" | "failed") {
                state.last = Some(event.clone());
            }
            out.push(event);
        }
        if !out.is_empty() {
            drop(state);
            self.room.notify_all();
            return Next::Events(out);
        }
        if state.ended || state.closed {
            Next::End
        } else {
            Next::Wait
        }
    }

    /// The next events after `after`, waiting for them; `None` once the
    /// exec ended and everything was handed over, or the buffer closed.
    /// Cancel-safe: events are taken only in the poll that returns them.
    pub async fn wait_next(&self, after: u64) -> Option<Vec<Numbered>> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            match self.next(after) {
                Next::Events(batch) => return Some(batch),
                Next::End => return None,
                Next::Wait => arrived.await,
            }
        }
    }

    /// Whether the exit has been queued and everything handed over.
    pub fn drained(&self) -> bool {
        let state = lock(&self.state);
        state.ended && state.queue.is_empty()
    }
}

fn event(kind: &'static str, meta: EventData) -> Numbered {
    Numbered {
        kind,
        meta,
        output: Vec::new(),
    }
}

fn output(kind: &'static str, data: Vec<u8>) -> Numbered {
    Numbered {
        kind,
        meta: EventData::default(),
        output: data,
    }
}

fn exit(status: &ExecStatus) -> Numbered {
    let ended = |reason: &str, end: ExecEnd| EventData {
        end: ExecEnd {
            exit_code: Some(status.shell_code()),
            reason: Some(reason.into()),
            ..end
        },
        ..EventData::default()
    };
    match status {
        ExecStatus::Exited(_) => event("exit", ended("exited", ExecEnd::default())),
        ExecStatus::Signaled(signal) => event(
            "exit",
            ended(
                "signaled",
                ExecEnd {
                    signal: Some(*signal),
                    ..ExecEnd::default()
                },
            ),
        ),
        ExecStatus::TimedOut => event("exit", ended("timed_out", ExecEnd::default())),
        ExecStatus::SessionEnded(reason) => event(
            "exit",
            ended(
                "session_ended",
                ExecEnd {
                    message: Some(reason.to_string()),
                    ..ExecEnd::default()
                },
            ),
        ),
        ExecStatus::NotStarted { message, .. } => event(
            "failed",
            EventData {
                end: ExecEnd {
                    exit_code: Some(status.shell_code()),
                    message: Some(message.clone()),
                    ..ExecEnd::default()
                },
                ..EventData::default()
            },
        ),
    }
}

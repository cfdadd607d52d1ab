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
use serde::Serialize;
use vmette::{Exec, ExecEvent, ExecStatus};

/// Most output bytes an exec's buffer holds before its pump waits.
pub const BUFFER_BYTES: usize = 1 << 20;

/// How many delivered events are remembered, for gap reports.
const DELIVERED_MEMORY: usize = 4096;

/// One event as a client sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Numbered {
    /// Its sequence number, the SSE id.
    pub seq: u64,
    /// `stdout`, `stderr`, `pty`, `exit`, `failed` or `gap`.
    #[serde(skip)]
    pub kind: &'static str,
    /// Output bytes, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// For `exit`: the shell's exit code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// For `exit`: how it ended (`exited`, `signaled`, `timed_out`,
    /// `session_ended`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `exit` after a signal: the signal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// For `failed` and `session_ended`: one sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For `gap`: bytes of output this client missed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed_bytes: Option<u64>,
    /// Output bytes in this event (for gap accounting).
    #[serde(skip)]
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
        event.seq = state.next_seq;
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
        let first = state.queue.front().map_or(state.next_seq, |e| e.seq);
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
                missed_bytes: Some(missed),
                ..blank(first - 1)
            });
        }
        while let Some(event) = state.queue.pop_front() {
            state.queued_bytes -= event.bytes as usize;
            state.delivered.push_back((event.seq, event.bytes));
            if state.delivered.len() > DELIVERED_MEMORY {
                state.delivered.pop_front();
            }
            if event.seq > after {
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

fn blank(seq: u64) -> Numbered {
    Numbered {
        seq,
        kind: "",
        data: None,
        exit_code: None,
        reason: None,
        signal: None,
        message: None,
        missed_bytes: None,
        bytes: 0,
    }
}

fn output(kind: &'static str, data: &[u8]) -> Numbered {
    Numbered {
        kind,
        data: Some(base64::engine::general_purpose::STANDARD.encode(data)),
        bytes: data.len() as u64,
        ..blank(0)
    }
}

fn exit(status: &ExecStatus) -> Numbered {
    let code = Some(status.shell_code());
    match status {
        ExecStatus::Exited(_) => Numbered {
            kind: "exit",
            exit_code: code,
            reason: Some("exited".into()),
            ..blank(0)
        },
        ExecStatus::Signaled(signal) => Numbered {
            kind: "exit",
            exit_code: code,
            reason: Some("signaled".into()),
            signal: Some(*signal),
            ..blank(0)
        },
        ExecStatus::TimedOut => Numbered {
            kind: "exit",
            exit_code: code,
            reason: Some("timed_out".into()),
            ..blank(0)
        },
        ExecStatus::SessionEnded(reason) => Numbered {
            kind: "exit",
            exit_code: code,
            reason: Some("session_ended".into()),
            message: Some(reason.to_string()),
            ..blank(0)
        },
        ExecStatus::NotStarted { message, .. } => Numbered {
            kind: "failed",
            exit_code: code,
            message: Some(message.clone()),
            ..blank(0)
        },
    }
}

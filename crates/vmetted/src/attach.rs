//! Interactive attach: an exec's stdin, output, terminal size and status
//! over one WebSocket, for browsers, `websockets` clients and TypeScript
//! programs.
//!
//! In the manner of Kubernetes' `v5.channel.k8s.io`, every message is
//! binary and its first byte names a channel ([`vmette_api::channel`]);
//! the subprotocol [`ATTACH_PROTOCOL`] is the version. Output comes from
//! the same buffer as the SSE route, a send at a time, so a client that
//! does not read pauses the exec rather than growing a queue here. Stdin
//! goes through a small queue to a writer of its own, so that a command
//! that does not read its input cannot stop its output from flowing. One
//! client attaches to an exec at a time; a second would split its output.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use tokio::sync::mpsc;
use vmette::{ExecStdin, PtySize, MAX_CHUNK_LEN};
use vmette_api::{channel, AttachStatus, ResizeRequest, ATTACH_PROTOCOL};

use crate::api::{lock, sentence, tracked, ApiError, ApiPath, ApiResult, Daemon, Tracked};
use crate::events::Numbered;
use crate::listener::ConnectionSlot;

/// Largest message (and frame) a client may send: one stdin chunk and its
/// channel byte. Anything larger closes the connection with 1009.
pub const MAX_MESSAGE: usize = MAX_CHUNK_LEN + 1;

/// Most bytes queued for sending before a send waits for the client.
const MAX_WRITE_BUFFER: usize = 4 * MAX_MESSAGE;

/// How often the daemon pings a client.
const PING_EVERY: Duration = Duration::from_secs(20);

/// A client that sends nothing, not even a pong, for this long is gone.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// Stdin messages waiting for the command to read them; beyond these, the
/// client's further messages wait unread.
const STDIN_QUEUE: usize = 4;

/// How long one stdin write waits for room before it looks whether the
/// client is still there.
const STDIN_CHECK_EVERY: Duration = Duration::from_secs(1);

/// `GET /v1/sessions/{id}/execs/{exec}/attach`: the WebSocket upgrade.
pub async fn attach(
    State(daemon): State<Arc<Daemon>>,
    ApiPath((id, exec)): ApiPath<(String, u32)>,
    slot: Option<Extension<ConnectionSlot>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let tracked = tracked(&daemon, &id, exec)?;
    let upgrade = upgrade
        .map_err(|rejection| {
            ApiError::new(rejection.status(), "bad_request", rejection.body_text())
        })?
        .protocols([ATTACH_PROTOCOL]);
    if upgrade.selected_protocol().is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the WebSocket must offer the subprotocol {ATTACH_PROTOCOL}"),
        ));
    }
    if tracked.attached.swap(true, Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            format!("another client is attached to exec {exec}; it would split the output"),
        ));
    }
    let attached = Attached(tracked);
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            // The connection keeps its slot among the daemon's connections.
            let _slot = slot;
            serve(socket, attached).await;
        }))
}

/// An exec with a client attached; dropping it lets the next one attach.
struct Attached(Arc<Tracked>);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.attached.store(false, Ordering::SeqCst);
    }
}

/// What the client asked for stdin, in order.
enum Input {
    Data(Vec<u8>),
    Close,
}

/// How one attach ends: with a close frame for the client, or because the
/// client went away.
type Ending = Option<CloseFrame>;

fn closing(code: u16, reason: &str) -> Ending {
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

async fn serve(mut socket: WebSocket, attached: Attached) {
    let tracked = &attached.0;
    let gone = Arc::new(AtomicBool::new(false));
    let (stdin, mut refused) = start_stdin_writer(Arc::clone(tracked), Arc::clone(&gone));
    let mut after = 0;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut heard = Instant::now();
    let ending = loop {
        tokio::select! {
            message = socket.recv() => {
                heard = Instant::now();
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => break failure(&error),
                    None => break None,
                };
                match message {
                    Message::Binary(bytes) => {
                        match received(tracked, &stdin, &bytes).await {
                            Received::Fine => {}
                            Received::Refused(message) => {
                                if send_status(&mut socket, error_status(message)).await.is_err() {
                                    break None;
                                }
                            }
                            Received::Violation(ending) => break ending,
                        }
                    }
                    Message::Text(_) => {
                        break closing(close_code::UNSUPPORTED, "only binary messages are understood")
                    }
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Close(_) => break None,
                }
            }
            batch = tracked.events.wait_next(after) => {
                let Some(batch) = batch else {
                    break closing(close_code::AWAY, "the session is gone");
                };
                match forward(&mut socket, &mut after, batch, tracked.pty).await {
                    Ok(false) => {}
                    Ok(true) => break closing(close_code::NORMAL, "the command ended"),
                    Err(()) => break None,
                }
            }
            Some(message) = refused.recv() => {
                if send_status(&mut socket, error_status(message)).await.is_err() {
                    break None;
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > SILENCE_LIMIT {
                    break closing(close_code::AWAY, "no pong for a minute");
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
        }
    };
    gone.store(true, Ordering::SeqCst);
    if let Some(frame) = ending {
        let _ = socket.send(Message::Close(Some(frame))).await;
        // The client's close, briefly: then the connection ends cleanly.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(Ok(message)) = socket.recv().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// How a read failed, as what the client is told: an oversized message
/// gets 1009; anything else was a broken connection or protocol.
fn failure(error: &axum::Error) -> Ending {
    let text = sentence(error);
    if text.contains("Message too long") || text.contains("Frame too long") {
        closing(
            close_code::SIZE,
            &format!("messages may have at most {MAX_MESSAGE} bytes"),
        )
    } else {
        tracing::debug!("an attach ended: {text}");
        None
    }
}

/// What came of one client message.
enum Received {
    Fine,
    /// Refused, with a sentence for the status channel; the attach goes on.
    Refused(String),
    /// The client broke the protocol; the attach ends.
    Violation(Ending),
}

async fn received(tracked: &Tracked, stdin: &mpsc::Sender<Input>, bytes: &[u8]) -> Received {
    let Some((&kind, payload)) = bytes.split_first() else {
        return Received::Violation(closing(
            close_code::POLICY,
            "a message must begin with its channel byte",
        ));
    };
    match kind {
        channel::STDIN => {
            if !tracked.takes_stdin {
                return Received::Refused(
                    "this exec reads no stdin; create it with \"stdin\": true".into(),
                );
            }
            // Waits while the queue is full: the client's next messages
            // stay unread until the command reads.
            if stdin.send(Input::Data(payload.to_vec())).await.is_err() {
                return Received::Violation(None);
            }
            Received::Fine
        }
        channel::RESIZE => {
            let size: ResizeRequest = match serde_json::from_slice(payload) {
                Ok(size) => size,
                Err(e) => {
                    return Received::Refused(format!("the resize message is not valid: {e}"))
                }
            };
            match tracked.exec.resize(PtySize {
                rows: size.rows,
                cols: size.cols,
            }) {
                Ok(()) => Received::Fine,
                Err(e) => Received::Refused(sentence(&e)),
            }
        }
        channel::CLOSE => {
            if payload != [channel::STDIN] {
                return Received::Refused("only stdin (channel 0) can be closed".into());
            }
            if !tracked.takes_stdin {
                return Received::Refused("this exec reads no stdin to close".into());
            }
            if stdin.send(Input::Close).await.is_err() {
                return Received::Violation(None);
            }
            Received::Fine
        }
        other => Received::Violation(closing(
            close_code::POLICY,
            &format!("channel {other} is not one a client sends on"),
        )),
    }
}

/// Sends `batch`'s output on its channels and an exit as a status; true
/// once the exec's end was sent. Output another client already took is
/// not sent again, so a `gap` is passed over.
async fn forward(
    socket: &mut WebSocket,
    after: &mut u64,
    batch: Vec<Numbered>,
    pty: bool,
) -> Result<bool, ()> {
    for event in batch {
        *after = (*after).max(event.seq());
        let message = match event.kind {
            "stdout" | "pty" => framed(channel::STDOUT, event.output()),
            "stderr" if !pty => framed(channel::STDERR, event.output()),
            "exit" | "failed" => {
                let data = event.data();
                let status = AttachStatus {
                    kind: event.kind.into(),
                    exit_code: data.exit_code,
                    reason: data.reason,
                    signal: data.signal,
                    message: data.message,
                };
                send_status(socket, status).await?;
                return Ok(true);
            }
            _ => continue,
        };
        socket.send(message).await.map_err(|_| ())?;
    }
    Ok(false)
}

fn framed(channel: u8, payload: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(payload.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(payload);
    Message::Binary(bytes.into())
}

fn error_status(message: String) -> AttachStatus {
    AttachStatus {
        kind: "error".into(),
        exit_code: None,
        reason: None,
        signal: None,
        message: Some(message),
    }
}

async fn send_status(socket: &mut WebSocket, status: AttachStatus) -> Result<(), ()> {
    let json = serde_json::to_vec(&status).map_err(|_| ())?;
    socket
        .send(framed(channel::STATUS, &json))
        .await
        .map_err(|_| ())
}

/// Starts the writer that feeds the exec's stdin, on a blocking thread
/// that ends once the attach does. Its refusals come back as sentences.
fn start_stdin_writer(
    tracked: Arc<Tracked>,
    gone: Arc<AtomicBool>,
) -> (mpsc::Sender<Input>, mpsc::Receiver<String>) {
    let (inputs, mut queue) = mpsc::channel(STDIN_QUEUE);
    let (refusals, refused) = mpsc::channel(1);
    tokio::task::spawn_blocking(move || {
        let stdin = tracked.exec.stdin();
        while let Some(input) = queue.blocking_recv() {
            // A stdin request over HTTP finishes first.
            let _writing = lock(&tracked.stdin);
            let written = match input {
                Input::Data(data) => write_patiently(&stdin, &data, &gone),
                Input::Close => stdin.close(),
            };
            if gone.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = written {
                let _ = refusals.try_send(sentence(&e));
            }
        }
    });
    (inputs, refused)
}

/// Writes `data` (at most one chunk, so all or nothing of it) once the
/// command has room, for as long as the client is attached.
fn write_patiently(stdin: &ExecStdin, data: &[u8], gone: &AtomicBool) -> Result<(), vmette::Error> {
    loop {
        match stdin.write_all_within(data, Some(STDIN_CHECK_EVERY)) {
            Err(vmette::Error::StdinFull(_)) if !gone.load(Ordering::SeqCst) => {}
            written => return written,
        }
    }
}

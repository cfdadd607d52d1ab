//! Interactive attach: an exec's stdin, output, terminal size and status
//! over one WebSocket, for browsers, `websockets` clients and TypeScript
//! programs.
//!
//! In the manner of Kubernetes' `v5.channel.k8s.io`, every message is
//! binary and its first byte names a channel ([`vmette_api::channel`]);
//! the subprotocol [`ATTACH_PROTOCOL`] is the version. Output comes from
//! the same buffer as the SSE route, a send at a time, so a client that
//! does not read pauses the exec rather than growing a queue here. Stdin
//! goes through a small queue to a writer task of its own; while the queue
//! is full the client's messages wait unread, but output, pings and the
//! exit still flow, so a command that does not read its input cannot stop
//! its output. One client attaches to an exec at a time; a second would
//! split its output.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use futures_util::SinkExt;
use tokio::sync::mpsc::{self, error::TrySendError};
use vmette::{PtySize, MAX_CHUNK_LEN};
use vmette_api::{channel, AttachStatus, ErrorBody, ExecEnd, ResizeRequest, ATTACH_PROTOCOL};

use crate::api::{sentence, tracked, ApiError, ApiPath, ApiResult, Daemon, Tracked};
use crate::events::Numbered;
use crate::listener::ConnectionSlot;
use crate::openapi::ExecPath;
use crate::stdin;

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

/// `GET /v1/sessions/{id}/execs/{exec}/attach`: the WebSocket upgrade.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/execs/{exec}/attach",
    tag = "execs",
    summary = "Attach to an exec over a WebSocket",
    description = "Upgrades to a WebSocket with the subprotocol `v1.attach.vmette.dev`. Every \
        message is binary, its first byte a channel: 0 stdin, 1 stdout (a PTY's one stream), \
        2 stderr, 3 status (JSON `AttachStatus`), 4 resize (JSON `ResizeRequest`), 255 close \
        (one byte more: 0, stdin). Client messages are at most 65537 bytes (larger: close \
        1009); a text message closes with 1003, an unknown channel with 1008. After the \
        `exit` or `failed` status the daemon closes with 1000. See docs/api.md.",
    params(
        ExecPath,
        ("Sec-WebSocket-Protocol" = String, Header, description = "Must offer \
            `v1.attach.vmette.dev`; over loopback TCP it may also offer \
            `bearer.vmette.dev.TOKEN` in place of the Authorization header."),
    ),
    responses(
        (status = 101, description = "Switching Protocols to the attach WebSocket.",
            headers(("Sec-WebSocket-Protocol" = String, description = "`v1.attach.vmette.dev`"))),
        (status = 400, description = "Not a WebSocket upgrade, the subprotocol is not offered, \
            or the exec id is not a number (`bad_request`).", body = ErrorBody),
        (status = 404, description = "No such session or exec (`not_found`).", body = ErrorBody),
        (status = 405, description = "Not a GET (`bad_request`).", body = ErrorBody),
        (status = 409, description = "Another client is attached to this exec (`busy`).",
            body = ErrorBody),
        (status = 426, description = "The connection cannot be upgraded (`bad_request`).",
            body = ErrorBody),
    ),
)]
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
    Data(Bytes),
    Close,
}

/// How one attach ends: the close frame the client is sent (`None`
/// answers a close the client began, or flushes one the WebSocket layer
/// queued for a protocol error).
type Ending = Option<CloseFrame>;

fn closing(code: u16, reason: &str) -> Ending {
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

async fn serve(mut socket: WebSocket, attached: Attached) {
    let tracked = &attached.0;
    let (stdin, mut refused, writer) = start_stdin_writer(Arc::clone(tracked));
    // Aborted when the attach ends, however it does: a write waiting for
    // the guest's room stops with it.
    let _writer = AbortOnDrop(writer);
    let mut after = 0;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut heard = Instant::now();
    // A stdin message the full queue has no room for yet; until it has,
    // the client's next messages stay unread.
    let mut waiting: Option<Input> = None;
    let ending = loop {
        tokio::select! {
            message = socket.recv(), if waiting.is_none() => {
                heard = Instant::now();
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => break failure(&error),
                    None => return,
                };
                match message {
                    Message::Binary(bytes) => match received(tracked, &bytes) {
                        Received::Input(input) => {
                            if let Err(TrySendError::Full(input)) = stdin.try_send(input) {
                                waiting = Some(input);
                            }
                        }
                        Received::Fine => {}
                        Received::Refused(message) => {
                            if send_status(&mut socket, error_status(message)).await.is_err() {
                                return;
                            }
                        }
                        Received::Violation(ending) => break ending,
                    },
                    Message::Text(_) => {
                        break closing(close_code::UNSUPPORTED, "only binary messages are understood")
                    }
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Close(_) => break None,
                }
            }
            room = stdin.reserve(), if waiting.is_some() => {
                if let (Ok(room), Some(input)) = (room, waiting.take()) {
                    room.send(input);
                }
                // Nothing was read meanwhile, so silence was not the client's.
                heard = Instant::now();
            }
            batch = tracked.events.wait_next(after) => {
                let Some(batch) = batch else {
                    break closing(close_code::AWAY, "the session is gone");
                };
                match forward(&mut socket, &mut after, batch, tracked.pty).await {
                    Ok(false) => {}
                    Ok(true) => break closing(close_code::NORMAL, "the command ended"),
                    Err(()) => return,
                }
            }
            Some(message) = refused.recv() => {
                if send_status(&mut socket, error_status(message)).await.is_err() {
                    return;
                }
            }
            _ = ping.tick() => {
                if waiting.is_none() && heard.elapsed() > SILENCE_LIMIT {
                    break closing(close_code::AWAY, "no pong for a minute");
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
        }
    };
    let began_by_us = ending.is_some();
    if began_by_us {
        let _ = socket.send(Message::Close(ending)).await;
    }
    // Sends what the WebSocket layer queued: the answer to a close the
    // client began, or the close for a protocol error.
    let _ = tokio::time::timeout(Duration::from_secs(1), SinkExt::close(&mut socket)).await;
    if began_by_us {
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

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a read failed, as what the client is told: an oversized message
/// gets 1009; for a protocol error, the close the WebSocket layer queued.
fn failure(error: &axum::Error) -> Ending {
    let text = error.to_string();
    if text.contains("Message too long") {
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
    /// Stdin for the writer.
    Input(Input),
    Fine,
    /// Refused, with a sentence for the status channel; the attach goes on.
    Refused(String),
    /// The client broke the protocol; the attach ends.
    Violation(Ending),
}

fn received(tracked: &Tracked, bytes: &[u8]) -> Received {
    let Some((&kind, payload)) = bytes.split_first() else {
        return Received::Violation(closing(
            close_code::POLICY,
            "a message must begin with its channel byte",
        ));
    };
    match kind {
        channel::STDIN if !tracked.takes_stdin => {
            Received::Refused("this exec reads no stdin; create it with \"stdin\": true".into())
        }
        channel::STDIN => Received::Input(Input::Data(Bytes::copy_from_slice(payload))),
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
        channel::CLOSE if payload != [channel::STDIN] => {
            Received::Refused("only stdin (channel 0) can be closed".into())
        }
        channel::CLOSE if !tracked.takes_stdin => {
            Received::Refused("this exec reads no stdin to close".into())
        }
        channel::CLOSE => Received::Input(Input::Close),
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
                let status = AttachStatus {
                    kind: event.kind.into(),
                    end: event.data().end,
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
        end: ExecEnd {
            message: Some(message),
            ..ExecEnd::default()
        },
    }
}

async fn send_status(socket: &mut WebSocket, status: AttachStatus) -> Result<(), ()> {
    let json = serde_json::to_vec(&status).map_err(|_| ())?;
    socket
        .send(framed(channel::STATUS, &json))
        .await
        .map_err(|_| ())
}

/// Starts the task that feeds the exec's stdin, in order. Its refusals
/// come back as sentences.
fn start_stdin_writer(
    tracked: Arc<Tracked>,
) -> (
    mpsc::Sender<Input>,
    mpsc::Receiver<String>,
    tokio::task::JoinHandle<()>,
) {
    let (inputs, mut queue) = mpsc::channel(STDIN_QUEUE);
    let (refusals, refused) = mpsc::channel(1);
    let writer = tokio::spawn(async move {
        while let Some(input) = queue.recv().await {
            // A stdin request over HTTP finishes first.
            let _writing = tracked.stdin.lock().await;
            let written = match input {
                Input::Data(data) => stdin::write(&tracked.exec, data, None).await,
                Input::Close => tracked.exec.close_stdin(),
            };
            if let Err(e) = written {
                let _ = refusals.try_send(sentence(&e));
            }
        }
    });
    (inputs, refused, writer)
}

//! The CLI's side of `vmetted`: a client of its HTTP API on the unix
//! socket (hyper over a tokio runtime), and starting the daemon on demand.
//!
//! Starting is race-free by construction: every CLI that finds no daemon
//! starts one, the daemon's lock lets exactly one of them serve, and every
//! CLI then waits for the socket to answer.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;
use vmette_api::{ErrorBody, EventData};

/// How long a started daemon gets to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A request body: whole, or streamed from a reader on another thread.
type Body = http_body_util::Either<
    Full<Bytes>,
    StreamBody<BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>>,
>;

/// A connection to the daemon's API.
pub struct Client {
    runtime: tokio::runtime::Runtime,
    socket: PathBuf,
}

impl Client {
    /// The running daemon's client, starting the daemon if `start` and it
    /// is not running.
    pub fn connect(start: bool) -> anyhow::Result<Client> {
        let dir = vmette_api::socket_dir().context("cannot find the daemon's socket directory")?;
        let client = Client {
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the HTTP client")?,
            socket: dir.join(vmette_api::SOCKET_NAME),
        };
        if client.answers() {
            return Ok(client);
        }
        if !start {
            bail!("vmetted is not running");
        }
        client.start_daemon(&dir)?;
        Ok(client)
    }

    fn answers(&self) -> bool {
        self.json::<vmette_api::Status>("GET", "/v1/status", None::<&()>)
            .is_ok()
    }

    fn start_daemon(&self, dir: &Path) -> anyhow::Result<()> {
        let vmetted = daemon_program();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("vmetted.log"))
            .context("cannot open the daemon's log")?;
        let mut command = Command::new(&vmetted);
        command
            .arg("--socket-dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe and touches no memory of the
        // parent. A session of its own keeps the daemon out of this
        // terminal's job control: Ctrl-C here does not stop it.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", vmetted.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.answers() {
                // A daemon that lost the race to another CLI's has exited;
                // reap it. The winner keeps running.
                let _ = child.try_wait();
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "vmetted did not answer within {START_TIMEOUT:?}; see {}",
                    dir.join("vmetted.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn send(&self, request: Request<Body>) -> anyhow::Result<Response<Incoming>> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("cannot reach vmetted at {}", self.socket.display()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("cannot talk to vmetted")?;
        tokio::spawn(connection);
        sender
            .send_request(request)
            .await
            .context("vmetted did not answer")
    }

    /// A request and its whole answer; the daemon's error message becomes
    /// the error.
    fn call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Body,
    ) -> anyhow::Result<Bytes> {
        let request = Client::request(method, path, content_type, body)?;
        self.runtime.block_on(async {
            let response = self.send(request).await?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .context("vmetted's answer broke off")?
                .to_bytes();
            if !status.is_success() {
                return Err(api_error(status, &bytes));
            }
            Ok(bytes)
        })
    }

    /// `GET path`, its body handed to `on_chunk` as it arrives.
    fn stream(
        &self,
        path: &str,
        accept: &str,
        mut on_chunk: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let request = Client::request("GET", path, accept, Body::Left(Full::default()))?;
        self.runtime.block_on(async {
            let response = self.send(request).await?;
            let status = response.status();
            if !status.is_success() {
                let bytes = response.into_body().collect().await?.to_bytes();
                return Err(api_error(status, &bytes));
            }
            let mut body = BodyStream::new(response.into_body());
            while let Some(frame) = body.next().await {
                let frame = frame.context("vmetted's answer broke off")?;
                if let Some(chunk) = frame.data_ref() {
                    on_chunk(chunk)?;
                }
            }
            Ok(())
        })
    }

    fn request(
        method: &str,
        path: &str,
        content_type: &str,
        body: Body,
    ) -> anyhow::Result<Request<Body>> {
        Ok(Request::builder()
            .method(method)
            .uri(format!("http://vmette{path}"))
            .header("content-type", content_type)
            .body(body)?)
    }

    /// A JSON call; the daemon's error message becomes the error.
    pub fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let bytes = match body {
            Some(body) => serde_json::to_vec(body)?,
            None => Vec::new(),
        };
        let body = Body::Left(Full::new(Bytes::from(bytes)));
        let answer = self.call(method, path, "application/json", body)?;
        decode(&answer)
    }

    /// `DELETE path`, expecting no content back.
    pub fn delete(&self, path: &str) -> anyhow::Result<()> {
        let body = Body::Left(Full::new(Bytes::new()));
        self.call("DELETE", path, "application/json", body)
            .map(drop)
    }

    /// `POST path` with `bytes` as the body, expecting no content back.
    pub fn post_bytes(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let body = Body::Left(Full::new(Bytes::from(bytes)));
        self.call("POST", path, "application/octet-stream", body)
            .map(drop)
    }

    /// Streams an exec's events to `on_event` until the stream ends.
    pub fn events(
        &self,
        path: &str,
        mut on_event: impl FnMut(&str, EventData) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // Bytes, not text, until a whole event is in: a character may be
        // split between chunks.
        let mut pending: Vec<u8> = Vec::new();
        self.stream(path, "text/event-stream", |chunk| {
            pending.extend_from_slice(chunk);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = pending.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&raw);
                let (mut kind, mut data) = ("", None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        kind = v;
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = serde_json::from_str::<EventData>(v).ok();
                    }
                }
                if let (false, Some(data)) = (kind.is_empty(), data) {
                    on_event(kind, data)?;
                }
            }
            Ok(())
        })
    }

    /// Sends what `source` yields as the body of `PUT path`.
    pub fn upload(
        &self,
        path: &str,
        content_type: &str,
        mut source: impl Read + Send + 'static,
    ) -> anyhow::Result<vmette_api::Moved> {
        let (frames, receiver) = tokio::sync::mpsc::channel(8);
        std::thread::Builder::new()
            .name("vmette-upload".into())
            .spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let item = match source.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => Ok(Frame::data(Bytes::copy_from_slice(&buf[..n]))),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => Err(e),
                    };
                    let failed = item.is_err();
                    if frames.blocking_send(item).is_err() || failed {
                        return;
                    }
                }
            })
            .context("cannot start the upload")?;
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        });
        let body = Body::Right(StreamBody::new(stream.boxed()));
        decode(&self.call("PUT", path, content_type, body)?)
    }

    /// Writes the body of `GET path` into `sink` as it arrives.
    pub fn download(&self, path: &str, sink: &mut dyn Write) -> anyhow::Result<u64> {
        let mut total = 0u64;
        self.stream(path, "application/octet-stream", |chunk| {
            sink.write_all(chunk).context("cannot store the download")?;
            total += chunk.len() as u64;
            Ok(())
        })?;
        Ok(total)
    }
}

/// A JSON answer (an empty one is `null`).
fn decode<T: DeserializeOwned>(answer: &Bytes) -> anyhow::Result<T> {
    let answer: &[u8] = if answer.is_empty() { b"null" } else { answer };
    serde_json::from_slice(answer).context("vmetted's answer is not what this vmette expects")
}

/// An error the daemon answered with: its code, for callers that handle
/// one kind, and its one sentence.
#[derive(Debug)]
pub struct ApiFailure {
    /// The error's code (`not_found`, `limit_reached`, …).
    pub code: String,
    message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiFailure {}

/// The daemon's error as one sentence (its own message, when it sent one).
fn api_error(status: hyper::StatusCode, body: &[u8]) -> anyhow::Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => ApiFailure {
            code: error.error.code,
            message: error.error.message,
        }
        .into(),
        Err(_) => anyhow::anyhow!("vmetted answered {status}"),
    }
}

/// `vmetted` next to this `vmette`, else from `PATH`.
fn daemon_program() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("vmetted")))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("vmetted"))
}

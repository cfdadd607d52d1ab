//! The daemon's socket: a 0700 directory, a lock file that one daemon
//! holds for as long as it serves, a 0600 socket, and a peer check on every
//! connection before a byte of it is read.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 256;

/// Most bytes of request head (line and headers) read.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// How long a client may take to send a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The directory the daemon serves from ([`vmette_api::socket_dir`]).
pub fn default_dir() -> anyhow::Result<PathBuf> {
    vmette_api::socket_dir().context("cannot find a directory for the socket")
}

/// A bound, locked socket directory.
pub struct Bound {
    pub listener: UnixListener,
    pub socket: SocketFile,
    /// Held until the daemon has stopped its sessions, so that no second
    /// daemon serves the directory meanwhile.
    pub lock: File,
}

/// The socket's path; dropping it removes the socket, so that clients see
/// the daemon gone at once.
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Creates `dir` (0700, ours), takes its lock, replaces a stale socket
/// and binds a new one with mode 0600.
pub fn bind(dir: &Path) -> anyhow::Result<Bound> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let meta =
        fs::symlink_metadata(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    use std::os::unix::fs::MetadataExt;
    if !meta.is_dir() || meta.uid() != uid {
        bail!(
            "{} is not a directory of this user; remove it or pass another --socket-dir",
            dir.display()
        );
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", dir.display()))?;
    }

    let lock_path = dir.join(vmette_api::LOCK_NAME);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own; it has no memory effects.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another vmetted already serves {}; stop it first (vmette daemon stop)",
            dir.display()
        );
    }

    // Holding the lock, any socket here is a dead daemon's.
    let socket = dir.join(vmette_api::SOCKET_NAME);
    match fs::remove_file(&socket) {
        Ok(()) => tracing::info!("replaced a stale socket"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", socket.display())),
    }
    // The socket is created 0600, never briefly wider.
    // SAFETY: umask only swaps the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(&socket);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("cannot bind {}", socket.display()))?;
    Ok(Bound {
        listener,
        socket: SocketFile(socket),
        lock,
    })
}

/// Most busy answers being given at once; beyond them a connection is
/// closed unanswered, so that a flood costs a bounded number of tasks.
const MAX_REFUSALS: usize = 64;

/// Lets connections in up to [`MAX_CONNECTIONS`], and answers the rest
/// 503: one count for every listener of the daemon.
#[derive(Clone)]
pub struct Admission {
    connections: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
}

impl Admission {
    pub fn new() -> Admission {
        Admission {
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
        }
    }

    /// Serves `stream` with `app` on its own task, or tells it the daemon
    /// is busy.
    pub fn admit(
        &self,
        stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        app: &axum::Router,
    ) {
        if let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() {
            tokio::spawn(serve_connection(stream, app.clone(), permit));
            return;
        }
        tracing::warn!("refused a connection: {MAX_CONNECTIONS} are open");
        if let Ok(permit) = Arc::clone(&self.refusals).try_acquire_owned() {
            tokio::spawn(async move {
                refuse_busy(stream).await;
                drop(permit);
            });
        }
    }
}

/// Answers one request on `stream` with 503, so that a client learns the
/// daemon is busy rather than gone, then closes it.
async fn refuse_busy(stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin) {
    let busy = hyper::service::service_fn(|_request| async {
        let body = format!(
            r#"{{"error":{{"code":"busy","message":"{MAX_CONNECTIONS} connections are open; try again shortly"}}}}"#
        );
        hyper::Response::builder()
            .status(503)
            .header("content-type", "application/json")
            .header("connection", "close")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
    });
    let _ = tokio::time::timeout(
        HEAD_TIMEOUT,
        hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(stream), busy),
    )
    .await;
}

/// Serves `app` on `listener` until the process ends: each connection is
/// checked for the daemon's own uid before hyper reads from it, and
/// limited in count, head size and head time.
pub async fn serve(listener: &UnixListener, app: axum::Router, admission: Admission) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == uid => {}
            Ok(cred) => {
                tracing::warn!(
                    peer_uid = cred.uid(),
                    "refused a connection from another user"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!("refused a connection whose peer is unknown: {e}");
                continue;
            }
        }
        admission.admit(stream, &app);
    }
}

/// A connection's place among the [`MAX_CONNECTIONS`], in every request's
/// extensions: a connection upgraded to a WebSocket outlives hyper's part
/// in it, and holds its place for as long as it is open.
#[derive(Clone)]
pub struct ConnectionSlot {
    _permit: Arc<OwnedSemaphorePermit>,
}

/// Serves one accepted connection with the daemon's bounds on its head
/// (size and time); its slot is given back once neither it nor a
/// WebSocket it became is open.
async fn serve_connection(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    app: axum::Router,
    permit: OwnedSemaphorePermit,
) {
    let slot = ConnectionSlot {
        _permit: Arc::new(permit),
    };
    let app = tower::ServiceExt::map_request(
        app,
        move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(slot.clone());
            request
        },
    );
    let service = hyper_util::service::TowerToHyperService::new(app);
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!("connection ended: {e}");
    }
}

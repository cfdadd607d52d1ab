//! File routes: a session's files as `application/octet-stream` bodies
//! streamed in and out (never held whole in memory), trees as tar streams,
//! and listing, stat, mkdir and delete as JSON. Every transfer is capped by
//! the library's transfer limit on both sides of the guest.

use std::io::{self, Read, Write};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use vmette::{DirEntry, FileErrorKind, FileKind, FileStat};
use vmette_api::{Entry, ErrorBody, Listing, Moved, Stat};
use vmette_manager::Managed;

use crate::api::{blocking, ApiError, ApiPath, ApiResult, Daemon};
use crate::openapi::{FileFailures, GuestPath, SessionPath};

/// Chunks in flight between a body and the guest, each as large as the
/// client or the guest made it.
const PIPE_CHUNKS: usize = 8;

/// How long a body may stand still (a client that stops sending an upload
/// or reading a download) before the transfer is abandoned.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// The guest path a file route works on, and its options.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    path: String,
    /// Octal permission bits for an upload (default 644).
    mode: Option<String>,
    /// For mkdir: make missing parents; for delete: remove a directory's
    /// contents too.
    #[serde(default)]
    parents: bool,
    #[serde(default)]
    recursive: bool,
}

type Query_ = Result<Query<PathQuery>, axum::extract::rejection::QueryRejection>;

fn query(query: Query_) -> ApiResult<PathQuery> {
    query.map(|Query(q)| q).map_err(|rejection| {
        ApiError::new(rejection.status(), "bad_request", rejection.body_text())
    })
}

/// The status for a failed file operation: the caller's mistake or the
/// guest's state, never the daemon's fault.
pub fn status_of(kind: FileErrorKind) -> StatusCode {
    match kind {
        FileErrorKind::NotFound => StatusCode::NOT_FOUND,
        FileErrorKind::IsADirectory
        | FileErrorKind::NotADirectory
        | FileErrorKind::AlreadyExists => StatusCode::CONFLICT,
        FileErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        FileErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        FileErrorKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// Reads a request body, chunk by chunk, on a blocking thread.
struct BodyReader {
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// Feeds `body` to `work`, which reads it on a blocking thread.
async fn with_body<T: Send + 'static>(
    body: Body,
    work: impl FnOnce(&mut BodyReader) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let (chunks, receiver) = mpsc::channel(PIPE_CHUNKS);
    let worker = blocking(move || {
        let mut reader = BodyReader {
            chunks: receiver,
            chunk: Bytes::new(),
        };
        work(&mut reader)
    });
    let feeder = async move {
        let mut stream = body.into_data_stream();
        loop {
            let item = match tokio::time::timeout(BODY_IDLE, stream.next()).await {
                Ok(Some(frame)) => frame.map_err(io::Error::other),
                Ok(None) => return,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the upload stood still for a minute",
                )),
            };
            let failed = item.is_err();
            // The worker stops reading once the guest refused the
            // transfer; the rest of the body is not wanted.
            if chunks.send(item).await.is_err() || failed {
                return;
            }
        }
    };
    let (result, ()) = tokio::join!(worker, feeder);
    result
}

/// Streams what `work` writes, on a blocking thread, as the response body.
/// A response body of what `work` writes, on a blocking thread. The
/// answer waits for its first bytes, so that a failure before any (a tree
/// the guest refused as over the transfer limit) gets its own status; a
/// failure after them can only break the body off.
async fn streamed(
    work: impl FnOnce(&mut BodyWriter) -> Result<(), vmette::Error> + Send + 'static,
) -> Result<Body, vmette::Error> {
    let (chunks, mut receiver) = mpsc::channel::<Result<Bytes, vmette::Error>>(PIPE_CHUNKS);
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut writer = BodyWriter { chunks, runtime };
        if let Err(error) = work(&mut writer) {
            let _ = writer.chunks.blocking_send(Err(error));
        }
    });
    let first = match receiver.recv().await {
        Some(Err(error)) => return Err(error),
        first => first,
    };
    let rest = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    Ok(Body::from_stream(
        futures_util::stream::iter(first)
            .chain(rest)
            .map(|item| item.map_err(|error| io::Error::other(error.to_string()))),
    ))
}

/// Hands what it is given to the response body; a client that stops
/// reading for [`BODY_IDLE`] ends the transfer.
struct BodyWriter {
    chunks: mpsc::Sender<Result<Bytes, vmette::Error>>,
    runtime: tokio::runtime::Handle,
}

impl Write for BodyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let chunk = Ok(Bytes::copy_from_slice(buf));
        self.runtime
            .block_on(self.chunks.send_timeout(chunk, BODY_IDLE))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn session(daemon: &Daemon, id: &str) -> ApiResult<Arc<Managed>> {
    Ok(daemon.manager.get(id)?)
}

#[utoipa::path(
    put,
    path = "/v1/sessions/{id}/files",
    tag = "files",
    summary = "Upload a file",
    description = "Writes the body to the path, creating its parents, streamed and capped by the \
        session's transfer limit (1 GiB). The body is read whatever its content type.",
    params(SessionPath, GuestPath, ("mode" = Option<String>, Query, description = "Octal permission bits, at most 7777 (default 644).", pattern = r"^\+?0*[0-7]{1,4}$")),
    request_body(content = [u8], content_type = "application/octet-stream", description = "The file's bytes."),
    responses(
        FileFailures,
        (status = 201, description = "Written.", body = Moved),
        (status = 409, description = "A directory is where the file should go, or a file where \
            a parent should (`conflict`).", body = ErrorBody),
        (status = 413, description = "Over the transfer limit (`too_large`).", body = ErrorBody),
    ),
)]
/// `PUT /v1/sessions/{id}/files?path=…&mode=…`: the body becomes the file.
pub async fn put_file(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    q: Query_,
    body: Body,
) -> ApiResult<(StatusCode, Json<Moved>)> {
    let q = query(q)?;
    let mode = match &q.mode {
        Some(mode) => u32::from_str_radix(mode, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid",
                    format!("mode {mode:?} is not octal permission bits such as 644"),
                )
            })?,
        None => 0o644,
    };
    let managed = session(&daemon, &id)?;
    let bytes = with_body(body, move |reader| {
        Ok(managed.session.write_file(&q.path, reader, mode)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(Moved { bytes })))
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/files",
    tag = "files",
    summary = "Download a file",
    description = "The file's bytes, streamed. A failure after the status was sent breaks the body off.",
    params(SessionPath, GuestPath),
    responses(
        FileFailures,
        (status = 200, description = "The file.", content(([u8] = "application/octet-stream"))),
        (status = 409, description = "The path is a directory (`is_a_directory`, `conflict`).", body = ErrorBody),
        (status = 413, description = "The file is over the transfer limit, refused before a byte \
            of it was sent (`too_large`).", body = ErrorBody),
    ),
)]
/// `GET /v1/sessions/{id}/files?path=…`: the file, streamed.
pub async fn get_file(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    q: Query_,
) -> ApiResult<Response> {
    let q = query(q)?;
    let managed = session(&daemon, &id)?;
    let path = q.path.clone();
    let body = streamed(move |writer| managed.session.read_file(&q.path, writer).map(drop))
        .await
        .map_err(|error| match error {
            // The guest refuses before a byte is sent; the answer points
            // at the tree route.
            vmette::Error::File {
                kind: FileErrorKind::IsADirectory,
                ..
            } => ApiError::new(
                StatusCode::CONFLICT,
                "is_a_directory",
                format!("{path} is a directory; get it as a tree"),
            ),
            error => error.into(),
        })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

#[utoipa::path(
    put,
    path = "/v1/sessions/{id}/tree",
    tag = "files",
    summary = "Upload a tree as tar",
    description = "Unpacks the tar body into the directory, streamed and capped by the session's \
        transfer limit. Members that would land outside it fail with 422. The body is read \
        whatever its content type.",
    params(SessionPath, GuestPath),
    request_body(content = [u8], content_type = "application/x-tar", description = "A tar stream."),
    responses(
        FileFailures,
        (status = 201, description = "Unpacked.", body = Moved),
        (status = 409, description = "A file is where a directory should go (`conflict`).", body = ErrorBody),
        (status = 413, description = "Over the transfer limit (`too_large`).", body = ErrorBody),
    ),
)]
/// `PUT /v1/sessions/{id}/tree?path=…`: a tar body unpacked into a directory.
pub async fn put_tree(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    q: Query_,
    body: Body,
) -> ApiResult<(StatusCode, Json<Moved>)> {
    let q = query(q)?;
    let managed = session(&daemon, &id)?;
    let bytes = with_body(body, move |reader| {
        Ok(managed.session.copy_in_tar(reader, &q.path)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(Moved { bytes })))
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/tree",
    tag = "files",
    summary = "Download a tree as tar",
    description = "A tar of the path's contents (symlinks stored, not followed), streamed. A \
        failure after the status was sent breaks the body off.",
    params(SessionPath, GuestPath),
    responses(
        FileFailures,
        (status = 200, description = "The tar stream.", content(([u8] = "application/x-tar"))),
        (status = 413, description = "The tree is over the transfer limit, refused before a byte \
            of it was sent (`too_large`).", body = ErrorBody),
    ),
)]
/// `GET /v1/sessions/{id}/tree?path=…`: a tar of a directory or file.
pub async fn get_tree(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    q: Query_,
) -> ApiResult<Response> {
    let q = query(q)?;
    let managed = session(&daemon, &id)?;
    let body =
        streamed(move |writer| managed.session.copy_out_tar(&q.path, writer).map(drop)).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-tar")], body).into_response())
}

fn stat_body(stat: &FileStat) -> Stat {
    Stat {
        kind: match stat.kind {
            FileKind::File => "file",
            FileKind::Directory => "directory",
            FileKind::Symlink => "symlink",
            FileKind::Other => "other",
        }
        .into(),
        size: stat.size,
        mode: format!("{:o}", stat.mode),
        modified_unix: stat.modified,
    }
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/files/stat",
    tag = "files",
    summary = "A path's metadata",
    description = "Without following a final symlink.",
    params(SessionPath, GuestPath),
    responses(
        FileFailures,
        (status = 200, description = "The metadata.", body = Stat),
    ),
)]
/// `GET /v1/sessions/{id}/files/stat?path=…`.
pub async fn stat(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    q: Query_,
) -> ApiResult<Json<Stat>> {
    let q = query(q)?;
    let managed = session(&daemon, &id)?;
    let stat = blocking(move || Ok(managed.session.stat(&q.path)?)).await?;
    Ok(Json(stat_body(&stat)))
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/files/list",
    tag = "files",
    summary = "List a directory",
    description = "Entries sorted by name, at most 1024.",
    params(SessionPath, GuestPath),
    responses(
        FileFailures,
        (status = 200, description = "The entries.", body = Listing),
        (status = 409, description = "The path is not a directory (`conflict`).", body = ErrorBody),
    ),
)]
/// `GET /v1/sessions/{id}/files/list?path=…`.
pub async fn list(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    q: Query_,
) -> ApiResult<Json<Listing>> {
    let q = query(q)?;
    let managed = session(&daemon, &id)?;
    let (entries, truncated): (Vec<DirEntry>, bool) =
        blocking(move || Ok(managed.session.list_dir(&q.path)?)).await?;
    Ok(Json(Listing {
        entries: entries
            .iter()
            .map(|e| Entry {
                name: e.name.clone(),
                stat: stat_body(&e.stat),
            })
            .collect(),
        truncated,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/files/mkdir",
    tag = "files",
    summary = "Make a directory",
    params(SessionPath, GuestPath, ("parents" = Option<bool>, Query, description = "Make missing parents too.")),
    responses(
        FileFailures,
        (status = 204, description = "Made."),
        (status = 409, description = "The path exists, or a parent is a file (`conflict`).", body = ErrorBody),
    ),
)]
/// `POST /v1/sessions/{id}/files/mkdir?path=…&parents=true`.
pub async fn mkdir(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    q: Query_,
) -> ApiResult<StatusCode> {
    let q = query(q)?;
    let managed = session(&daemon, &id)?;
    blocking(move || Ok(managed.session.make_dir(&q.path, q.parents)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}/files",
    tag = "files",
    summary = "Remove a path",
    description = "Removes a file, a symlink, or a directory (with `recursive`, its contents too). \
        The root cannot be removed.",
    params(SessionPath, ("path" = String, Query, description = "An absolute guest path without `..` or NUL, other than `/`, at most 4096 bytes, each name in it at most 255 bytes. The schema counts characters, so it allows what fits whatever the characters: names of at most 63 and paths of at most 1024, which also fit the 16 KiB request head once percent-encoded.", pattern = r"^(?!.*(?:^|/)\.\.(?:/|$))(?!.*[^/]{64})(?=/*[^/])/[^\u0000]*$", max_length = 1024), ("recursive" = Option<bool>, Query, description = "Remove a directory's contents too.")),
    responses(
        FileFailures,
        (status = 204, description = "Removed."),
        (status = 409, description = "A directory that is not empty, without `recursive` (`conflict`).", body = ErrorBody),
    ),
)]
/// `DELETE /v1/sessions/{id}/files?path=…&recursive=true`.
pub async fn delete(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    q: Query_,
) -> ApiResult<StatusCode> {
    let q = query(q)?;
    let managed = session(&daemon, &id)?;
    blocking(move || Ok(managed.session.remove(&q.path, q.recursive)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

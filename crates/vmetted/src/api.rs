//! The HTTP API under `/v1`: sessions, their execs and the execs' events.
//! Request and response bodies are JSON, errors are
//! `{"error": {"code", "message"}}` with a fitting status. Everything that
//! boots or waits runs on blocking threads, never on the async workers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;
use vmette::{Config, Exec, ExecSpec, PtySize};
use vmette_api::{
    Ended, ErrorBody, ErrorDetail, ExecInfo, ExecRequest, ResizeRequest, SessionInfo,
    SessionRequest, SignalRequest, Status,
};
use vmette_manager::{Managed, Manager, ManagerError};

use crate::attach;
use crate::events::Events;
use crate::files;
use crate::openapi::{ExecFailures, ExecPath, JsonBodyFailures, SessionPath};
use crate::ports;
use crate::stdin;

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 64 * 1024;

/// Largest stdin body of one request.
pub const MAX_STDIN_BODY: usize = 1 << 20;

/// Most execs a session keeps track of (finished ones whose events were
/// all delivered are forgotten first).
const MAX_EXECS_PER_SESSION: usize = 256;

/// Largest scratch disk a session may ask for, MiB: it is a sparse file
/// on the host that the guest can fill.
const MAX_SCRATCH_MIB: u64 = 64 * 1024;

/// How long one stdin request may wait for the command to read.
const STDIN_PATIENCE: Duration = Duration::from_secs(30);

/// What the handlers share.
pub struct Daemon {
    pub(crate) manager: Manager,
    execs: Mutex<HashMap<(String, u32), Arc<Tracked>>>,
}

pub(crate) struct Tracked {
    pub(crate) exec: Arc<Exec>,
    pub(crate) events: Arc<Events>,
    /// One stdin writer at a time: a second would interleave its chunks
    /// with the first. A request that finds it taken gets 409; an
    /// attached client's writes wait their turn.
    pub(crate) stdin: tokio::sync::Mutex<()>,
    /// Whether its output is one PTY stream.
    pub(crate) pty: bool,
    /// Whether it reads what is written to it (a stdin pipe, or a PTY).
    pub(crate) takes_stdin: bool,
    /// A WebSocket is attached: a second would split the output with it.
    pub(crate) attached: std::sync::atomic::AtomicBool,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Daemon {
    pub fn new(manager: Manager) -> Arc<Daemon> {
        Arc::new(Daemon {
            manager,
            execs: Mutex::new(HashMap::new()),
        })
    }

    /// Forgets the execs of sessions that are gone.
    pub fn forget_sessions(&self, gone: &[String]) {
        self.forget_where(|session| gone.iter().any(|g| g == session));
    }

    /// Forgets the execs of every session the manager no longer has
    /// (however it went: deleted, timed out, or a delete whose client
    /// hung up), stopping their pumps.
    pub fn forget_dead(&self) {
        let live: Vec<String> = self
            .manager
            .list()
            .iter()
            .map(|m| m.id.to_string())
            .collect();
        self.forget_where(|session| !live.iter().any(|l| l == session));
    }

    fn forget_where(&self, gone: impl Fn(&str) -> bool) {
        let mut forgotten = Vec::new();
        lock(&self.execs).retain(|(session, _), tracked| {
            let keep = !gone(session);
            if !keep {
                forgotten.push(Arc::clone(tracked));
            }
            keep
        });
        for tracked in forgotten {
            tracked.events.close();
        }
    }
}

/// An API error: a status and one sentence.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<ManagerError> for ApiError {
    fn from(error: ManagerError) -> ApiError {
        let message = error.to_string();
        match error {
            ManagerError::LimitReached(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "limit_reached", message)
            }
            ManagerError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
            ManagerError::NameTaken(_) => {
                ApiError::new(StatusCode::CONFLICT, "name_taken", message)
            }
            ManagerError::InvalidName { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
            }
            ManagerError::Session(error) => error.into(),
        }
    }
}

impl From<vmette::Error> for ApiError {
    fn from(error: vmette::Error) -> ApiError {
        let message = sentence(&error);
        match error {
            vmette::Error::InvalidConfig { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
            }
            vmette::Error::SessionEnded(_) => {
                ApiError::new(StatusCode::GONE, "session_ended", message)
            }
            vmette::Error::ExecEnded => ApiError::new(StatusCode::CONFLICT, "exec_ended", message),
            vmette::Error::StdinFull(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stdin_full", message)
            }
            vmette::Error::File { kind, .. } => {
                let code = match kind {
                    vmette::FileErrorKind::NotFound => "not_found",
                    vmette::FileErrorKind::TooLarge => "too_large",
                    vmette::FileErrorKind::IsADirectory
                    | vmette::FileErrorKind::NotADirectory
                    | vmette::FileErrorKind::AlreadyExists => "conflict",
                    _ => "file_failed",
                };
                ApiError::new(files::status_of(kind), code, message)
            }
            vmette::Error::Unpack(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
            }
            vmette::Error::Image(error) => image_error(&*error, message),
            vmette::Error::Network(_) => {
                ApiError::new(StatusCode::CONFLICT, "port_unavailable", message)
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "vmette_failed", message),
        }
    }
}

/// An image that could not be resolved: the caller's mistake (422, 404),
/// or the registry's (502).
fn image_error(error: &(dyn std::error::Error + 'static), message: String) -> ApiError {
    use vmette::images::ImageError;
    match error.downcast_ref::<ImageError>() {
        Some(ImageError::NotFound { .. } | ImageError::NotStored { .. }) => {
            ApiError::new(StatusCode::NOT_FOUND, "image_not_found", message)
        }
        Some(ImageError::Auth { .. } | ImageError::Unreachable { .. }) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "registry_failed", message)
        }
        Some(
            ImageError::BadReference { .. } | ImageError::Refused { .. } | ImageError::File { .. },
        ) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "image_refused", message),
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "vmette_failed", message),
    }
}

/// The error and its causes as one sentence.
pub(crate) fn sentence(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose rejections are API errors like every other: the
/// status axum chose (400, 413, 415, 422) and one sentence.
pub(crate) struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<serde_json::Value>::from_request(request, state)
            .await
            .map_err(|rejection| {
                ApiError::new(rejection.status(), "bad_request", rejection.body_text())
            })?;
        object(value).map(ApiJson)
    }
}

/// `value` as a request, which is always a JSON object: serde would also
/// take a struct from an array of its fields in order.
fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> ApiResult<T> {
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("the request is not valid: {e}"),
        )
    })
}

/// Path parameters whose rejections (an exec id that is no number) are API
/// errors too.
pub(crate) struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S>
    for ApiPath<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError::new(
                rejection.status(),
                "bad_request",
                rejection.body_text(),
            )),
        }
    }
}

/// A raw body (stdin), its rejections API errors too.
struct ApiBytes(Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(ApiBytes)
            .map_err(|rejection| {
                ApiError::new(rejection.status(), "bad_request", rejection.body_text())
            })
    }
}

/// Runs `work` on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|_| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "vmette_failed",
            "a request handler failed",
        ))
    })
}

/// The routes with their description: one table, so that what is served
/// and what `docs/openapi.json` says cannot disagree.
pub(crate) fn routes() -> OpenApiRouter<Arc<Daemon>> {
    OpenApiRouter::with_openapi(crate::openapi::base())
        .routes(routes!(status))
        .routes(routes!(create_session, list_sessions))
        .routes(routes!(get_session, delete_session))
        .routes(routes!(create_exec))
        .routes(routes!(exec_events))
        .routes(routes!(attach::attach))
        .routes(routes!(exec_stdin).layer(DefaultBodyLimit::max(MAX_STDIN_BODY)))
        .routes(routes!(exec_stdin_close))
        .routes(routes!(exec_signal))
        .routes(routes!(exec_resize))
        // Transfers are capped by the session's transfer limit, not by the
        // JSON body limit.
        .routes(
            routes!(files::put_file, files::get_file, files::delete)
                .layer(DefaultBodyLimit::disable()),
        )
        .routes(routes!(ports::list_ports, ports::publish_port))
        .routes(routes!(ports::unpublish_port))
        .routes(routes!(files::stat))
        .routes(routes!(files::list))
        .routes(routes!(files::mkdir))
        .routes(routes!(files::put_tree, files::get_tree).layer(DefaultBodyLimit::disable()))
}

/// The router, on `daemon`.
pub fn router(daemon: Arc<Daemon>) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see docs/api.md",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see docs/api.md",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(daemon)
}

#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "daemon",
    summary = "The daemon's version, pid, load and limits",
    responses((status = 200, description = "The daemon's status.", body = Status)),
)]
async fn status(State(daemon): State<Arc<Daemon>>) -> Json<Status> {
    let status = daemon.manager.status();
    Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        sessions: status.sessions,
        memory_mib: status.memory_mib,
        max_sessions: status.limits.max_sessions,
        max_memory_mib: status.limits.max_memory_mib,
        idle_timeout_s: status.limits.idle_timeout.map(|t| t.as_secs()),
    })
}

fn session_body(managed: &Managed) -> SessionInfo {
    let end = managed.session.end_reason();
    let published = managed.session.published();
    SessionInfo {
        id: managed.id.to_string(),
        name: managed.name.clone(),
        memory_mib: managed.memory_mib,
        vcpus: managed.vcpus,
        created_unix: managed
            .created
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        state: if end.is_some() { "ended" } else { "running" }.into(),
        end_reason: end.map(|r| r.to_string()),
        network: managed.networked,
        published: published.iter().map(ports::info).collect(),
        denied: managed.session.denials().as_ref().map(ports::denied),
    }
}

#[utoipa::path(
    post,
    path = "/v1/sessions",
    tag = "sessions",
    summary = "Boot a session",
    description = "Boots a session and answers once its guest is ready, which takes seconds. \
        The body is read as JSON whatever its content type; `{}` means every default.",
    request_body(
        content = SessionRequest,
        content_type = "application/json",
        description = "The session's settings; every field is optional.",
    ),
    responses(
        (status = 201, description = "The session, running.", body = SessionInfo),
        (status = 400, description = "There is no body, or it could not be read \
            (`bad_request`).", body = ErrorBody),
        (status = 404, description = "The image is not in the registry, or not in the store \
            of an offline daemon (`image_not_found`).", body = ErrorBody),
        (status = 409, description = "Another session has that name (`name_taken`).", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB.", body = ErrorBody),
        (status = 422, description = "The body is not a valid session request, or a value is \
            out of range (`invalid`), or the image is not a valid reference or breaks a \
            rule (`image_refused`).", body = ErrorBody),
        (status = 429, description = "The session would exceed the daemon's session count or \
            memory budget (`limit_reached`); nothing was started.", body = ErrorBody),
        (status = 500, description = "The VM did not boot (`vmette_failed`).", body = ErrorBody),
        (status = 502, description = "The image's registry refused the credentials or could \
            not be reached (`registry_failed`).", body = ErrorBody),
    ),
)]
async fn create_session(
    State(daemon): State<Arc<Daemon>>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<(StatusCode, Json<SessionInfo>)> {
    // Always a body, `{}` for every default: what the description says is
    // what is taken, with no second way to ask for a session.
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body must be a session request in JSON; send {} for every default",
        ));
    }
    let value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("the session request is not valid: {e}"),
        )
    })?;
    let request: SessionRequest = object(value)?;
    let mut config = Config::default_machine();
    if let Some(memory) = request.memory_mib {
        config.memory_mib = memory;
    }
    if let Some(vcpus) = request.vcpus {
        config.vcpus = vcpus;
    }
    if request.scratch_mib.is_some_and(|mib| mib > MAX_SCRATCH_MIB) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("a scratch disk may have at most {MAX_SCRATCH_MIB} MiB"),
        ));
    }
    config.scratch_mib = request.scratch_mib;
    // The daemon's working directory is not the client's: paths must say
    // where they are.
    let absolute = |field: &'static str, path: &str| -> ApiResult<std::path::PathBuf> {
        let path = std::path::PathBuf::from(path);
        if path.is_absolute() {
            Ok(path)
        } else {
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("the {field} path {} must be absolute", path.display()),
            ))
        }
    };
    for share in &request.shares {
        config.shares.push(vmette::Share {
            host_path: absolute("share", &share.host_path)?,
            guest_path: share.guest_path.clone(),
            writable: share.writable,
        });
    }
    for disk in &request.disks {
        config.disks.push(vmette::Disk {
            path: absolute("disk", &disk.path)?,
            read_only: disk.read_only,
        });
    }
    if let Some(image) = &request.image {
        if request.rootfs.is_some() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "give an image or a rootfs, not both",
            ));
        }
        if image.is_empty() || image.len() > 4096 {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "an image is 1 to 4096 bytes",
            ));
        }
        if image.starts_with('.') || image.starts_with('~') {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "an image path must be absolute",
            ));
        }
        config.rootfs = vmette::Rootfs::Named(image.clone());
    }
    if let Some(rootfs) = &request.rootfs {
        let path = absolute("rootfs", &rootfs.path)?;
        config.rootfs = if path.is_dir() {
            vmette::Rootfs::Directory {
                path,
                writable: rootfs.writable,
            }
        } else {
            vmette::Rootfs::Image(path)
        };
    }
    config.timeout = request.timeout_s.map(Duration::from_secs);
    config.idle_timeout = request.idle_timeout_s.map(Duration::from_secs);
    if let Some(network) = &request.network {
        config.network = ports::network(network)?;
    }
    let managed = blocking(move || {
        daemon
            .manager
            .create(&config, request.name.as_deref())
            .map_err(ApiError::from)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(session_body(&managed))))
}

#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    summary = "List sessions",
    responses((status = 200, description = "Every live session.", body = Vec<SessionInfo>)),
)]
async fn list_sessions(State(daemon): State<Arc<Daemon>>) -> Json<Vec<SessionInfo>> {
    Json(
        daemon
            .manager
            .list()
            .iter()
            .map(|m| session_body(m))
            .collect(),
    )
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    summary = "Describe a session",
    params(SessionPath),
    responses(
        (status = 200, description = "The session.", body = SessionInfo),
        (status = 400, description = "The id is not valid UTF-8.", body = ErrorBody),
        (status = 404, description = "No such session (`not_found`).", body = ErrorBody),
    ),
)]
async fn get_session(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<SessionInfo>> {
    let managed = daemon.manager.get(&id)?;
    Ok(Json(session_body(&managed)))
}

#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    summary = "Stop a session",
    description = "Powers the guest off cleanly, then answers with why the session ended.",
    params(SessionPath),
    responses(
        (status = 200, description = "The session is gone.", body = Ended),
        (status = 400, description = "The id is not valid UTF-8.", body = ErrorBody),
        (status = 404, description = "No such session (`not_found`).", body = ErrorBody),
        (status = 500, description = "The session could not be stopped (`vmette_failed`).", body = ErrorBody),
    ),
)]
async fn delete_session(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Ended>> {
    let managed = daemon.manager.get(&id)?;
    let key = managed.id.to_string();
    drop(managed);
    let reason = blocking({
        let daemon = Arc::clone(&daemon);
        let key = key.clone();
        // Forgotten here, on the blocking thread, even if the client
        // hangs up before the answer.
        move || {
            let removed = daemon.manager.remove(&key).map_err(ApiError::from);
            daemon.forget_sessions(std::slice::from_ref(&key));
            removed
        }
    })
    .await?;
    Ok(Json(Ended {
        id: key,
        end_reason: reason.to_string(),
    }))
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/execs",
    tag = "execs",
    summary = "Start a command",
    description = "Starts a command in the session; its output is read from the events route.",
    params(SessionPath),
    request_body(content = ExecRequest, description = "The command."),
    responses(
        (status = 201, description = "The exec, started.", body = ExecInfo),
        JsonBodyFailures,
        (status = 404, description = "No such session (`not_found`).", body = ErrorBody),
        (status = 410, description = "The session ended (`session_ended`).", body = ErrorBody),
        (status = 422, description = "The body is JSON but not a valid exec request, or a value is \
            out of range (`invalid`).", body = ErrorBody),
        (status = 429, description = "The session has 256 execs running or with output nobody \
            read (`limit_reached`).", body = ErrorBody),
        (status = 500, description = "The exec could not be started (`vmette_failed`).", body = ErrorBody),
    ),
)]
async fn create_exec(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<ExecRequest>,
) -> ApiResult<(StatusCode, Json<ExecInfo>)> {
    let managed = daemon.manager.get(&id)?;
    // Checked even without a terminal, so that a size is never silently
    // wrong.
    let side = 1..=vmette::MAX_PTY_SIDE;
    if [request.rows, request.cols]
        .iter()
        .flatten()
        .any(|n| !side.contains(n))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("rows and cols must be 1 to {}", vmette::MAX_PTY_SIDE),
        ));
    }
    let mut spec = ExecSpec::new(request.argv);
    spec.env = request.env.into_iter().collect();
    spec.workdir = request.workdir;
    spec.user = request.user;
    spec.stdin = request.stdin;
    spec.pty = request.tty.then(|| PtySize {
        rows: request.rows.unwrap_or(24),
        cols: request.cols.unwrap_or(80),
    });
    spec.timeout = request.timeout_ms.map(Duration::from_millis);
    let session = managed.id.to_string();
    // Room first: an exec the daemon cannot track must not start.
    {
        let mut execs = lock(&daemon.execs);
        let mine = |execs: &HashMap<(String, u32), Arc<Tracked>>| {
            execs.keys().filter(|(s, _)| *s == session).count()
        };
        if mine(&execs) >= MAX_EXECS_PER_SESSION {
            execs.retain(|(s, _), tracked| *s != session || !tracked.events.drained());
        }
        if mine(&execs) >= MAX_EXECS_PER_SESSION {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "limit_reached",
                format!(
                    "{MAX_EXECS_PER_SESSION} execs of this session are running or have output nobody read; read or wait for some first"
                ),
            ));
        }
    }
    let exec = Arc::new(managed.session.exec(&spec)?);
    let exec_id = exec.id();
    let events = Events::pump(Arc::clone(&exec), request.tty).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "vmette_failed",
            format!("cannot follow the exec: {e}"),
        )
    })?;
    lock(&daemon.execs).insert(
        (session.clone(), exec_id),
        Arc::new(Tracked {
            exec,
            events,
            stdin: tokio::sync::Mutex::new(()),
            pty: request.tty,
            takes_stdin: request.stdin || request.tty,
            attached: std::sync::atomic::AtomicBool::new(false),
        }),
    );
    // A delete that raced this exec has already forgotten its session.
    if daemon.manager.get(&session).is_err() {
        daemon.forget_sessions(std::slice::from_ref(&session));
    }
    Ok((
        StatusCode::CREATED,
        Json(ExecInfo {
            id: exec_id,
            session,
        }),
    ))
}

pub(crate) fn tracked(daemon: &Daemon, id: &str, exec: u32) -> ApiResult<Arc<Tracked>> {
    let managed = daemon.manager.get(id)?;
    lock(&daemon.execs)
        .get(&(managed.id.to_string(), exec))
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("session {id} has no exec {exec}"),
            )
        })
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/execs/{exec}/events",
    tag = "execs",
    summary = "Follow an exec's output as Server-Sent Events",
    description = crate::openapi::EVENTS,
    params(
        ExecPath,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event: \
            everything after it is sent. Anything that is not a number counts as 0."),
    ),
    responses(
        (status = 200, description = "The events, until the exec's last one; a comment every \
            15 s keeps the stream alive.", content((String = "text/event-stream"))),
        (status = 400, description = "The exec id is not a number (`bad_request`).", body = ErrorBody),
        (status = 404, description = "No such session or exec (`not_found`).", body = ErrorBody),
    ),
)]
async fn exec_events(
    State(daemon): State<Arc<Daemon>>,
    ApiPath((id, exec)): ApiPath<(String, u32)>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let tracked = tracked(&daemon, &id, exec)?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let stream = stream::unfold(
        (Arc::clone(&tracked.events), after, Vec::new()),
        |(events, after, mut pending)| async move {
            if pending.is_empty() {
                pending = events.wait_next(after).await?;
                pending.reverse();
            }
            let event = pending.pop()?;
            let after = after.max(event.seq());
            Some((Ok(sse_event(&event)), (events, after, pending)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn sse_event(event: &crate::events::Numbered) -> Event {
    let data = serde_json::to_string(&event.data()).unwrap_or_else(|_| "{}".into());
    Event::default()
        .id(event.seq().to_string())
        .event(event.kind)
        .data(data)
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/execs/{exec}/stdin",
    tag = "execs",
    summary = "Write to an exec's stdin",
    description = "Writes the body to the command's stdin, waiting up to 30 s while the guest \
        is full. The body is read whatever its content type.",
    params(ExecPath),
    request_body(
        content = [u8],
        content_type = "application/octet-stream",
        description = "Raw bytes, at most 1 MiB.",
    ),
    responses(
        (status = 204, description = "Written."),
        (status = 400, description = "The exec id is not a number, or the body could not be \
            read (`bad_request`).", body = ErrorBody),
        ExecFailures,
        (status = 409, description = "Another stdin write to this exec is in progress (`busy`), \
            or the command has ended (`exec_ended`).", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB (`bad_request`).", body = ErrorBody),
        (status = 500, description = "The write failed (`vmette_failed`).", body = ErrorBody),
        (status = 503, description = "The command left its stdin unread for 30 s; what fitted \
            was written (`stdin_full`). Or 256 connections are open (`busy`).", body = ErrorBody),
    ),
)]
async fn exec_stdin(
    State(daemon): State<Arc<Daemon>>,
    ApiPath((id, exec)): ApiPath<(String, u32)>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<StatusCode> {
    let tracked = tracked(&daemon, &id, exec)?;
    let Ok(_writing) = tracked.stdin.try_lock() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            "another stdin write to this exec is in progress; wait for it",
        ));
    };
    // Dropped with the request if the client hangs up, bytes and all.
    stdin::write(&tracked.exec, body, Some(STDIN_PATIENCE)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/execs/{exec}/stdin/close",
    tag = "execs",
    summary = "End an exec's stdin",
    description = "Ends the command's stdin (Ctrl-D on a PTY). No body.",
    params(ExecPath),
    responses(
        (status = 204, description = "Closed."),
        (status = 400, description = "The exec id is not a number (`bad_request`).", body = ErrorBody),
        ExecFailures,
        (status = 500, description = "Closing failed (`vmette_failed`).", body = ErrorBody),
    ),
)]
async fn exec_stdin_close(
    State(daemon): State<Arc<Daemon>>,
    ApiPath((id, exec)): ApiPath<(String, u32)>,
) -> ApiResult<StatusCode> {
    tracked(&daemon, &id, exec)?.exec.close_stdin()?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/execs/{exec}/signal",
    tag = "execs",
    summary = "Signal an exec",
    description = "Sends the signal to the command's process group.",
    params(ExecPath),
    request_body(content = SignalRequest, description = "The signal."),
    responses(
        (status = 204, description = "Sent."),
        JsonBodyFailures,
        ExecFailures,
        (status = 422, description = "The body is JSON but not a valid signal request, or the \
            signal is not 1 to 31 (`invalid`).", body = ErrorBody),
        (status = 500, description = "Sending failed (`vmette_failed`).", body = ErrorBody),
    ),
)]
async fn exec_signal(
    State(daemon): State<Arc<Daemon>>,
    ApiPath((id, exec)): ApiPath<(String, u32)>,
    ApiJson(request): ApiJson<SignalRequest>,
) -> ApiResult<StatusCode> {
    tracked(&daemon, &id, exec)?.exec.signal(request.signal)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/execs/{exec}/resize",
    tag = "execs",
    summary = "Resize a PTY exec's terminal",
    description = "Resizes the terminal of an exec started with `tty`; the command gets SIGWINCH.",
    params(ExecPath),
    request_body(content = ResizeRequest, description = "The new size."),
    responses(
        (status = 204, description = "Resized."),
        JsonBodyFailures,
        ExecFailures,
        (status = 409, description = "The exec was not started with `tty` (`no_terminal`).", body = ErrorBody),
        (status = 422, description = "The body is JSON but not a valid size, or a side is not 1 \
            to 4096 (`invalid`).", body = ErrorBody),
        (status = 500, description = "Resizing failed (`vmette_failed`).", body = ErrorBody),
    ),
)]
async fn exec_resize(
    State(daemon): State<Arc<Daemon>>,
    ApiPath((id, exec)): ApiPath<(String, u32)>,
    ApiJson(request): ApiJson<ResizeRequest>,
) -> ApiResult<StatusCode> {
    let tracked = tracked(&daemon, &id, exec)?;
    if !tracked.pty {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_terminal",
            "this exec was not started with tty, so it has no terminal to resize",
        ));
    }
    tracked.exec.resize(PtySize {
        rows: request.rows,
        cols: request.cols,
    })?;
    Ok(StatusCode::NO_CONTENT)
}

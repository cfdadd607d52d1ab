//! Loopback TCP, for clients that cannot reach a unix socket: the same
//! router, on 127.0.0.1 or ::1 only, where every request must carry the
//! bearer token kept in a 0600 file beside the socket (made if absent,
//! never logged), and a browser's request must come from this origin.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

use crate::api::ApiError;
use crate::listener::Admission;

/// The token file's name in the socket directory.
pub const TOKEN_NAME: &str = "token";

/// Refuses every address but the loopback ones, before anything binds.
pub fn loopback_only(address: SocketAddr) -> anyhow::Result<SocketAddr> {
    match address.ip() {
        IpAddr::V4(Ipv4Addr::LOCALHOST) | IpAddr::V6(Ipv6Addr::LOCALHOST) => Ok(address),
        other => bail!(
            "--listen {other} is not a loopback address; vmetted serves TCP only on 127.0.0.1 or ::1"
        ),
    }
}

/// The token in `dir/token`, made (32 random bytes, hex) if absent. A
/// file another user owns, or others can read, is refused.
pub fn token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(TOKEN_NAME);
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut file) => {
            let mut bytes = [0u8; 32];
            fs::File::open("/dev/urandom")
                .and_then(|mut random| random.read_exact(&mut bytes))
                .context("cannot read randomness for the token")?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            file.write_all(token.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(&path)
                .with_context(|| format!("cannot inspect {}", path.display()))?;
            // SAFETY: geteuid has no preconditions and cannot fail.
            let uid = unsafe { libc::geteuid() };
            if !meta.is_file() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
                bail!(
                    "{} must be a file of this user that only they can read; remove it and start again",
                    path.display()
                );
            }
            let token = fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let token = token.trim().to_string();
            if token.len() < 32 {
                bail!(
                    "{} holds no usable token; remove it and start again",
                    path.display()
                );
            }
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// What the TCP router checks on every request.
#[derive(Clone)]
pub struct Gate {
    token: Arc<str>,
    origins: Arc<[String]>,
}

impl Gate {
    pub fn new(token: String, address: SocketAddr) -> Gate {
        let port = address.port();
        Gate {
            token: token.into(),
            origins: vec![
                format!("http://127.0.0.1:{port}"),
                format!("http://localhost:{port}"),
                format!("http://[::1]:{port}"),
            ]
            .into(),
        }
    }
}

/// Compares without stopping at the first difference, so that the time
/// taken says nothing about how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer` header (the scheme's case does
/// not matter).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The token a WebSocket upgrade offers as a subprotocol: a browser's
/// WebSocket cannot send an Authorization header. Only on an upgrade, so
/// that it is not a second way in for every route.
fn websocket_token(headers: &HeaderMap) -> Option<&str> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return None;
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(vmette_api::TOKEN_PROTOCOL_PREFIX))
}

/// The middleware: a bearer token, and no foreign `Origin`.
pub async fn require_token(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let presented = bearer(headers).or_else(|| websocket_token(headers));
    if !presented.is_some_and(|token| same(token.as_bytes(), gate.token.as_bytes())) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this listener needs the bearer token from the daemon's token file",
        )
        .into_response();
    }
    // Every Origin header, in case a client sends more than one.
    let mut origins = headers.get_all(header::ORIGIN).iter();
    if !origins.all(|origin| {
        origin
            .to_str()
            .is_ok_and(|o| gate.origins.iter().any(|a| a == o))
    }) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "requests from web pages of other origins are refused",
        )
        .into_response();
    }
    next.run(request).await
}

/// Serves `app` on `listener`, with the same bounds as the unix socket.
pub async fn serve(listener: TcpListener, app: axum::Router, admission: Admission) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Event streams are many small writes; Nagle's algorithm
                // with the client's delayed acks would hold each for 40 ms.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!("cannot set TCP_NODELAY: {e}");
                }
                admission.admit(stream, &app);
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_served() {
        for good in ["127.0.0.1:0", "[::1]:8080"] {
            assert!(loopback_only(good.parse().expect("addr")).is_ok(), "{good}");
        }
        for bad in [
            "0.0.0.0:0",
            "[::]:0",
            "192.168.1.5:80",
            "127.0.0.2:0",
            "10.0.0.1:1",
        ] {
            assert!(loopback_only(bad.parse().expect("addr")).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_token_comes_from_a_bearer_header_or_a_websocket_subprotocol() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, value.parse().expect("a header value"));
            }
            map
        };
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let value = format!("{scheme} abc");
            assert_eq!(bearer(&headers(&[("authorization", &value)])), Some("abc"));
        }
        assert_eq!(bearer(&headers(&[("authorization", "Basic abc")])), None);
        let offered = (
            "sec-websocket-protocol",
            "v1.attach.vmette.dev, bearer.vmette.dev.abc",
        );
        assert_eq!(
            websocket_token(&headers(&[("upgrade", "websocket"), offered])),
            Some("abc")
        );
        assert_eq!(
            websocket_token(&headers(&[offered])),
            None,
            "only an upgrade may carry the token so"
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }

    #[test]
    fn a_token_is_made_once_and_kept_private() {
        let dir = tempfile::tempdir().expect("tmp");
        let first = token(dir.path()).expect("made");
        assert_eq!(first.len(), 64);
        assert_eq!(token(dir.path()).expect("read"), first);
        let mode = fs::metadata(dir.path().join(TOKEN_NAME))
            .expect("stat")
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(
            dir.path().join(TOKEN_NAME),
            fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert!(
            token(dir.path()).is_err(),
            "a token others can read is refused"
        );
    }
}

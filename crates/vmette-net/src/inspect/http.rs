//! A gate over the bytes a guest sends on a plain-HTTP connection. The
//! connection's first request names the host the stack connects to; on a
//! keep-alive connection every later request passes the same gate before
//! any of its bytes go upstream, so each must name that host too. The
//! gate reads each request's framing (Content-Length, or chunked) to know
//! where the next request starts, and refuses whatever the upstream might
//! frame differently (both lengths, a bare LF, a malformed chunk) or that
//! would end its reading (CONNECT, an upgrade).

use httparse::{Header, Request, Status, EMPTY_HEADER};

use super::host_name;

/// Most bytes of a request head, and of a chunked body's trailer section.
pub const HEAD_LIMIT: usize = 16 * 1024;

/// Most header fields of a request head or trailer section.
const HEADERS_LIMIT: usize = 64;

/// Most bytes of a chunk-size line, its extensions and CRLF included.
const SIZE_LINE_LIMIT: usize = 1024;

/// Most hex digits of a chunk size: any 16 fit a `u64`.
const SIZE_DIGITS: usize = 16;

/// Most digits of a Content-Length: any 19 fit a `u64`.
const LENGTH_DIGITS: usize = 19;

/// The largest Content-Length or chunk size passed: one that a server
/// holding lengths in a signed 64-bit integer reads the same, so that it
/// cannot frame the body otherwise than the gate.
const LENGTH_LIMIT: u64 = i64::MAX as u64;

/// What may be done with the guest's pending bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The first `n` bytes of `pending` may go upstream now.
    Forward(usize),
    /// Nothing more can be decided until more bytes come.
    NeedMore,
}

/// Why the gate closed: the connection goes no further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpDenial {
    /// The head did not end within [`HEAD_LIMIT`] bytes.
    #[error("the request head is over 16 KiB")]
    HeadTooLarge,
    /// Not an HTTP/1.0 or HTTP/1.1 request head (HTTP/0.9, the HTTP/2
    /// preface, a line ended by a bare LF, or bytes httparse refuses).
    #[error("not an HTTP/1.x request")]
    NotHttp1,
    /// More header fields than the gate reads.
    #[error("the request has more than 64 header fields")]
    TooManyHeaders,
    /// No Host header: HTTP/1.0 requests need one too.
    #[error("the request has no Host")]
    NoHost,
    /// More than one Host header.
    #[error("the request has more than one Host")]
    SeveralHosts,
    /// A Host that is not a host name with an optional port.
    #[error("the request's Host is not a host name")]
    BadHost,
    /// A request target in none of the forms the gate passes: a path, `*`
    /// for OPTIONS, or an `http` or `https` URL.
    #[error("the request target is not a path or an HTTP URL")]
    BadTarget,
    /// An absolute-form target whose host is not the Host, which a server
    /// would answer by the target's.
    #[error("the request target names another host than its Host")]
    TargetMismatch,
    /// CONNECT: a tunnel the gate could not read.
    #[error("CONNECT is not passed")]
    Connect,
    /// An Upgrade header or a Connection naming `upgrade`: once upgraded,
    /// the gate could read no further requests.
    #[error("the request asks to upgrade the connection")]
    Upgrade,
    /// A later request for another host than the connection's first.
    #[error("a later request on the connection is for {0}")]
    HostChanged(String),
    /// Both Content-Length and Transfer-Encoding, which servers frame
    /// differently (request smuggling).
    #[error("the request has both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
    /// A Content-Length that is not a number, or several that differ.
    #[error("the request's Content-Length is not one number")]
    BadContentLength,
    /// A Transfer-Encoding whose last coding is not `chunked`, that names
    /// `chunked` before another, or on an HTTP/1.0 request.
    #[error("the request's Transfer-Encoding does not end in chunked")]
    BadTransferEncoding,
    /// A chunk-size line that is not hex, too long or not ended by CRLF,
    /// or chunk data not followed by CRLF.
    #[error("a chunk of the request body is malformed")]
    BadChunk,
    /// A trailer section that is malformed or over [`HEAD_LIMIT`] bytes.
    #[error("the request's trailer section is malformed or over 16 KiB")]
    BadTrailers,
}

/// Where in a request the gate is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a request head (or its leading empty lines).
    #[default]
    Head,
    /// In a body of this many more bytes.
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// In a chunk's data, this many more bytes.
    ChunkData(u64),
    /// Before the CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk, before the trailer section and its empty line.
    Trailers,
}

/// The gate of one connection, from its first byte.
#[derive(Debug, Default)]
pub struct RequestGate {
    host: Option<String>,
    state: State,
}

impl RequestGate {
    /// The gate of a new connection.
    pub fn new() -> RequestGate {
        RequestGate::default()
    }

    /// The host the connection's requests are for, once the first head is
    /// read: normalized (lowercase, no port, no trailing dot), possibly an
    /// IPv4 address as the guest wrote it.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// Looks at `pending`, the guest's bytes not yet forwarded. The caller
    /// forwards what [`Gate::Forward`] allows, drops it from `pending` and
    /// calls again with the rest, and again when more bytes arrive; each
    /// forward covers one part of a request at most (a head, body bytes,
    /// a chunk line), and the one that covers the first head makes
    /// [`RequestGate::host`] known, to be checked before anything goes
    /// upstream. After a denial the connection is closed, and the gate
    /// not asked again.
    pub fn inspect(&mut self, pending: &[u8]) -> Result<Gate, HttpDenial> {
        if pending.is_empty() {
            return Ok(Gate::NeedMore);
        }
        match self.state {
            State::Head => self.head(pending),
            State::Length(left) => Ok(self.body(pending, left, State::Length, State::Head)),
            State::ChunkSize => self.chunk_size(pending),
            State::ChunkData(left) => {
                Ok(self.body(pending, left, State::ChunkData, State::ChunkEnd))
            }
            State::ChunkEnd => match pending {
                [b'\r', b'\n', ..] => {
                    self.state = State::ChunkSize;
                    Ok(Gate::Forward(2))
                }
                [b'\r'] => Ok(Gate::NeedMore),
                _ => Err(HttpDenial::BadChunk),
            },
            State::Trailers => self.trailers(pending),
        }
    }

    /// Forwards up to `left` bytes of a body, in `more` while some remain
    /// and `then` after.
    fn body(&mut self, pending: &[u8], left: u64, more: fn(u64) -> State, then: State) -> Gate {
        let n = usize::try_from(left).map_or(pending.len(), |left| left.min(pending.len()));
        // `n` is at most `left`, a u64.
        let remaining = left - n as u64;
        self.state = if remaining == 0 {
            then
        } else {
            more(remaining)
        };
        Gate::Forward(n)
    }

    fn head(&mut self, pending: &[u8]) -> Result<Gate, HttpDenial> {
        let window = &pending[..pending.len().min(HEAD_LIMIT)];
        let mut headers = [EMPTY_HEADER; HEADERS_LIMIT];
        let mut request = Request::new(&mut headers);
        let length = match request.parse(window) {
            Ok(Status::Complete(length)) => length,
            Ok(Status::Partial) if window.len() == HEAD_LIMIT => {
                return Err(HttpDenial::HeadTooLarge)
            }
            Ok(Status::Partial) => return Ok(Gate::NeedMore),
            Err(httparse::Error::TooManyHeaders) => return Err(HttpDenial::TooManyHeaders),
            Err(_) => return Err(HttpDenial::NotHttp1),
        };
        if bare_line_feed(window.get(..length).unwrap_or_default()) {
            return Err(HttpDenial::NotHttp1);
        }
        let (host, state) = checked(&request)?;
        match &self.host {
            Some(first) if *first != host => return Err(HttpDenial::HostChanged(host)),
            Some(_) => {}
            None => self.host = Some(host),
        }
        self.state = state;
        Ok(Gate::Forward(length))
    }

    fn chunk_size(&mut self, pending: &[u8]) -> Result<Gate, HttpDenial> {
        let window = &pending[..pending.len().min(SIZE_LINE_LIMIT)];
        let Some(end) = window.iter().position(|&b| b == b'\n') else {
            return if window.len() == SIZE_LINE_LIMIT {
                Err(HttpDenial::BadChunk)
            } else {
                Ok(Gate::NeedMore)
            };
        };
        let line = window[..end]
            .strip_suffix(b"\r")
            .ok_or(HttpDenial::BadChunk)?;
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let (hex, extensions) = line.split_at(digits);
        if digits == 0 || digits > SIZE_DIGITS || !chunk_extensions(extensions) {
            return Err(HttpDenial::BadChunk);
        }
        let size = std::str::from_utf8(hex)
            .ok()
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .filter(|size| *size <= LENGTH_LIMIT)
            .ok_or(HttpDenial::BadChunk)?;
        self.state = if size == 0 {
            State::Trailers
        } else {
            State::ChunkData(size)
        };
        Ok(Gate::Forward(end + 1))
    }

    fn trailers(&mut self, pending: &[u8]) -> Result<Gate, HttpDenial> {
        let window = &pending[..pending.len().min(HEAD_LIMIT)];
        let mut headers = [EMPTY_HEADER; HEADERS_LIMIT];
        match httparse::parse_headers(window, &mut headers) {
            Ok(Status::Complete((length, _)))
                if !bare_line_feed(window.get(..length).unwrap_or_default()) =>
            {
                self.state = State::Head;
                Ok(Gate::Forward(length))
            }
            Ok(Status::Partial) if window.len() < HEAD_LIMIT => Ok(Gate::NeedMore),
            _ => Err(HttpDenial::BadTrailers),
        }
    }
}

/// Whether a line of `bytes` ends in LF without CR, which some servers
/// take for a line's end and others do not.
fn bare_line_feed(bytes: &[u8]) -> bool {
    let mut previous = b'\r';
    bytes.iter().any(|&b| {
        let bare = b == b'\n' && previous != b'\r';
        previous = b;
        bare
    })
}

/// Whether what follows a chunk size on its line is extensions (RFC 9112,
/// section 7.1.1), loosely: empty, or `;` after optional whitespace, and
/// visible ASCII, spaces and tabs throughout.
fn chunk_extensions(bytes: &[u8]) -> bool {
    let sound = bytes
        .iter()
        .all(|&b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
    let start = bytes.iter().find(|&&b| b != b' ' && b != b'\t');
    sound && start.is_none_or(|&b| b == b';')
}

/// The host a complete request head is for, and the state its body puts
/// the gate in.
fn checked(request: &Request<'_, '_>) -> Result<(String, State), HttpDenial> {
    let method = request.method.unwrap_or_default();
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err(HttpDenial::Connect);
    }
    let mut host = None;
    let mut length = None;
    let mut framing = Codings::default();
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(HttpDenial::SeveralHosts);
            }
            host = Some(header.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            let value = content_length(header)?;
            if length.is_some_and(|length| length != value) {
                return Err(HttpDenial::BadContentLength);
            }
            length = Some(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            framing.read(header)?;
        } else if name.eq_ignore_ascii_case("upgrade")
            || (name.eq_ignore_ascii_case("connection") && names_upgrade(header.value))
        {
            return Err(HttpDenial::Upgrade);
        }
    }
    let host = host.ok_or(HttpDenial::NoHost)?;
    let host = std::str::from_utf8(host)
        .ok()
        .and_then(|host| authority(host.trim_ascii()))
        .ok_or(HttpDenial::BadHost)?;
    target(request.path.unwrap_or_default(), method, &host)?;
    let state = match (length, framing) {
        (Some(_), Codings { seen: true, .. }) => return Err(HttpDenial::LengthAndChunked),
        (None, Codings { seen: false, .. }) | (Some(0), _) => State::Head,
        (Some(length), _) => State::Length(length),
        (None, Codings { chunked: true, .. }) if request.version == Some(1) => State::ChunkSize,
        (None, _) => return Err(HttpDenial::BadTransferEncoding),
    };
    Ok((host, state))
}

/// The transfer codings of a request, across its Transfer-Encoding
/// headers.
#[derive(Debug, Default, Clone, Copy)]
struct Codings {
    /// Whether the request has a Transfer-Encoding.
    seen: bool,
    /// Whether its last coding so far is `chunked`.
    chunked: bool,
}

impl Codings {
    fn read(&mut self, header: &Header<'_>) -> Result<(), HttpDenial> {
        self.seen = true;
        let value =
            std::str::from_utf8(header.value).map_err(|_| HttpDenial::BadTransferEncoding)?;
        for coding in value
            .split(',')
            .map(str::trim_ascii)
            .filter(|c| !c.is_empty())
        {
            // Chunked is the last coding, and only once (RFC 9112, 6.1).
            if self.chunked {
                return Err(HttpDenial::BadTransferEncoding);
            }
            self.chunked = coding.eq_ignore_ascii_case("chunked");
        }
        Ok(())
    }
}

fn content_length(header: &Header<'_>) -> Result<u64, HttpDenial> {
    let digits = header.value.trim_ascii();
    if digits.is_empty() || digits.len() > LENGTH_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HttpDenial::BadContentLength);
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|digits| digits.parse().ok())
        .filter(|length| *length <= LENGTH_LIMIT)
        .ok_or(HttpDenial::BadContentLength)
}

/// Whether a Connection header's `value` names the `upgrade` option.
fn names_upgrade(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

/// The host of an authority, `host[:port]`, normalized; IPv6 literals,
/// user information and empty ports are not passed.
fn authority(text: &str) -> Option<String> {
    let name = match text.rsplit_once(':') {
        Some((name, port)) => {
            port.parse::<u16>().ok()?;
            if !port.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            name
        }
        None => text,
    };
    host_name(name)
}

/// Checks that the request `target` is for `host`: a path, `*` for
/// OPTIONS, or an `http` or `https` URL whose authority is the host's.
fn target(target: &str, method: &str, host: &str) -> Result<(), HttpDenial> {
    if target.starts_with('/') || (target == "*" && method == "OPTIONS") {
        return Ok(());
    }
    let rest = ["http://", "https://"]
        .iter()
        .find_map(|scheme| {
            let head = target.get(..scheme.len())?;
            head.eq_ignore_ascii_case(scheme)
                .then(|| target.get(scheme.len()..))
                .flatten()
        })
        .ok_or(HttpDenial::BadTarget)?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let named = authority(rest.get(..end).unwrap_or_default()).ok_or(HttpDenial::BadTarget)?;
    if named == host {
        Ok(())
    } else {
        Err(HttpDenial::TargetMismatch)
    }
}

#[cfg(test)]
mod tests;

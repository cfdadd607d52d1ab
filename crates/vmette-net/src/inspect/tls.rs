//! The server name of a TLS connection, from the guest's ClientHello.
//!
//! The hello is reassembled as a TLS server would: its handshake message
//! may be split over several records, and the records over any number of
//! TCP segments, so every call looks at the whole prefix received so far.
//! The parse is stricter than a server's: whatever a server might read
//! differently (a second name, a length that does not add up, another
//! record in the middle) is refused rather than guessed at, since the
//! stack connects by the name it reads and the server answers by the
//! name it reads.

use tls_parser::{parse_tls_extension_sni_hostname, parse_tls_handshake_client_hello, SNIType};

use super::host_name;

/// Most bytes of a ClientHello the stack waits for.
pub const HELLO_LIMIT: usize = 16 * 1024;

/// A TLS record's header: content type, version, length.
const RECORD_HEADER: usize = 5;

/// A handshake message's header: type and 24-bit length.
const HANDSHAKE_HEADER: usize = 4;

/// The largest plaintext record fragment (RFC 8446, section 5.1).
const MAX_FRAGMENT: usize = 1 << 14;

/// The content type of handshake records.
const HANDSHAKE: u8 = 22;

/// The handshake type of a ClientHello.
const CLIENT_HELLO: u8 = 1;

/// The major version byte of every SSL 3 and TLS version.
const TLS_MAJOR: u8 = 3;

/// The server_name extension (RFC 6066).
const SERVER_NAME: u16 = 0;

/// What the first bytes of a TLS connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed (and fewer than [`HELLO_LIMIT`] came so far).
    Incomplete,
    /// A complete ClientHello naming this server, normalized: lowercase
    /// ASCII, no trailing dot, a host name whose last label does not
    /// start with a digit (so no address in any form the C library reads).
    Sni(String),
    /// A complete ClientHello without a server_name extension, or with one
    /// naming no host_name.
    NoSni,
    /// Not a ClientHello, or one the stack will not pass: too long, not a
    /// handshake, interleaved with other records, a zero-length record,
    /// lengths that do not add up, more than one name, or a name that is
    /// not a host name.
    Malformed,
}

/// The bytes are not a ClientHello the stack passes: to the caller,
/// [`Hello::Malformed`].
struct Refused;

/// What the first `bytes` a guest sent on a TLS connection say: `bytes`
/// is everything received so far, from the connection's first byte.
pub fn client_hello(bytes: &[u8]) -> Hello {
    match handshake_message(bytes) {
        Ok(Some(message)) => match server_name(&message) {
            Ok(Some(name)) => Hello::Sni(name),
            Ok(None) => Hello::NoSni,
            Err(Refused) => Hello::Malformed,
        },
        Ok(None) => Hello::Incomplete,
        Err(Refused) => Hello::Malformed,
    }
}

/// The body of the ClientHello carried by the handshake records at the
/// start of `bytes`, once all of it came; `None` while more is needed.
fn handshake_message(bytes: &[u8]) -> Result<Option<Vec<u8>>, Refused> {
    let mut handshake = Vec::new();
    let mut offset = 0;
    loop {
        // A record that starts here could carry no byte within the limit.
        if offset + RECORD_HEADER >= HELLO_LIMIT {
            return Err(Refused);
        }
        let rest = bytes.get(offset..).unwrap_or_default();
        // Each header byte is checked as soon as it comes, so what is not
        // TLS is refused from its first byte.
        if rest.first().is_some_and(|&kind| kind != HANDSHAKE)
            || rest.get(1).is_some_and(|&major| major != TLS_MAJOR)
        {
            return Err(Refused);
        }
        let Some(&[_, _, _, high, low]) = rest.get(..RECORD_HEADER) else {
            return Ok(None);
        };
        let length = usize::from(u16::from_be_bytes([high, low]));
        let end = offset + RECORD_HEADER + length;
        if length == 0 || length > MAX_FRAGMENT || end > HELLO_LIMIT {
            return Err(Refused);
        }
        let fragment = &rest[RECORD_HEADER..rest.len().min(RECORD_HEADER + length)];
        handshake.extend_from_slice(fragment);
        if let Some(message) = hello_body(&handshake)? {
            return Ok(Some(message.to_vec()));
        }
        if fragment.len() < length {
            return Ok(None);
        }
        offset = end;
    }
}

/// The ClientHello body at the start of the reassembled `handshake`
/// bytes, once complete.
fn hello_body(handshake: &[u8]) -> Result<Option<&[u8]>, Refused> {
    if handshake.first().is_some_and(|&kind| kind != CLIENT_HELLO) {
        return Err(Refused);
    }
    let Some(&[_, high, middle, low]) = handshake.get(..HANDSHAKE_HEADER) else {
        return Ok(None);
    };
    let length = usize::from(high) << 16 | usize::from(middle) << 8 | usize::from(low);
    // The records that carry the body need their own headers too, and
    // all of it must fit in HELLO_LIMIT.
    if HANDSHAKE_HEADER + length + RECORD_HEADER > HELLO_LIMIT {
        return Err(Refused);
    }
    Ok(handshake.get(HANDSHAKE_HEADER..HANDSHAKE_HEADER + length))
}

/// The host name a ClientHello `body` names, if it names one.
fn server_name(body: &[u8]) -> Result<Option<String>, Refused> {
    let (rest, hello) = parse_tls_handshake_client_hello(body).map_err(|_| Refused)?;
    // Extensions whose length does not add up are left unparsed by
    // tls-parser, and bytes after them are not a hello's.
    if !rest.is_empty() || hello.version.0 >> 8 != u16::from(TLS_MAJOR) {
        return Err(Refused);
    }
    let mut extensions = hello.ext.unwrap_or_default();
    let mut name = None;
    let mut seen = false;
    while !extensions.is_empty() {
        let (kind, data, after) = extension(extensions)?;
        if kind == SERVER_NAME {
            // A second server_name is refused by servers that notice,
            // and read by those that do not.
            if seen {
                return Err(Refused);
            }
            seen = true;
            name = host_name_entry(data)?;
        }
        extensions = after;
    }
    Ok(name)
}

/// The type and data of the extension at the start of `bytes`, and what
/// follows it.
fn extension(bytes: &[u8]) -> Result<(u16, &[u8], &[u8]), Refused> {
    let Some(&[high, low, length_high, length_low]) = bytes.get(..4) else {
        return Err(Refused);
    };
    let length = usize::from(u16::from_be_bytes([length_high, length_low]));
    let data = bytes.get(4..4 + length).ok_or(Refused)?;
    let after = bytes.get(4 + length..).unwrap_or_default();
    Ok((u16::from_be_bytes([high, low]), data, after))
}

/// The one host_name of a server_name extension's `data`: a list of
/// entries, each a type and a name (RFC 6066, section 3).
fn host_name_entry(data: &[u8]) -> Result<Option<String>, Refused> {
    let Some(&[high, low]) = data.get(..2) else {
        return Err(Refused);
    };
    let mut list = &data[2..];
    if list.is_empty() || list.len() != usize::from(u16::from_be_bytes([high, low])) {
        return Err(Refused);
    }
    let mut name = None;
    while !list.is_empty() {
        let (after, (kind, raw)) = parse_tls_extension_sni_hostname(list).map_err(|_| Refused)?;
        if kind == SNIType::HostName {
            if name.is_some() {
                return Err(Refused);
            }
            name = Some(sni_host(raw)?);
        }
        list = after;
    }
    Ok(name)
}

/// `raw` as a server name the stack connects by. RFC 6066 forbids address
/// literals; a last label that starts with a digit is refused too, since
/// no top-level domain does and every form `inet_aton` reads as an IPv4
/// address (`10.0.0.1`, `127.1`, `0x7f000001`) does.
fn sni_host(raw: &[u8]) -> Result<String, Refused> {
    let text = std::str::from_utf8(raw).map_err(|_| Refused)?;
    let name = host_name(text).ok_or(Refused)?;
    let last = name.rsplit('.').next().unwrap_or_default();
    if last.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(Refused);
    }
    Ok(name)
}

#[cfg(test)]
pub(crate) mod tests;

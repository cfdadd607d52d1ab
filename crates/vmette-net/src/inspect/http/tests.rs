use super::*;
use crate::inspect::Random;

/// What the gate lets through of a guest that sends `chunks` one after
/// the other, forwarding as the stack would: the bytes forwarded, and the
/// denial that closed the connection, if one did.
fn run(chunks: &[&[u8]]) -> (Vec<u8>, Option<HttpDenial>, RequestGate) {
    let mut gate = RequestGate::new();
    let mut pending = Vec::new();
    let mut forwarded = Vec::new();
    for chunk in chunks {
        pending.extend_from_slice(chunk);
        loop {
            match gate.inspect(&pending) {
                Ok(Gate::Forward(n)) => {
                    assert!(
                        n > 0 && n <= pending.len(),
                        "forward {n} of {}",
                        pending.len()
                    );
                    forwarded.extend(pending.drain(..n));
                }
                Ok(Gate::NeedMore) => break,
                Err(denial) => return (forwarded, Some(denial), gate),
            }
        }
    }
    (forwarded, None, gate)
}

/// `stream` sent at once: all of it must pass.
fn passes(stream: &[u8]) -> RequestGate {
    let (forwarded, denial, gate) = run(&[stream]);
    assert_eq!(denial, None);
    assert_eq!(forwarded, stream);
    gate
}

/// `stream` sent at once: refused with `denial`, before any of it went.
fn refused(stream: &[u8], denial: HttpDenial) {
    let (forwarded, got, _) = run(&[stream]);
    assert_eq!(got, Some(denial), "{}", String::from_utf8_lossy(stream));
    assert!(forwarded.is_empty());
}

/// `stream` split at every offset into two sends, then one byte at a
/// time: each way it all passes, and the host is `host`.
fn passes_split(stream: &[u8], host: &str) {
    for at in 0..=stream.len() {
        let (first, second) = stream.split_at(at);
        let (forwarded, denial, gate) = run(&[first, second]);
        assert_eq!(denial, None, "split at {at}");
        assert_eq!(forwarded, stream, "split at {at}");
        assert_eq!(gate.host(), Some(host));
    }
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    let (forwarded, denial, _) = run(&bytes);
    assert_eq!(denial, None);
    assert_eq!(forwarded, stream);
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n";

#[test]
fn a_get_passes_and_names_its_host() {
    let mut gate = RequestGate::new();
    assert_eq!(gate.host(), None);
    assert_eq!(gate.inspect(&GET[..10]), Ok(Gate::NeedMore));
    assert_eq!(gate.host(), None);
    assert_eq!(gate.inspect(GET), Ok(Gate::Forward(GET.len())));
    assert_eq!(gate.host(), Some("allowed.test"));
    assert_eq!(gate.inspect(b""), Ok(Gate::NeedMore));
}

#[test]
fn the_first_head_is_forwarded_alone() {
    let stream = [GET, GET].concat();
    let mut gate = RequestGate::new();
    assert_eq!(gate.inspect(&stream), Ok(Gate::Forward(GET.len())));
    assert_eq!(
        gate.inspect(&stream[GET.len()..]),
        Ok(Gate::Forward(GET.len()))
    );
}

#[test]
fn pipelined_requests_for_the_same_host_pass() {
    let other = b"GET /two HTTP/1.1\r\nhost: ALLOWED.test:80\r\n\r\n";
    let gate = passes(&[GET, other, GET].concat());
    assert_eq!(gate.host(), Some("allowed.test"));
}

#[test]
fn a_later_request_for_another_host_is_refused_whole() {
    let other = b"GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n";
    let (forwarded, denial, gate) = run(&[&[GET, other].concat()]);
    assert_eq!(forwarded, GET);
    assert_eq!(denial, Some(HttpDenial::HostChanged("denied.test".into())));
    assert_eq!(gate.host(), Some("allowed.test"));

    // Also after a body.
    let post = b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 3\r\n\r\nabc";
    let (forwarded, denial, _) = run(&[post, other]);
    assert_eq!(forwarded, post);
    assert_eq!(denial, Some(HttpDenial::HostChanged("denied.test".into())));
}

#[test]
fn a_body_by_content_length_passes_however_split() {
    let stream = [
        &b"POST /upload HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 11\r\n\r\nhello world"[..],
        GET,
    ]
    .concat();
    passes_split(&stream, "allowed.test");
}

#[test]
fn a_body_is_not_read_as_a_request() {
    let body = b"GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n";
    let head = format!(
        "PUT / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    passes(&[head.as_bytes(), body].concat());
}

#[test]
fn a_body_is_forwarded_as_it_comes() {
    let mut gate = RequestGate::new();
    let head = b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 10\r\n\r\n";
    assert_eq!(gate.inspect(head), Ok(Gate::Forward(head.len())));
    assert_eq!(gate.inspect(b"abcd"), Ok(Gate::Forward(4)));
    assert_eq!(gate.inspect(b"efghijGET"), Ok(Gate::Forward(6)));
    assert_eq!(gate.inspect(b"GET"), Ok(Gate::NeedMore));
}

#[test]
fn equal_content_lengths_pass_and_others_do_not() {
    let same =
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok";
    passes(same);
    for value in [
        "2\r\nContent-Length: 3",
        "-1",
        "+2",
        "0x2",
        "2 2",
        "",
        "1,1",
        "99999999999999999999",
    ] {
        let head = format!("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: {value}\r\n\r\n");
        refused(head.as_bytes(), HttpDenial::BadContentLength);
    }
}

const CHUNKED: &[u8] =
    b"POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n\r\n\
    5;name=value\r\nhello\r\n\
    1A ; quoted=\"a b\"\r\nabcdefghijklmnopqrstuvwxyz\r\n\
    0\r\nExpires: never\r\nX-Sum: 1\r\n\r\n";

#[test]
fn a_chunked_body_with_extensions_and_trailers_passes_however_split() {
    passes_split(&[CHUNKED, GET].concat(), "allowed.test");
}

#[test]
fn a_chunked_body_without_trailers_passes() {
    let stream = b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
        3\r\nabc\r\n0\r\n\r\n";
    passes_split(
        &[&stream[..], b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"].concat(),
        "a.test",
    );
}

#[test]
fn a_chunk_is_forwarded_as_it_comes() {
    let mut gate = RequestGate::new();
    let head = b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(gate.inspect(head), Ok(Gate::Forward(head.len())));
    assert_eq!(gate.inspect(b"7fffffffffffffff"), Ok(Gate::NeedMore));
    assert_eq!(
        gate.inspect(b"7fffffffffffffff\r\nab"),
        Ok(Gate::Forward(18))
    );
    assert_eq!(gate.inspect(b"ab"), Ok(Gate::Forward(2)));
}

#[test]
fn malformed_chunks_are_refused() {
    let head = "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    let long_extension = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(SIZE_LINE_LIMIT));
    for body in [
        "x\r\n",
        "\r\n",
        " 5\r\nhello\r\n",
        "+5\r\nhello\r\n",
        "0x5\r\nhello\r\n",
        "5\nhello\r\n",
        "5\r\rhello\r\n",
        "5 x\r\nhello\r\n",
        "5;a\x01\r\nhello\r\n",
        "5\r\nhelloXY",
        "5\r\nhello\n0\r\n\r\n",
        "10000000000000000\r\n",
        long_extension.as_str(),
    ] {
        let stream = format!("{head}{body}");
        let (_, denial, _) = run(&[stream.as_bytes()]);
        assert_eq!(denial, Some(HttpDenial::BadChunk), "{body:?}");
    }
}

#[test]
fn malformed_trailers_are_refused() {
    let head = "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n";
    let long = format!("X: {}\r\n", "y".repeat(HEAD_LIMIT));
    for trailers in [
        "X-A: b\n\r\n",
        "Bad Name: x\r\n\r\n",
        " folded\r\n\r\n",
        long.as_str(),
    ] {
        let stream = format!("{head}{trailers}");
        let (_, denial, _) = run(&[stream.as_bytes()]);
        assert_eq!(denial, Some(HttpDenial::BadTrailers), "{trailers:?}");
    }
}

#[test]
fn both_lengths_are_refused() {
    refused(
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        HttpDenial::LengthAndChunked,
    );
    refused(
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
        HttpDenial::LengthAndChunked,
    );
}

#[test]
fn transfer_encodings_must_end_in_chunked() {
    for codings in [
        "gzip",
        "chunked, gzip",
        "chunked, chunked",
        "chunked\r\nTransfer-Encoding: gzip",
        "",
        "chunked;x=1",
    ] {
        let head =
            format!("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: {codings}\r\n\r\n");
        refused(head.as_bytes(), HttpDenial::BadTransferEncoding);
    }
    refused(
        b"POST / HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n",
        HttpDenial::BadTransferEncoding,
    );
    passes(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: CHUNKED\r\n\r\n0\r\n\r\n");
}

#[test]
fn connect_is_refused() {
    refused(
        b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n",
        HttpDenial::Connect,
    );
    refused(
        b"connect / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        HttpDenial::Connect,
    );
}

#[test]
fn upgrades_are_refused() {
    for header in [
        "Upgrade: websocket\r\nConnection: Upgrade",
        "Upgrade: h2c",
        "Connection: keep-alive, UPGRADE",
    ] {
        let head = format!("GET / HTTP/1.1\r\nHost: a.test\r\n{header}\r\n\r\n");
        refused(head.as_bytes(), HttpDenial::Upgrade);
    }
    passes(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, upgraded\r\n\r\n");
}

#[test]
fn an_absolute_target_must_name_the_host() {
    refused(
        b"GET http://denied.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        HttpDenial::TargetMismatch,
    );
    refused(
        b"GET https://denied.test HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        HttpDenial::TargetMismatch,
    );
    for target in [
        "HTTP://Allowed.Test:80/x",
        "http://allowed.test?q",
        "https://allowed.test",
    ] {
        let head = format!("GET {target} HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
        passes(head.as_bytes());
    }
    for target in [
        "http://user@allowed.test/",
        "http://[::1]/",
        "ftp://allowed.test/",
        "allowed.test:80",
        "allowed.test",
        "http:/allowed.test",
        "*",
    ] {
        let head = format!("GET {target} HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
        refused(head.as_bytes(), HttpDenial::BadTarget);
    }
    passes(b"OPTIONS * HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
}

#[test]
fn hosts_are_normalized() {
    for host in [
        "ALLOWED.test:80",
        "allowed.test.",
        " allowed.test\t",
        "allowed.test:8080",
    ] {
        let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        assert_eq!(
            passes(head.as_bytes()).host(),
            Some("allowed.test"),
            "{host:?}"
        );
    }
    let literal = passes(b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n");
    assert_eq!(literal.host(), Some("10.0.0.1"));
}

#[test]
fn a_host_must_be_a_host_name() {
    for host in [
        "",
        "[::1]",
        "[::1]:80",
        "allowed.test:",
        "allowed.test:http",
        "allowed.test:+80",
        "allowed.test:65536",
        "user@allowed.test",
        "allowed.test, denied.test",
        "allowed test",
        "allowed.test/x",
        "-allowed.test",
        "\u{e9}.test",
    ] {
        let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        refused(head.as_bytes(), HttpDenial::BadHost);
    }
}

#[test]
fn one_host_is_needed() {
    refused(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", HttpDenial::NoHost);
    refused(b"GET / HTTP/1.0\r\n\r\n", HttpDenial::NoHost);
    refused(
        b"GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: denied.test\r\n\r\n",
        HttpDenial::SeveralHosts,
    );
    refused(
        b"GET / HTTP/1.1\r\nHost: allowed.test\r\nhost: allowed.test\r\n\r\n",
        HttpDenial::SeveralHosts,
    );
    let gate = passes(b"GET / HTTP/1.0\r\nHost: allowed.test\r\n\r\n");
    assert_eq!(gate.host(), Some("allowed.test"));
}

#[test]
fn a_head_over_the_limit_is_refused() {
    let mut gate = RequestGate::new();
    let mut head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX: ".to_vec();
    head.resize(HEAD_LIMIT - 1, b'x');
    assert_eq!(gate.inspect(&head), Ok(Gate::NeedMore));
    head.push(b'x');
    assert_eq!(gate.inspect(&head), Err(HttpDenial::HeadTooLarge));

    // A head of exactly the limit passes.
    let mut head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX: ".to_vec();
    head.resize(HEAD_LIMIT - 4, b'x');
    head.extend_from_slice(b"\r\n\r\n");
    passes(&head);
}

#[test]
fn too_many_headers_are_refused() {
    let mut head = b"GET / HTTP/1.1\r\nHost: a.test\r\n".to_vec();
    for n in 0..HEADERS_LIMIT {
        head.extend_from_slice(format!("X-{n}: y\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    refused(&head, HttpDenial::TooManyHeaders);
}

#[test]
fn what_is_not_http1_is_refused() {
    for stream in [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        b"GET /\r\n",
        b"GET / HTTP/2\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a.test\n\n",
        b"GET / HTTP/1.1\r\nHost: a.test\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\nHost: a.test\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01",
        b"\n\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
    ] {
        refused(stream, HttpDenial::NotHttp1);
    }
}

#[test]
fn empty_lines_before_a_request_go_with_its_head() {
    let mut gate = RequestGate::new();
    assert_eq!(gate.inspect(b"\r\n\r\n"), Ok(Gate::NeedMore));
    let stream = [&b"\r\n\r\n"[..], GET].concat();
    assert_eq!(gate.inspect(&stream), Ok(Gate::Forward(stream.len())));
    assert_eq!(gate.host(), Some("allowed.test"));
    // And after a body, as some clients send.
    passes(
        &[
            &b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 1\r\n\r\nx\r\n"[..],
            GET,
        ]
        .concat(),
    );
}

#[test]
fn random_bytes_never_panic() {
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let alphabet = b"GET / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 0123456789abcdef;\r\n";
    for round in 0..10_000 {
        let length = random.below(300);
        let stream: Vec<u8> = (0..length)
            .map(|_| {
                if round % 2 == 0 {
                    random.next() as u8
                } else {
                    alphabet[random.below(alphabet.len())]
                }
            })
            .collect();
        let at = random.below(stream.len() + 1);
        run(&[&stream[..at], &stream[at..]]);
    }
}

#[test]
fn damaged_requests_never_panic() {
    let stream = [CHUNKED, GET, CHUNKED].concat();
    let mut random = Random(0x2545_f491_4f6c_dd1d);
    for _ in 0..10_000 {
        let mut damaged = stream.clone();
        for _ in 0..=random.below(3) {
            let at = random.below(damaged.len());
            damaged[at] = random.next() as u8;
        }
        let at = random.below(damaged.len() + 1);
        run(&[&damaged[..at], &damaged[at..]]);
    }
}

// Hostile review: smuggling and desync attempts. Each stream either is
// refused before any byte of a request for another host goes, or the
// bytes of that request are only ever forwarded as a body.

/// Whether any forwarded head names `evil.test`: what a smuggle needs.
fn smuggled(stream: &[u8]) -> bool {
    let (forwarded, _, _) = run(&[stream]);
    // Bytes forwarded as a body may hold anything; find a forwarded
    // request head naming evil.test that the gate read as a head.
    let mut gate = RequestGate::new();
    let mut pending = forwarded.clone();
    while !pending.is_empty() {
        let before = gate.state;
        match gate.inspect(&pending) {
            Ok(Gate::Forward(n)) => {
                let part: Vec<u8> = pending.drain(..n).collect();
                if before == State::Head
                    && String::from_utf8_lossy(&part)
                        .to_ascii_lowercase()
                        .contains("evil.test")
                {
                    return true;
                }
            }
            _ => break,
        }
    }
    false
}

#[test]
fn hostile_heads_the_upstream_might_read_otherwise_are_refused() {
    for stream in [
        // obs-fold: a folded Host line.
        &b"GET / HTTP/1.1\r\nHost: allowed.test\r\n evil.test\r\n\r\n"[..],
        // Whitespace before the colon.
        b"GET / HTTP/1.1\r\nHost : evil.test\r\nHost: allowed.test\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc",
        // A bare CR inside a line.
        b"GET / HTTP/1.1\r\nHost: allowed.test\rX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\rHost: evil.test\r\nHost: allowed.test\r\n\r\n",
        // A NUL in a value.
        b"GET / HTTP/1.1\r\nHost: allowed.test\0evil.test\r\n\r\n",
        // Tabs and doubled spaces in the request line.
        b"GET\t/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        // HTTP/1.2, HTTP/2.0.
        b"GET / HTTP/2.0\r\nHost: allowed.test\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let (forwarded, denial, _) = run(&[stream]);
        assert!(
            denial.is_some() && forwarded.is_empty(),
            "passed: {:?}",
            String::from_utf8_lossy(stream)
        );
    }
}

#[test]
fn hostile_content_lengths_are_refused() {
    for value in [
        "+5",
        "-1",
        " -0",
        "5 5",
        "5,5",
        "0x5",
        "5.0",
        "1e3",
        "٥",
        "",
        "99999999999999999999",
    ] {
        let stream = format!(
            "POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: {value}\r\n\r\nabcde"
        );
        let (forwarded, denial, _) = run(&[stream.as_bytes()]);
        assert!(
            denial.is_some() && forwarded.is_empty(),
            "passed: Content-Length {value:?}"
        );
    }
}

#[test]
fn hostile_transfer_encodings_are_refused() {
    for value in [
        "chunked, identity",
        "chunked;q=1",
        "\"chunked\"",
        "chunked chunked",
        "identity",
        "",
        "x-chunked",
    ] {
        let stream = format!(
            "POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: {value}\r\n\r\n0\r\n\r\n"
        );
        let (forwarded, denial, _) = run(&[stream.as_bytes()]);
        assert!(
            denial.is_some() && forwarded.is_empty(),
            "passed: Transfer-Encoding {value:?}"
        );
    }
    // Two headers: chunked, then another coding after it.
    refused(
        b"POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
        HttpDenial::BadTransferEncoding,
    );
}

#[test]
fn hostile_chunks_cannot_hide_a_head_for_another_host() {
    let evil = "GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    for body in [
        // A chunk extension holding a CRLF-less head.
        format!("5;x={evil:?}\r\nhello\r\n0\r\n\r\n"),
        // Bare LF ending a size line, then the head.
        format!("0\n\r\n{evil}"),
        // A size with a leading space or a sign.
        format!(" 5\r\nhello\r\n0\r\n\r\n{evil}"),
        format!("+5\r\nhello\r\n0\r\n\r\n{evil}"),
        // Chunk data longer than its size.
        format!("2\r\nhello\r\n0\r\n\r\n{evil}"),
        // A trailer line folded or ended by a bare LF.
        format!("0\r\nX: a\n{evil}"),
        format!("0\r\nX: a\r\n b\r\n\r\n{evil}"),
        // A size of 17 hex digits (overflows a u64 server-side).
        format!("10000000000000005\r\nhello\r\n0\r\n\r\n{evil}"),
    ] {
        let stream = format!(
            "POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        assert!(!smuggled(stream.as_bytes()), "smuggled: {stream:?}");
        // And the head after a well-formed body is read, and refused.
    }
    let (_, denial, _) = run(&[format!(
        "POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nX: y\r\n\r\n{evil}"
    )
    .as_bytes()]);
    assert_eq!(denial, Some(HttpDenial::HostChanged("evil.test".into())));
}

#[test]
fn hostile_pipelines_name_another_host_and_are_refused() {
    let evil = "GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    for first in [
        "GET / HTTP/1.0\r\nHost: allowed.test\r\nConnection: keep-alive\r\n\r\n".to_string(),
        "POST / HTTP/1.1\r\nHost: allowed.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc".to_string(),
        "GET / HTTP/1.1\r\nHost: allowed.test:8080\r\n\r\n".to_string(),
        "GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n".to_string(),
        "\r\n\r\nGET / HTTP/1.1\r\nHost: ALLOWED.test.\r\n\r\n".to_string(),
        "HEAD / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 0\r\n\r\n".to_string(),
    ] {
        let stream = format!("{first}{evil}");
        let (forwarded, denial, _) = run(&[stream.as_bytes()]);
        assert_eq!(
            denial,
            Some(HttpDenial::HostChanged("evil.test".into())),
            "{stream:?}"
        );
        assert_eq!(forwarded, first.as_bytes());
    }
    // The later head names the same host by another spelling, but its
    // absolute target names another.
    let (_, denial, _) = run(&[b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\nGET http://evil.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n"]);
    assert_eq!(denial, Some(HttpDenial::TargetMismatch));
    // User information, a backslash, or an IPv6 literal in the target.
    for target in [
        "http://allowed.test@evil.test/",
        "http://evil.test#@allowed.test/",
        "http://allowed.test\\@evil.test/",
        "http://[::1]/",
        "//evil.test/",
    ] {
        let stream = format!("GET {target} HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
        let (_, denial, gate) = run(&[stream.as_bytes()]);
        // `//evil.test/` is a path to a server: it may pass, for allowed.test.
        if denial.is_none() {
            assert_eq!(gate.host(), Some("allowed.test"), "{target}");
        }
    }
}

#[test]
fn hostile_hosts_with_ports_or_literals_are_read_as_their_name() {
    for (host, read) in [
        ("allowed.test:80", Some("allowed.test")),
        ("allowed.test:08080", Some("allowed.test")),
        ("allowed.test:+80", None),
        ("allowed.test:", None),
        ("allowed.test:80:90", None),
        ("allowed.test:99999", None),
        ("evil.test:80@allowed.test", None),
        ("allowed.test evil.test", None),
        ("allowed.test,evil.test", None),
        ("allowed.test/evil.test", None),
        ("allowed.test%2eevil", None),
        ("xn--allowed-test", Some("xn--allowed-test")),
        ("[::1]", None),
    ] {
        let stream = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let (_, denial, gate) = run(&[stream.as_bytes()]);
        assert_eq!(gate.host(), read, "{host:?} ({denial:?})");
    }
}

/// A random request for `host`: its bytes. Bodies (by length or chunks)
/// often carry a whole head for evil.test, which must go as a body.
fn random_request(random: &mut Random, host: &str) -> Vec<u8> {
    const EVIL: &[u8] = b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    let spelled = match random.below(4) {
        0 => host.to_ascii_uppercase(),
        1 => format!("{host}."),
        2 => format!("{host}:80"),
        _ => host.to_string(),
    };
    let method = ["GET", "POST", "PUT", "OPTIONS"][random.below(4)];
    let target = if random.below(4) == 0 {
        format!("http://{host}/x")
    } else {
        "/x?y=1".to_string()
    };
    let version = if random.below(5) == 0 { "1.0" } else { "1.1" };
    let mut body = Vec::new();
    for _ in 0..random.below(3) {
        if random.below(2) == 0 {
            body.extend_from_slice(EVIL);
        } else {
            body.extend((0..random.below(40)).map(|_| random.next() as u8));
        }
    }
    let mut head = format!("{method} {target} HTTP/{version}\r\nHost: {spelled}\r\n");
    if random.below(3) == 0 {
        head.push_str("Expect: 100-continue\r\n");
    }
    let chunked = version == "1.1" && random.below(2) == 0;
    let mut bytes;
    if chunked {
        head.push_str("Transfer-Encoding: gzip, Chunked\r\n\r\n");
        bytes = head.into_bytes();
        let mut rest = &body[..];
        while !rest.is_empty() {
            let n = 1 + random.below(rest.len());
            let ext = if random.below(2) == 0 {
                ";a=\"b c\""
            } else {
                ""
            };
            bytes.extend_from_slice(format!("{n:X}{ext}\r\n").as_bytes());
            bytes.extend_from_slice(&rest[..n]);
            bytes.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        bytes.extend_from_slice(b"0\r\n");
        if random.below(2) == 0 {
            bytes.extend_from_slice(b"Trailer-Host: evil.test\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
    } else {
        if !body.is_empty() || random.below(2) == 0 {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        } else {
            body.clear();
        }
        head.push_str("\r\n");
        bytes = head.into_bytes();
        bytes.extend_from_slice(&body);
    }
    bytes
}

/// Differential: pipelines of random requests, cut at random points.
/// Everything before the first request for evil.test passes, and
/// nothing of it or after it does.
#[test]
fn hostile_random_pipelines_never_let_another_host_through() {
    let mut random = Random(0x1234_5678_9abc_def1);
    for round in 0..3000 {
        let mut stream = Vec::new();
        let mut allowed_prefix = None;
        for index in 0..1 + random.below(4) {
            let evil = index > 0 && random.below(4) == 0;
            if evil && allowed_prefix.is_none() {
                allowed_prefix = Some(stream.len());
            }
            let host = if evil { "evil.test" } else { "allowed.test" };
            stream.extend(random_request(&mut random, host));
        }
        let mut cuts: Vec<usize> = (0..random.below(6))
            .map(|_| random.below(stream.len() + 1))
            .collect();
        cuts.push(0);
        cuts.push(stream.len());
        cuts.sort_unstable();
        let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
        let (forwarded, denial, gate) = run(&chunks);
        let text = String::from_utf8_lossy(&stream);
        match allowed_prefix {
            None => {
                assert_eq!(denial, None, "round {round}: {text:?}");
                assert_eq!(forwarded, stream, "round {round}");
            }
            Some(prefix) => {
                assert_eq!(
                    denial,
                    Some(HttpDenial::HostChanged("evil.test".into())),
                    "round {round}: {text:?}"
                );
                assert_eq!(forwarded, stream[..prefix], "round {round}: {text:?}");
            }
        }
        assert_eq!(gate.host(), Some("allowed.test"));
    }
}

#[test]
fn lengths_past_a_signed_64_bit_integer_are_refused() {
    let (forwarded, denial, _) = run(&[
        b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 9223372036854775808\r\n\r\n",
    ]);
    assert!(forwarded.is_empty());
    assert_eq!(denial, Some(HttpDenial::BadContentLength));
    let (_, denial, _) = run(&[
        b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 9223372036854775807\r\n\r\n",
    ]);
    assert_eq!(denial, None);
    let head = b"POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (forwarded, denial, _) = run(&[head, b"8000000000000000\r\n"]);
    assert_eq!(forwarded, head);
    assert_eq!(denial, Some(HttpDenial::BadChunk));
    let (_, denial, _) = run(&[head, b"7fffffffffffffff\r\n"]);
    assert_eq!(denial, None);
}

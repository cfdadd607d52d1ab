use super::*;
use crate::inspect::Random;

// ClientHellos as Python's ssl module (OpenSSL 3.0) wrote them, for
// `allowed.test` and for no server name: one record of 517 bytes each.
const WITH_SNI: &str = concat!(
    "1603010200010001fc0303c34b9df7c6bac8580712281c0baef1c705e1e0743cd85fea7b89b6c2b688541720",
    "d5fc7f6bea42ea740fa996bd8dbd286749ecd3104b89ebc7846af0a677ce3d780024130213031301c02cc030",
    "c02bc02fcca9cca8c024c028c023c027009f009e006b006700ff0100018f00000011000f00000c616c6c6f77",
    "65642e74657374000b000403000102000a00160014001d0017001e0019001801000101010201030104002300",
    "000016000000170000000d002a0028040305030603080708080809080a080b08040805080604010501060103",
    "0303010302040205020602002b00050403040303002d00020101003300260024001d00206d18deb580a3fcda",
    "f2f02d91a4bb0e8ef4298c431e2fe11685ee5b72a5e4d306001500e100000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "000000000000000000000000000000000000000000000000000000000000000000",
);
const WITHOUT_SNI: &str = concat!(
    "1603010200010001fc0303b5e573f7a198e396dd6f59405c5b9e12f9ac32994710dabdc8e482793404058120",
    "420a0515139f246faf338c543f54700af603ec7d7471819b32f454a8dcc293780024130213031301c02cc030",
    "c02bc02fcca9cca8c024c028c023c027009f009e006b006700ff0100018f000b000403000102000a00160014",
    "001d0017001e0019001801000101010201030104002300000016000000170000000d002a0028040305030603",
    "080708080809080a080b080408050806040105010601030303010302040205020602002b0005040304030300",
    "2d00020101003300260024001d0020ece0e4617bc8e38e54bd80ebed4e8f76f3cb5da2fea407c7fdf6a84e23",
    "8de564001500f600000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "000000000000000000000000000000000000000000000000000000000000000000",
);

fn bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).expect("hex"))
        .collect()
}

/// The handshake message a one-record hello carries.
fn message(record: &[u8]) -> Vec<u8> {
    record[RECORD_HEADER..].to_vec()
}

/// `handshake` re-framed as handshake records of `size` bytes each.
fn records(handshake: &[u8], size: usize) -> Vec<u8> {
    handshake
        .chunks(size)
        .flat_map(|chunk| record(HANDSHAKE, chunk))
        .collect()
}

fn record(kind: u8, fragment: &[u8]) -> Vec<u8> {
    let length = u16::try_from(fragment.len()).expect("a record's length");
    let mut record = vec![kind, 3, 1];
    record.extend_from_slice(&length.to_be_bytes());
    record.extend_from_slice(fragment);
    record
}

/// A handshake message of `kind` whose body is `body`.
fn handshake(kind: u8, body: &[u8]) -> Vec<u8> {
    let length = u32::try_from(body.len()).expect("a body's length");
    let mut message = vec![kind];
    message.extend_from_slice(&length.to_be_bytes()[1..]);
    message.extend_from_slice(body);
    message
}

/// A ClientHello body: TLS 1.2, no session, one cipher suite, no
/// compression, then `extensions` (already framed) in a block.
fn body_with(extensions: &[u8]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    let length = u16::try_from(extensions.len()).expect("extensions' length");
    body.extend_from_slice(&length.to_be_bytes());
    body.extend_from_slice(extensions);
    body
}

fn hello_message(body: &[u8]) -> Vec<u8> {
    handshake(CLIENT_HELLO, body)
}

fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut extension = kind.to_be_bytes().to_vec();
    let length = u16::try_from(data.len()).expect("an extension's length");
    extension.extend_from_slice(&length.to_be_bytes());
    extension.extend_from_slice(data);
    extension
}

/// A server_name extension listing `entries`, each a type and a name.
fn server_names(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (kind, name) in entries {
        list.push(*kind);
        let length = u16::try_from(name.len()).expect("a name's length");
        list.extend_from_slice(&length.to_be_bytes());
        list.extend_from_slice(name);
    }
    let length = u16::try_from(list.len()).expect("a list's length");
    let mut data = length.to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    ext(SERVER_NAME, &data)
}

/// A one-record hello with these extensions.
fn hello_with(extensions: &[u8]) -> Vec<u8> {
    record(HANDSHAKE, &handshake(CLIENT_HELLO, &body_with(extensions)))
}

/// A one-record hello naming `name`.
pub(crate) fn named(name: &[u8]) -> Vec<u8> {
    hello_with(&server_names(&[(0, name)]))
}

fn sni(name: &str) -> Hello {
    Hello::Sni(name.to_string())
}

/// Every proper prefix of `stream` is incomplete, and the whole says `then`.
fn incomplete_until(stream: &[u8], then: &Hello) {
    for end in 0..stream.len() {
        assert_eq!(client_hello(&stream[..end]), Hello::Incomplete, "at {end}");
    }
    assert_eq!(&client_hello(stream), then);
}

#[test]
fn a_real_hello_names_its_server() {
    assert_eq!(client_hello(&bytes(WITH_SNI)), sni("allowed.test"));
    assert_eq!(client_hello(&bytes(WITHOUT_SNI)), Hello::NoSni);
}

#[test]
fn a_hello_is_incomplete_until_its_last_byte() {
    incomplete_until(&bytes(WITH_SNI), &sni("allowed.test"));
    incomplete_until(&bytes(WITHOUT_SNI), &Hello::NoSni);
}

#[test]
fn a_hello_split_over_records_is_reassembled() {
    let handshake = message(&bytes(WITH_SNI));
    for size in [1, 2, 3, 100, 255, 516] {
        incomplete_until(&records(&handshake, size), &sni("allowed.test"));
    }
}

#[test]
fn what_follows_a_complete_hello_does_not_matter() {
    let mut stream = bytes(WITH_SNI);
    stream.extend(record(23, b"early data"));
    stream.extend_from_slice(b"\xff\x00 garbage");
    assert_eq!(client_hello(&stream), sni("allowed.test"));

    // More handshake bytes in the hello's own last record, too.
    let mut handshake = message(&bytes(WITH_SNI));
    handshake.extend(handshake.clone());
    assert_eq!(
        client_hello(&record(HANDSHAKE, &handshake)),
        sni("allowed.test")
    );
}

#[test]
fn lengths_that_do_not_add_up_are_refused() {
    let real = bytes(WITH_SNI);
    // A record shorter than its handshake message, then another kind.
    let handshake = message(&real);
    let mut short = record(HANDSHAKE, &handshake[..300]);
    short.extend(record(23, &handshake[300..]));
    assert_eq!(client_hello(&short), Hello::Malformed);

    // A handshake length that cuts the extensions short.
    let mut cut = handshake.clone();
    cut[3] -= 10;
    assert_eq!(client_hello(&record(HANDSHAKE, &cut)), Hello::Malformed);

    // Extensions whose block is longer than the body.
    let mut body = body_with(&server_names(&[(0, b"allowed.test")]));
    let block = 2 + 32 + 1 + 4 + 2;
    body[block] += 1;
    let long = record(HANDSHAKE, &hello_message(&body));
    assert_eq!(client_hello(&long), Hello::Malformed);

    // An extension longer than its block.
    let mut body = body_with(&ext(SERVER_NAME, b"\x00\x05\x00\x00\x02ab"));
    let last = body.len() - 9;
    body[last] += 1;
    assert_eq!(
        client_hello(&record(HANDSHAKE, &hello_message(&body))),
        Hello::Malformed
    );
}

#[test]
fn what_is_not_a_handshake_is_refused_from_its_first_byte() {
    for first in [&[23][..], &[21], &[20], &[0x80], b"G", b"\x16\x02"] {
        assert_eq!(client_hello(first), Hello::Malformed, "{first:?}");
    }
    let mut application = bytes(WITH_SNI);
    application[0] = 23;
    assert_eq!(client_hello(&application), Hello::Malformed);
    let server_hello = handshake(2, &body_with(&[]));
    assert_eq!(
        client_hello(&record(HANDSHAKE, &server_hello)),
        Hello::Malformed
    );
    assert_eq!(client_hello(&[HANDSHAKE, 3, 1, 0, 10, 2]), Hello::Malformed);
}

#[test]
fn huge_lengths_are_refused_before_their_bytes_come() {
    assert_eq!(
        client_hello(&[HANDSHAKE, 3, 1, 0xff, 0xff]),
        Hello::Malformed
    );
    assert_eq!(
        client_hello(&[HANDSHAKE, 3, 1, 0x40, 0x01]),
        Hello::Malformed
    );
    // A full record and its header do not fit in HELLO_LIMIT.
    assert_eq!(
        client_hello(&[HANDSHAKE, 3, 1, 0x40, 0x00]),
        Hello::Malformed
    );
    assert_eq!(
        client_hello(&[HANDSHAKE, 3, 1, 0x3f, 0xfb, CLIENT_HELLO, 0xff, 0xff, 0xff]),
        Hello::Malformed
    );
    // The largest record that fits, with the largest hello that does.
    assert_eq!(
        client_hello(&[HANDSHAKE, 3, 1, 0x3f, 0xfb, CLIENT_HELLO, 0, 0x3f, 0xf7]),
        Hello::Incomplete
    );
    assert_eq!(
        client_hello(&[HANDSHAKE, 3, 1, 0x3f, 0xfb, CLIENT_HELLO, 0, 0x3f, 0xf8]),
        Hello::Malformed
    );
}

#[test]
fn a_hello_past_the_limit_is_refused() {
    let padding = ext(21, &vec![0; HELLO_LIMIT]);
    let body = body_with(&[server_names(&[(0, b"allowed.test")]), padding].concat());
    let stream = records(&hello_message(&body), MAX_FRAGMENT);
    assert_eq!(client_hello(&stream), Hello::Malformed);
    assert_eq!(client_hello(&stream[..100]), Hello::Malformed);

    // A small declared length in tiny records: their headers count too.
    let body = body_with(&ext(21, &vec![0; 4000]));
    let stream = records(&hello_message(&body), 1);
    let refused = (0..stream.len())
        .find(|&end| client_hello(&stream[..end]) == Hello::Malformed)
        .expect("refused at some point");
    assert!(refused <= HELLO_LIMIT, "{refused}");
    assert_eq!(client_hello(&stream[..HELLO_LIMIT]), Hello::Malformed);
}

#[test]
fn records_of_another_kind_may_not_come_between() {
    let handshake = message(&bytes(WITH_SNI));
    let mut stream = record(HANDSHAKE, &handshake[..200]);
    stream.extend(record(20, &[1]));
    stream.extend(record(HANDSHAKE, &handshake[200..]));
    assert_eq!(client_hello(&stream), Hello::Malformed);
}

#[test]
fn zero_length_records_are_refused() {
    assert_eq!(client_hello(&[HANDSHAKE, 3, 1, 0, 0]), Hello::Malformed);
    let handshake = message(&bytes(WITH_SNI));
    let mut stream = record(HANDSHAKE, &handshake[..200]);
    stream.extend(record(HANDSHAKE, &[]));
    stream.extend(record(HANDSHAKE, &handshake[200..]));
    assert_eq!(client_hello(&stream), Hello::Malformed);
}

#[test]
fn a_record_of_another_major_version_is_refused() {
    let mut stream = bytes(WITH_SNI);
    stream[1] = 2;
    assert_eq!(client_hello(&stream), Hello::Malformed);
}

#[test]
fn server_names_are_normalized() {
    assert_eq!(client_hello(&named(b"ALLOWED.Test.")), sni("allowed.test"));
    assert_eq!(
        client_hello(&named(b"a_b.allowed.test")),
        sni("a_b.allowed.test")
    );
}

#[test]
fn names_that_are_not_host_names_are_refused() {
    for name in [
        &b"10.0.0.1"[..],
        b"127.1",
        b"0x7f000001",
        b"allowed.0",
        b"[::1]",
        b"::1",
        b"allowed.test:443",
        b"allowed.test\0",
        b"allowed test",
        b"\xc3\xa9.test",
        b"\xff.test",
        b"-allowed.test",
        b"allowed..test",
        b"",
        b".",
    ] {
        assert_eq!(client_hello(&named(name)), Hello::Malformed, "{name:?}");
    }
}

#[test]
fn one_host_name_at_most() {
    let two = server_names(&[(0, b"allowed.test"), (0, b"denied.test")]);
    assert_eq!(client_hello(&hello_with(&two)), Hello::Malformed);
    let same = server_names(&[(0, b"allowed.test"), (0, b"allowed.test")]);
    assert_eq!(client_hello(&hello_with(&same)), Hello::Malformed);
    let twice = [
        server_names(&[(0, b"allowed.test")]),
        server_names(&[(0, b"denied.test")]),
    ]
    .concat();
    assert_eq!(client_hello(&hello_with(&twice)), Hello::Malformed);
}

#[test]
fn names_of_another_type_name_no_host() {
    let other = server_names(&[(1, b"allowed.test")]);
    assert_eq!(client_hello(&hello_with(&other)), Hello::NoSni);
    let both = server_names(&[(1, b"denied.test"), (0, b"allowed.test")]);
    assert_eq!(client_hello(&hello_with(&both)), sni("allowed.test"));
    assert_eq!(client_hello(&hello_with(&[])), Hello::NoSni);
    assert_eq!(
        client_hello(&hello_with(&ext(16, b"\x00\x03\x02h2"))),
        Hello::NoSni
    );
}

#[test]
fn a_server_name_extension_must_hold_a_list() {
    for data in [
        &b""[..],
        b"\x00",
        b"\x00\x00",
        b"\x00\x06\x00\x00\x02ab",
        b"\x00\x04\x00\x00\x02ab",
    ] {
        let hello = hello_with(&ext(SERVER_NAME, data));
        assert_eq!(client_hello(&hello), Hello::Malformed, "{data:?}");
    }
    // An entry longer than the list.
    let hello = hello_with(&ext(SERVER_NAME, b"\x00\x05\x00\x00\x03ab"));
    assert_eq!(client_hello(&hello), Hello::Malformed);
}

#[test]
fn random_bytes_never_panic() {
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    for _ in 0..10_000 {
        let length = random.below(600);
        let mut input: Vec<u8> = (0..length).map(|_| random.next() as u8).collect();
        // Most random bytes stop at the first; a handshake header gets
        // further.
        if random.below(2) == 0 && input.len() >= 2 {
            input[0] = HANDSHAKE;
            input[1] = TLS_MAJOR;
        }
        client_hello(&input);
    }
}

#[test]
fn damaged_hellos_never_panic() {
    let real = records(&message(&bytes(WITH_SNI)), 100);
    let mut random = Random(0x2545_f491_4f6c_dd1d);
    for _ in 0..10_000 {
        let mut input = real.clone();
        for _ in 0..=random.below(4) {
            let at = random.below(input.len());
            input[at] = random.next() as u8;
        }
        input.truncate(random.below(input.len() + 1));
        client_hello(&input);
    }
}

/// Differential: damaged hellos the stack reads a name from are read to
/// the same one name by tls-parser's own record and extension parsers,
/// as a server that does not reassemble would.
#[test]
fn hostile_damaged_hellos_name_what_tls_parser_names() {
    use tls_parser::{
        parse_tls_extensions, parse_tls_message_handshake, TlsExtension, TlsMessage,
        TlsMessageHandshake,
    };
    let stream = named(b"allowed.test");
    let mut random = Random(0x0dd_b1a5_e5ca_1ab1);
    let mut named_count = 0;
    for _ in 0..20_000 {
        let mut damaged = stream.clone();
        for _ in 0..=random.below(2) {
            let at = random.below(damaged.len());
            damaged[at] = random.next() as u8;
        }
        let Hello::Sni(name) = client_hello(&damaged) else {
            continue;
        };
        named_count += 1;
        // The record may be longer than the hello (the stack need not
        // wait for its end): read the handshake message itself.
        let Ok((_, message)) = parse_tls_message_handshake(&damaged[5..]) else {
            panic!("the stack named {name} in what tls-parser reads as no message: {damaged:?}");
        };
        let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = &message else {
            panic!("the stack named {name} in no ClientHello");
        };
        let (_, extensions) = parse_tls_extensions(hello.ext.unwrap_or_default())
            .unwrap_or_else(|_| panic!("{name}: extensions tls-parser refuses"));
        let names: Vec<String> = extensions
            .iter()
            .filter_map(|e| match e {
                TlsExtension::SNI(list) => Some(list),
                _ => None,
            })
            .flatten()
            .filter(|(kind, _)| *kind == SNIType::HostName)
            .map(|(_, raw)| String::from_utf8_lossy(raw).to_ascii_lowercase())
            .collect();
        assert_eq!(
            names
                .iter()
                .map(|n| n.trim_end_matches('.'))
                .collect::<Vec<_>>(),
            [name.as_str()],
            "{damaged:?}"
        );
    }
    assert!(
        named_count > 100,
        "only {named_count} damaged hellos named a server"
    );
}

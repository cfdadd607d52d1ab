//! The network tests' own little internet, where no packet can leave this
//! machine even when the stack is broken.
//!
//! vmette runs in a network namespace of its own (`…v`) whose only route
//! leads to a second namespace (`…w`) over a veth pair. There, on
//! 198.18.0.0/15 (a benchmarking range, not one the stack denies), are the
//! test hosts: a web server on 198.18.0.10:80 (with a UDP echo server on
//! port 7007) and a DNS server on 198.18.0.53 that logs every query. Every other address a test names
//! (9.9.9.9, 1.1.1.1, 10.0.0.1, 169.254.169.254, …) is routed there too,
//! where a watcher logs every packet that arrives, so its log proves what
//! reached nothing. `ip netns exec` also puts this lab's `resolv.conf` and
//! `hosts` over the host's for vmette, so the stack's default resolver
//! path asks the lab's DNS server.
//!
//! For the egress allowlist, `start_egress` adds hosts that log what
//! reaches them: web servers (HTTP/1.1 on 80, HTTPS on 443 with a
//! certificate of a CA made at start) on `allowed.test`, `denied.test`
//! and `cdn.test` (with `img.cdn.test`), and raw TCP servers on
//! 198.18.5.2:8080, 198.18.5.2:8081 and 198.18.5.3:8080. The DNS server
//! also answers `lo.rebind.test` (127.0.0.1) and `private.rebind.test`
//! (10.0.0.5), addresses only the watcher sees.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The web server.
pub const WEB: &str = "198.18.0.10";
/// The DNS server.
pub const DNS: &str = "198.18.0.53";
/// The UDP echo server's port, on the web server's address.
pub const UDP_ECHO: u16 = 7007;
/// `allowed.test`'s web server.
pub const ALLOWED: &str = "198.18.1.10";
/// `denied.test`'s web server.
pub const DENIED: &str = "198.18.2.10";
/// The web server of `cdn.test` and `img.cdn.test`.
pub const CDN: &str = "198.18.3.10";
/// The raw TCP server on ports 8080 and 8081.
pub const RAW: &str = "198.18.5.2";
/// Its neighbour, a raw TCP server on port 8080.
pub const RAW_NEIGHBOUR: &str = "198.18.5.3";
/// Where the raw TCP servers listen.
const RAW_ENDPOINTS: [&str; 3] = ["198.18.5.2:8080", "198.18.5.2:8081", "198.18.5.3:8080"];

/// The test CA's `openssl ca` configuration: certificates valid from 2000,
/// so a guest clock a little behind the host's still accepts them.
const CA_CONFIG: &str = "\
[ca]
default_ca = lab
[lab]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = anything
unique_subject = no
[anything]
commonName = supplied
[req]
distinguished_name = name
prompt = no
[name]
CN = placeholder
[authority]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:allowed.test, DNS:denied.test, DNS:cdn.test, DNS:*.cdn.test
authorityKeyIdentifier = keyid
";

pub struct NetLab {
    name: String,
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("run ip (iproute2)");
    assert!(status.success(), "ip {args:?} failed");
}

impl NetLab {
    /// Builds the namespaces and starts the test hosts. Needs root.
    pub fn new() -> NetLab {
        assert!(
            nix_is_root(),
            "the network tests build network namespaces and need root"
        );
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("vmt{}x{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("vmette-netlab-")
            .tempdir()
            .expect("lab directory");
        let lab = NetLab {
            name,
            dir,
            children: Vec::new(),
        };
        lab.build();
        lab
    }

    pub fn vm_ns(&self) -> String {
        format!("{}v", self.name)
    }

    fn world_ns(&self) -> String {
        format!("{}w", self.name)
    }

    fn build(&self) {
        let (vm, world) = (self.vm_ns(), self.world_ns());
        let (a, b) = (format!("{}a", self.name), format!("{}b", self.name));
        ip(&["netns", "add", &vm]);
        ip(&["netns", "add", &world]);
        ip(&[
            "link", "add", &a, "netns", &vm, "type", "veth", "peer", "name", &b, "netns", &world,
        ]);
        let in_vm = |args: &[&str]| {
            let mut all = vec!["-n", vm.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        };
        let in_world = |args: &[&str]| {
            let mut all = vec!["-n", world.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_vm(&["link", "set", "lo", "up"]);
        in_vm(&["link", "set", &a, "up"]);
        in_vm(&["addr", "add", "198.18.0.1/24", "dev", &a]);
        in_vm(&["route", "add", "default", "via", "198.18.0.2"]);
        in_world(&["link", "set", "lo", "up"]);
        in_world(&["link", "set", &b, "up"]);
        in_world(&["addr", "add", "198.18.0.2/24", "dev", &b]);
        for host in [WEB, DNS, ALLOWED, DENIED, CDN, RAW, RAW_NEIGHBOUR] {
            in_world(&["addr", "add", &format!("{host}/32"), "dev", &b]);
        }
        // The lab's resolver files, which `ip netns exec` mounts over the
        // host's for vmette.
        let etc = Path::new("/etc/netns").join(&vm);
        std::fs::create_dir_all(&etc).expect("/etc/netns");
        std::fs::write(etc.join("resolv.conf"), format!("nameserver {DNS}\n"))
            .expect("resolv.conf");
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1 localhost\n{WEB} files.test\n"),
        )
        .expect("hosts");
    }

    /// Starts the test hosts: the watcher, the DNS server, the web server
    /// serving `web_root`.
    pub fn start(mut self, web_root: &Path) -> NetLab {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/netlab.py");
        let world = self.world_ns();
        let watcher_log = self.path("watch.log");
        let dns_log = self.path("dns.log");
        let b = format!("{}b", self.name);
        for (args, log) in [
            (
                vec![
                    script.to_str().unwrap_or_default(),
                    "watch",
                    &b,
                    watcher_log.to_str().unwrap_or_default(),
                ],
                &watcher_log,
            ),
            (
                vec![
                    script.to_str().unwrap_or_default(),
                    "dns",
                    DNS,
                    dns_log.to_str().unwrap_or_default(),
                ],
                &dns_log,
            ),
        ] {
            let child = self.in_ns(&world, "python3", &args);
            self.children.push(child);
            wait_for(|| std::fs::read_to_string(log).is_ok_and(|t| t.contains("ready")));
        }
        let echo = self.in_ns(
            &world,
            "python3",
            &[
                script.to_str().unwrap_or_default(),
                "echo",
                WEB,
                &UDP_ECHO.to_string(),
            ],
        );
        self.children.push(echo);
        let web = self.in_ns(
            &world,
            "python3",
            &[
                "-m",
                "http.server",
                "80",
                "--bind",
                WEB,
                "--directory",
                web_root.to_str().unwrap_or_default(),
            ],
        );
        self.children.push(web);
        self.wait_for_port(&world, WEB, 80);
        self
    }

    /// Starts the test hosts and the egress allowlist's: the web servers
    /// of `allowed.test`, `denied.test` and `cdn.test`, serving `www()`,
    /// and the raw TCP servers. `share()` holds what the guest needs: the
    /// test CA's certificate (`ca.pem`) and the probes (`probe.py`).
    pub fn start_egress(self) -> NetLab {
        let (www, share, certs) = (self.www(), self.share(), self.path("certs"));
        for dir in [&www, &share, &certs] {
            std::fs::create_dir_all(dir).expect("lab directory");
        }
        certificates(&certs);
        std::fs::copy(certs.join("ca.pem"), share.join("ca.pem")).expect("CA certificate");
        let support = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support");
        std::fs::copy(support.join("probe.py"), share.join("probe.py")).expect("probe.py");
        let mut lab = self.start(&www);
        let script = support.join("netlab.py");
        let script = script.to_str().unwrap_or_default();
        let world = lab.world_ns();
        let (dir, tcp_log) = (lab.dir.path().to_path_buf(), lab.path("tcp.log"));
        let (cert, key) = (certs.join("server.pem"), certs.join("server.key"));
        let mut web = vec![
            script,
            "web",
            dir.to_str().unwrap_or_default(),
            www.to_str().unwrap_or_default(),
            cert.to_str().unwrap_or_default(),
            key.to_str().unwrap_or_default(),
        ];
        web.extend([ALLOWED, DENIED, CDN]);
        let child = lab.in_ns(&world, "python3", &web);
        lab.children.push(child);
        let mut tcp = vec![script, "tcp", tcp_log.to_str().unwrap_or_default()];
        tcp.extend(RAW_ENDPOINTS);
        let child = lab.in_ns(&world, "python3", &tcp);
        lab.children.push(child);
        // Ready lines, not test connections, which would be in the logs.
        for log in [ALLOWED, DENIED, CDN]
            .map(|a| lab.path(&format!("web-{a}.log")))
            .into_iter()
            .chain([tcp_log])
        {
            wait_for(|| std::fs::read_to_string(&log).is_ok_and(|t| t.contains("ready")));
        }
        lab
    }

    /// The egress web servers' root.
    pub fn www(&self) -> PathBuf {
        self.path("www")
    }

    /// The directory a test shares into the guest at `/lab`.
    pub fn share(&self) -> PathBuf {
        self.path("share")
    }

    /// What the web server on `address` logged, in order (see netlab.py:
    /// `http HOST METHOD PATH`, `tls SNI`, `tls-failed SNI REASON`,
    /// `https SNI METHOD PATH`).
    pub fn web_log(&self, address: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(&format!("web-{address}.log")))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l != "ready")
            .map(str::to_string)
            .collect()
    }

    /// How many connections the raw TCP server on `endpoint`
    /// (`ADDRESS:PORT`) accepted.
    pub fn connections_to(&self, endpoint: &str) -> usize {
        std::fs::read_to_string(self.path("tcp.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.strip_prefix("connect ") == Some(endpoint))
            .count()
    }

    /// Starts an HTTP server in the vmette namespace, on `bind` (its
    /// loopback, or 0.0.0.0 for every address the namespace has).
    pub fn host_server(&mut self, bind: &str, port: u16, root: &Path) {
        let vm = self.vm_ns();
        let child = self.in_ns(
            &vm,
            "python3",
            &[
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                bind,
                "--directory",
                root.to_str().unwrap_or_default(),
            ],
        );
        self.children.push(child);
        self.wait_for_port(&vm, "127.0.0.1", port);
    }

    fn in_ns(&self, ns: &str, program: &str, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a test host")
    }

    fn wait_for_port(&self, ns: &str, host: &str, port: u16) {
        wait_for(|| {
            Command::new("ip")
                .args(["netns", "exec", ns, "python3", "-c"])
                .arg(format!(
                    "import socket; socket.create_connection(('{host}', {port}), 1)"
                ))
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs vmette with `args` inside the lab's vmette namespace, and
    /// checks that it left nothing behind.
    pub fn run(&self, sandbox: &super::Sandbox, args: &[&str]) -> Output {
        let child = self
            .wrap(&sandbox.command(args))
            .spawn()
            .expect("spawn vmette");
        let output = super::wait_with_limit(child, super::RUN_LIMIT);
        sandbox.assert_clean();
        output
    }

    /// Runs vmette with `args` inside the lab's vmette namespace, talking
    /// to the test's own `daemon`.
    pub fn run_with(&self, daemon: &super::TestDaemon<'_>, args: &[&str]) -> Output {
        let child = self
            .wrap(&daemon.command(args))
            .spawn()
            .expect("spawn vmette");
        super::wait_with_limit(child, super::RUN_LIMIT)
    }

    /// `command` run inside the vmette namespace.
    pub fn wrap(&self, command: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.vm_ns()])
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        wrapped
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        wrapped
    }

    /// The names the DNS server was asked, in order.
    pub fn dns_queries(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("dns.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l != "ready")
            .map(str::to_string)
            .collect()
    }

    /// Every packet the world saw addressed to `address`.
    pub fn packets_to(&self, address: &str) -> Vec<String> {
        std::fs::read_to_string(self.path("watch.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(' ').nth(1) == Some(address))
            .map(str::to_string)
            .collect()
    }
}

/// A test CA in `dir` (`ca.pem`) and the web servers' certificate
/// (`server.pem`, `server.key`) for `allowed.test`, `denied.test`,
/// `cdn.test` and `*.cdn.test`, made with the `openssl` binary.
fn certificates(dir: &Path) {
    std::fs::write(dir.join("ca.cnf"), CA_CONFIG).expect("CA configuration");
    std::fs::write(dir.join("index.txt"), "").expect("CA database");
    std::fs::write(dir.join("serial"), "01\n").expect("CA serial");
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let sign = [
        "ca", "-batch", "-config", "ca.cnf", "-keyfile", "ca.key", "-notext",
    ];
    let valid = [
        "-startdate",
        "20000101000000Z",
        "-enddate",
        "20991231235959Z",
    ];
    for args in [
        [
            &[
                "req",
                "-new",
                "-config",
                "ca.cnf",
                "-subj",
                "/CN=vmette-test-ca",
            ][..],
            &key,
            &["-keyout", "ca.key", "-out", "ca.csr"],
        ]
        .concat(),
        [
            &sign[..],
            &valid,
            &[
                "-selfsign",
                "-extensions",
                "authority",
                "-in",
                "ca.csr",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
        [
            &[
                "req",
                "-new",
                "-config",
                "ca.cnf",
                "-subj",
                "/CN=allowed.test",
            ][..],
            &key,
            &["-keyout", "server.key", "-out", "server.csr"],
        ]
        .concat(),
        [
            &sign[..],
            &valid,
            &[
                "-cert",
                "ca.pem",
                "-extensions",
                "server",
                "-in",
                "server.csr",
                "-out",
                "server.pem",
            ],
        ]
        .concat(),
    ] {
        let output = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The lines of `text` that start with `label:`, without it: what the
/// guests' test scripts print.
pub fn marked<'a>(text: &'a str, label: &str) -> Vec<&'a str> {
    let prefix = format!("{label}:");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .map(str::trim)
        .collect()
}

/// The one line of `text` marked `label`.
pub fn one(text: &str, label: &str) -> String {
    let found = marked(text, label);
    assert_eq!(found.len(), 1, "{label} in {text}");
    found[0].to_string()
}

fn wait_for(mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "a test host did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [self.vm_ns(), self.world_ns()] {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&ns));
        }
    }
}

//! Daemon figures: starts `vmetted` on a private socket and on loopback
//! TCP, then measures, through its HTTP API with hyper as the client, the
//! exec round trip of `true` (create the exec, read its events to the
//! exit; median and 99th percentile over N runs) over the unix socket and
//! over TCP with the bearer token; the exec rate of 4 clients × 25 execs
//! each at once on one session; and the daemon's resident memory with no
//! session and with four idle ones. `scripts/bench.sh` runs it next to
//! the library's session benchmark.
//!
//!   cargo run --release -p vmetted --example daemon_bench -- [N]   (default 200)

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/1.1 connection to the daemon, over either listener.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// The bearer token, over TCP.
    token: Option<String>,
}

impl Client {
    async fn unix(socket: &Path) -> Result<Client, Error> {
        let stream = UnixStream::connect(socket).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Client {
            sender,
            token: None,
        })
    }

    async fn tcp(address: &str, token: &str) -> Result<Client, Error> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Client {
            sender,
            token: Some(token.to_string()),
        })
    }

    async fn call(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, String), Error> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://vmette{path}"))
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(Full::new(Bytes::from(body.to_string())))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Runs `argv` (JSON) in `session` and reads its events to the end.
    async fn exec(&mut self, session: &str, argv: &str) -> Result<String, Error> {
        let body = format!(r#"{{"argv":{argv}}}"#);
        let (status, created) = self
            .call("POST", &format!("/v1/sessions/{session}/execs"), &body)
            .await?;
        if status != 201 {
            return Err(format!("exec: {status} {created}").into());
        }
        let id: serde_json::Value = serde_json::from_str(&created)?;
        let path = format!("/v1/sessions/{session}/execs/{}/events", id["id"]);
        let (status, events) = self.call("GET", &path, "").await?;
        if status != 200 || !events.contains("event: exit") {
            return Err(format!("events: {status} {events}").into());
        }
        Ok(events)
    }
}

/// Median and 99th percentile of `runs` round trips of `true`.
async fn round_trips(client: &mut Client, runs: usize) -> Result<(f64, f64), Error> {
    let mut times = Vec::with_capacity(runs);
    for i in 0..=runs {
        let started = Instant::now();
        client.exec("bench", r#"["true"]"#).await?;
        // The first exec pages `true` in; it is not the warm figure.
        if i > 0 {
            times.push(started.elapsed());
        }
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    Ok((at(0.50), at(0.99)))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200);
    let exe = std::env::current_exe()?;
    let vmetted: PathBuf = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("vmetted"))
        .ok_or("cannot find vmetted next to this example")?;
    let dir = std::env::temp_dir().join(format!("vmetted-bench-{}", std::process::id()));
    let mut daemon = Command::new(&vmetted)
        .arg("--socket-dir")
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = daemon.stderr.take().ok_or("no stderr")?;
    let (reported, address) = std::sync::mpsc::channel();
    // Read to the end, so the daemon never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("vmetted: serving http://") {
                let _ = reported.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    let address = address.recv_timeout(Duration::from_secs(20))?;
    let token = std::fs::read_to_string(dir.join("token"))?;
    let socket = dir.join("vmetted.sock");
    let idle_rss = rss_kib(daemon.id());

    let mut unix = Client::unix(&socket).await?;
    let (status, body) = unix
        .call("POST", "/v1/sessions", r#"{"name":"bench"}"#)
        .await?;
    if status != 201 {
        return Err(format!("create: {status} {body}").into());
    }
    let (p50, p99) = round_trips(&mut unix, runs).await?;
    println!(
        "exec round trip of true through vmetted, {runs} runs: unix socket p50 {p50:.1} ms, p99 {p99:.1} ms"
    );
    let mut tcp = Client::tcp(&address, token.trim()).await?;
    let (p50, p99) = round_trips(&mut tcp, runs).await?;
    println!(
        "exec round trip of true through vmetted, {runs} runs: loopback TCP p50 {p50:.1} ms, p99 {p99:.1} ms"
    );

    // Four clients at once, each with its own connection, on one session.
    let (clients, each) = (4, 25);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let mut client = Client::unix(&socket).await?;
        tasks.spawn(async move {
            for i in 0..each {
                let events = client
                    .exec("bench", &format!(r#"["echo","{c}-{i}"]"#))
                    .await?;
                if !events.contains("event: stdout") {
                    return Err::<(), Error>(format!("no output: {events}").into());
                }
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let rate = (clients * each) as f64 / started.elapsed().as_secs_f64();
    println!("{clients} clients × {each} execs at once on one session: {rate:.0} execs/s");

    for _ in 0..3 {
        let (status, body) = unix.call("POST", "/v1/sessions", "{}").await?;
        if status != 201 {
            return Err(format!("create: {status} {body}").into());
        }
    }
    let busy_rss = rss_kib(daemon.id());
    println!("vmetted RSS: {idle_rss} KiB with no session, {busy_rss} KiB with 4 idle sessions");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

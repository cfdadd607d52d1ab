//! Daemon figures: starts `vmetted` on a private socket, then measures,
//! through its HTTP API with hyper as the client, the exec round trip of
//! `true` (create the exec, read its events to the exit; median and 99th
//! percentile over N runs), and the daemon's resident memory with no
//! session and with four idle ones. `scripts/bench.sh` runs it next to the
//! library's session benchmark.
//!
//!   cargo run --release -p vmetted --example daemon_bench -- [N]   (default 200)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(socket: &Path) -> Result<Sender, Box<dyn std::error::Error>> {
    let stream = UnixStream::connect(socket).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn call(
    sender: &mut Sender,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://vmette{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
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
async fn main() -> Result<(), Box<dyn std::error::Error>> {
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
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let socket = dir.join("vmetted.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).await.is_err() {
        if Instant::now() > deadline {
            return Err("vmetted did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle_rss = rss_kib(daemon.id());

    let mut sender = connect(&socket).await?;
    let (status, body) = call(&mut sender, "POST", "/v1/sessions", r#"{"name":"bench"}"#).await?;
    if status != 201 {
        return Err(format!("create: {status} {body}").into());
    }
    let mut times = Vec::with_capacity(runs);
    for i in 0..=runs {
        let started = Instant::now();
        let (status, body) = call(
            &mut sender,
            "POST",
            "/v1/sessions/bench/execs",
            r#"{"argv":["true"]}"#,
        )
        .await?;
        if status != 201 {
            return Err(format!("exec: {status} {body}").into());
        }
        let id: serde_json::Value = serde_json::from_str(&body)?;
        let path = format!("/v1/sessions/bench/execs/{}/events", id["id"]);
        let (status, events) = call(&mut sender, "GET", &path, "").await?;
        if status != 200 || !events.contains("event: exit") {
            return Err(format!("events: {status} {events}").into());
        }
        // The first exec pages `true` in; it is not the warm figure.
        if i > 0 {
            times.push(started.elapsed());
        }
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "exec round trip of true through vmetted, {} runs: p50 {:.1} ms, p99 {:.1} ms",
        times.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );
    for _ in 0..3 {
        let (status, body) = call(&mut sender, "POST", "/v1/sessions", "{}").await?;
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

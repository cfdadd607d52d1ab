//! Exec round trip in a warm session: boots one VM, runs `true` in it N
//! times through the library (exec, wait for its exit), and prints the
//! median and 99th percentile. `scripts/bench.sh` runs it after the
//! start-up benchmark.
//!
//!   cargo run --release --example exec_latency -- [N]   (default 200)

use std::time::{Duration, Instant};

use vmette::{Config, ExecSpec, ExecStatus};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 200,
    };
    let session = vmette::start_session(&Config::default_machine())?;
    let spec = ExecSpec::new(["true"]);
    // The first exec pages the command in; it is not the warm figure.
    session.exec(&spec)?.wait();
    let mut times: Vec<Duration> = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        let status = session.exec(&spec)?.wait();
        times.push(started.elapsed());
        if status != ExecStatus::Exited(0) {
            return Err(format!("true ended with {status:?}").into());
        }
    }
    session.stop();
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "exec round trip of true, {} runs: p50 {:.1} ms, p99 {:.1} ms",
        times.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );
    Ok(())
}

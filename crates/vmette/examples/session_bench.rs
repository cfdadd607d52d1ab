//! Session figures: boots one VM, then measures through the library the
//! exec round trip of `true` (exec, wait for its exit; median and 99th
//! percentile over N runs) and the throughput of writing and reading back
//! a 100 MiB file. `scripts/bench.sh` runs it after the start-up benchmark.
//!
//!   cargo run --release --example session_bench -- [N] [MIB]
//!   (default 200 execs, 100 MiB)

use std::time::{Duration, Instant};

use vmette::{Config, ExecSpec, ExecStatus};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(200);
    let mib: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(100);
    let mut config = Config::default_machine();
    // The file lives in the guest's memory (the tmpfs overlay).
    config.memory_mib = 512 + 2 * mib as u32;
    let session = vmette::start_session(&config)?;

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
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "exec round trip of true, {} runs: p50 {:.1} ms, p99 {:.1} ms",
        times.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );

    let data: Vec<u8> = (0..mib << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let started = Instant::now();
    session.write_file("/tmp/bench.bin", &mut &data[..], 0o644)?;
    let write = started.elapsed();
    let mut back = Vec::with_capacity(data.len());
    let started = Instant::now();
    session.read_file("/tmp/bench.bin", &mut back)?;
    let read = started.elapsed();
    if back != data {
        return Err("the file came back changed".into());
    }
    println!(
        "{mib} MiB file: write {:.1} MiB/s, read {:.1} MiB/s",
        mib as f64 / write.as_secs_f64(),
        mib as f64 / read.as_secs_f64()
    );
    session.stop();
    Ok(())
}

//! The library surface on real VMs: capture mode keeps the streams apart
//! and capped, streaming mode delivers chunks as they come, and bad configs
//! fail with `InvalidConfig` before anything starts.

use std::time::Duration;

use vmette::{Config, Error, OutputStream, RunStatus, Stdin};

fn config(command: &[&str]) -> Config {
    let mut config = Config::new(command.iter().copied());
    config.timeout = Some(Duration::from_secs(120));
    config
}

#[test]
fn capture_keeps_stdout_and_stderr_apart() {
    let output =
        vmette::run(&config(&["sh", "-c", "echo out; echo err >&2; exit 3"])).expect("run");
    assert_eq!(output.status, RunStatus::Exited(3));
    assert_eq!(output.exit_code(), 3);
    assert_eq!(output.stdout, b"out\n");
    assert_eq!(output.stderr, b"err\n");
    assert!(!output.stdout_truncated && !output.stderr_truncated);
}

#[test]
fn capture_is_capped_and_says_so() {
    let mut config = config(&["sh", "-c", "head -c 200000 /dev/zero; echo small >&2"]);
    config.capture_limit = 1000;
    let output = vmette::run(&config).expect("run");
    assert_eq!(output.stdout.len(), 1000);
    assert!(output.stdout_truncated);
    assert_eq!(output.stderr, b"small\n");
    assert!(!output.stderr_truncated);
}

#[test]
fn streaming_hands_over_chunks_and_stdin_bytes_arrive() {
    let mut config = config(&["sh", "-c", "cat; echo done >&2"]);
    config.stdin = Stdin::Bytes(b"piped in\n".to_vec());
    let mut chunks = Vec::new();
    let output = vmette::run_streaming(&config, &mut |stream, data| {
        chunks.push((stream, data.to_vec()));
    })
    .expect("run");
    assert_eq!(output.status, RunStatus::Exited(0));
    assert!(output.stdout.is_empty(), "streaming captures nothing");
    let stdout: Vec<u8> = chunks
        .iter()
        .filter(|(s, _)| *s == OutputStream::Stdout)
        .flat_map(|(_, d)| d.clone())
        .collect();
    let stderr: Vec<u8> = chunks
        .iter()
        .filter(|(s, _)| *s == OutputStream::Stderr)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(stdout, b"piped in\n");
    assert_eq!(stderr, b"done\n");
}

#[test]
fn invalid_configs_name_the_field() {
    let mut bad = config(&["true"]);
    bad.memory_mib = 0;
    match vmette::run(&bad) {
        Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "memory"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    let mut bad = config(&["true"]);
    bad.shares.push(vmette::Share {
        host_path: "/nonexistent/share".into(),
        guest_path: "/data".into(),
        writable: false,
    });
    match vmette::run(&bad) {
        Err(Error::InvalidConfig { field, reason }) => {
            assert_eq!(field, "share");
            assert!(reason.contains("/nonexistent/share"));
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn a_timeout_is_a_status_not_an_error() {
    let mut config = config(&["sleep", "60"]);
    config.timeout = Some(Duration::from_secs(3));
    let output = vmette::run(&config).expect("run");
    assert_eq!(output.status, RunStatus::TimedOut);
    assert_eq!(output.exit_code(), 124);
}

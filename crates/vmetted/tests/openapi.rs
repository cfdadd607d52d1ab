//! `docs/openapi.json`: the same as what the daemon's route table says
//! (no VM needed), valid OpenAPI 3.1 by `openapi-spec-validator`, and true
//! of the daemon, by schemathesis fuzzing a real one over loopback TCP.
//!
//! Where a change to the API is intended, re-bless the file with
//! `VMETTE_BLESS=1 cargo test -p vmetted --test openapi` (or write it with
//! `vmetted --openapi > docs/openapi.json`) and review the diff.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

use support::{vms_referring_to, Daemon, VMETTED};

fn committed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

#[test]
fn docs_openapi_json_is_what_the_routes_say() {
    let output = Command::new(VMETTED)
        .arg("--openapi")
        .output()
        .expect("vmetted --openapi");
    assert!(output.status.success(), "{output:?}");
    let generated = String::from_utf8(output.stdout).expect("UTF-8");
    assert!(generated.ends_with("}\n"), "no final newline");
    let again = Command::new(VMETTED)
        .arg("--openapi")
        .output()
        .expect("vmetted --openapi");
    assert_eq!(
        generated.as_bytes(),
        &again.stdout[..],
        "the description is not stable"
    );
    if std::env::var_os("VMETTE_BLESS").is_some() {
        std::fs::write(committed(), &generated).expect("bless");
    }
    let frozen = std::fs::read_to_string(committed()).expect("docs/openapi.json");
    assert!(
        frozen == generated,
        "docs/openapi.json differs from what the daemon's routes describe; if the API change \
         is intended, re-bless with `VMETTE_BLESS=1 cargo test -p vmetted --test openapi` and \
         review the diff"
    );
}

#[test]
fn docs_openapi_json_is_valid_openapi_3_1() {
    let output = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys\n\
             from openapi_spec_validator import validate\n\
             from openapi_spec_validator.readers import read_from_filename\n\
             spec, _ = read_from_filename(sys.argv[1])\n\
             assert spec['openapi'].startswith('3.1.'), spec['openapi']\n\
             validate(spec)\n\
             print('valid')\n",
        )
        .arg(committed())
        .output()
        .expect("python3 (openapi-spec-validator comes from setup.sh --with-test-tools)");
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("valid"),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn schemathesis_finds_no_fault_in_the_daemon_over_tcp() {
    // Two small sessions at most, so that most fuzzed creates are refused
    // at once (429) rather than each booting a VM.
    let (daemon, address, token) =
        Daemon::start_tcp(&["--max-sessions", "2", "--max-memory", "1G", "--offline"]);
    let work = tempfile::tempdir().expect("work");
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis_hooks.py");
    let started = Instant::now();
    // The daemon contacts no registry or other host, so schemathesis needs
    // no offline mode; it reaches only the loopback listener.
    let mut run = Command::new("schemathesis");
    run.arg("--config-file")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml"))
        .arg("run")
        .arg(committed())
        .arg("--url")
        .arg(format!("http://{address}"))
        .arg("--header")
        .arg(format!("Authorization: Bearer {token}"))
        // Streams that only end with their exec, and the WebSocket attach,
        // are not request-and-answer routes.
        .args(["--exclude-path-regex", "/(events|attach)$"])
        .args(["--checks", "all"])
        .args(["--max-examples", "25"])
        // The step's bound: the fuzzing and stateful phases stop here.
        .args(["--max-time", "150"])
        .args(["--seed", "1"])
        // One worker: the VMs take the two cores, and schemathesis' own
        // generation is not safe on threads of one process (hypothesis
        // fails with "AST constructor recursion depth mismatch").
        .args(["--workers", "1"])
        // Long enough for a boot under emulation, for the request and for
        // the response-time check.
        .args(["--request-timeout", "120"])
        .args(["--max-response-time", "120"])
        .args(["--generation-database", "none"])
        .args(["--no-color"])
        .env("SCHEMATHESIS_HOOKS", &hooks)
        // Its `.hypothesis` and any report stay out of the source tree.
        .current_dir(work.path())
        .stdin(Stdio::null());
    let output = run
        .output()
        .expect("schemathesis (from setup.sh --with-test-tools)");
    let took = started.elapsed();
    let report = format!(
        "schemathesis took {took:?}\n{}{}\n--- vmetted ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        daemon.log()
    );
    assert!(output.status.success(), "{report}");
    eprintln!("schemathesis took {took:?}");

    let (code, status) = daemon.call("GET", "/v1/status", None);
    assert_eq!(code, 200, "the daemon no longer serves: {status}\n{report}");

    // Every VM of the daemon is a session it lists.
    let (code, sessions) = daemon.call("GET", "/v1/sessions", None);
    assert_eq!(code, 200, "{sessions}");
    let sessions = sessions.as_array().expect("a list").clone();
    let running: Vec<&str> = sessions
        .iter()
        .filter(|s| s["state"] == "running")
        .map(|s| s["id"].as_str().expect("id"))
        .collect();
    let vms = vms_referring_to(daemon.tmp.path());
    assert_eq!(
        vms.len(),
        running.len(),
        "VMs {vms:?} but running sessions {running:?}\n{report}"
    );
    for session in &sessions {
        let id = session["id"].as_str().expect("id");
        let (code, ended) = daemon.call("DELETE", &format!("/v1/sessions/{id}"), None);
        assert!(code == 200 || code == 404, "delete {id}: {code} {ended}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vms_referring_to(daemon.tmp.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "VMs left after every session was deleted: {:?}",
            vms_referring_to(daemon.tmp.path())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, listed) = daemon.call("GET", "/v1/sessions", None);
    assert_eq!(listed, Value::Array(Vec::new()), "sessions left");
}

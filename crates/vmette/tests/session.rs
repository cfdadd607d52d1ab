//! Sessions on real VMs: many execs in one machine, sequential and at once,
//! with their own streams, environment, stdin, signals and timeouts; a stop
//! handle on another thread; a session outliving the thread that started
//! it; an idle timeout; and per-exec flow control,
//! where one exec whose output nobody reads stalls nothing else.

use std::thread;
use std::time::{Duration, Instant};

use vmette::{Config, EndReason, ExecEvent, ExecSpec, ExecStatus, Session};

const LIMIT: usize = 1 << 20;

fn session(idle: Option<Duration>) -> Session {
    let mut config = Config::default_machine();
    config.timeout = Some(Duration::from_secs(600));
    config.idle_timeout = idle;
    vmette::start_session(&config).expect("session")
}

fn sh(line: &str) -> ExecSpec {
    ExecSpec::new(["sh", "-c", line])
}

/// Round trip of a short command in a warm session.
fn echo_time(session: &Session) -> Duration {
    let started = Instant::now();
    let output = session.exec(&sh("echo ok")).expect("exec").output(LIMIT);
    assert_eq!(output.stdout, b"ok\n");
    started.elapsed()
}

#[test]
fn one_session_serves_many_execs() {
    let session = session(None);

    for i in 0..20 {
        let line = format!("echo out-{i}; echo err-{i} >&2; exit {}", i % 5);
        let output = session.exec(&sh(&line)).expect("exec").output(LIMIT);
        assert_eq!(output.status, ExecStatus::Exited(i % 5), "exec {i}");
        assert_eq!(output.stdout, format!("out-{i}\n").into_bytes());
        assert_eq!(output.stderr, format!("err-{i}\n").into_bytes());
    }

    // Four at once: together they take about as long as one.
    let started = Instant::now();
    let execs: Vec<_> = (0..4)
        .map(|i| {
            let line = format!("sleep 2; echo done-{i}; echo e-{i} >&2; exit {i}");
            session.exec(&sh(&line)).expect("exec")
        })
        .collect();
    for (i, exec) in execs.into_iter().enumerate() {
        let output = exec.output(LIMIT);
        assert_eq!(output.status, ExecStatus::Exited(i as i32));
        assert_eq!(output.stdout, format!("done-{i}\n").into_bytes());
        assert_eq!(output.stderr, format!("e-{i}\n").into_bytes());
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "four 2 s execs took {:?}: they did not run at once",
        started.elapsed()
    );

    // Environment and working directory per exec.
    let mut spec = sh("echo $GREETING; pwd");
    spec.env = vec![("GREETING".into(), "hello".into())];
    spec.workdir = Some("/usr/share".into());
    let output = session.exec(&spec).expect("exec").output(LIMIT);
    assert_eq!(output.stdout, b"hello\n/usr/share\n");
    let output = session
        .exec(&sh("echo ${GREETING:-unset}; pwd"))
        .expect("exec")
        .output(LIMIT);
    assert_eq!(
        output.stdout, b"unset\n/\n",
        "settings leaked between execs"
    );

    // Stdin to one exec while another streams.
    let streamer = session
        .exec(&sh("for i in 1 2 3 4 5; do echo tick $i; sleep 0.2; done"))
        .expect("exec");
    let mut spec = ExecSpec::new(["cat"]);
    spec.stdin = true;
    let cat = session.exec(&spec).expect("exec");
    cat.write_stdin(b"first line\n").expect("stdin");
    match cat.next_event_timeout(Duration::from_secs(30)) {
        Ok(Some(ExecEvent::Stdout(data))) => assert_eq!(data, b"first line\n"),
        other => panic!("cat did not echo its stdin: {other:?}"),
    }
    cat.write_stdin(b"second line\n").expect("stdin");
    cat.close_stdin().expect("close");
    let output = cat.output(LIMIT);
    assert_eq!(output.status, ExecStatus::Exited(0));
    assert_eq!(output.stdout, b"second line\n");
    let ticks = streamer.output(LIMIT);
    assert_eq!(
        String::from_utf8_lossy(&ticks.stdout).lines().count(),
        5,
        "{ticks:?}"
    );

    // A signal ends one exec; the session goes on.
    let sleeper = session
        .exec(&ExecSpec::new(["sleep", "100"]))
        .expect("exec");
    thread::sleep(Duration::from_millis(300));
    sleeper.signal(15).expect("signal");
    assert_eq!(sleeper.wait(), ExecStatus::Signaled(15));

    // A timeout ends one exec; the session goes on.
    let mut spec = ExecSpec::new(["sleep", "100"]);
    spec.timeout = Some(Duration::from_secs(1));
    assert_eq!(
        session.exec(&spec).expect("exec").wait(),
        ExecStatus::TimedOut
    );

    // A command that does not exist, then one that does.
    let missing = session
        .exec(&ExecSpec::new(["no-such-command"]))
        .expect("exec")
        .wait();
    assert!(
        matches!(missing, ExecStatus::NotStarted { code: 127, .. }),
        "{missing:?}"
    );
    assert_eq!(
        session.exec(&sh("exit 0")).expect("exec").wait(),
        ExecStatus::Exited(0)
    );

    // The stop handle works from another thread, and ends running execs.
    let long = session
        .exec(&ExecSpec::new(["sleep", "100"]))
        .expect("exec");
    let handle = session.stop_handle();
    let stopper = thread::spawn(move || handle.stop());
    assert_eq!(
        long.wait(),
        ExecStatus::SessionEnded(EndReason::Stopped),
        "a running exec learns why the session ended"
    );
    stopper.join().expect("stopper");
    assert_eq!(
        session.wait_end(Duration::from_secs(30)),
        Some(EndReason::Stopped)
    );
    assert!(matches!(
        session.exec(&sh("true")),
        Err(vmette::Error::SessionEnded(EndReason::Stopped))
    ));
    assert_eq!(session.stop(), EndReason::Stopped);
}

#[test]
fn a_session_outlives_the_thread_that_started_it() {
    // A thread pool's worker that starts a session and ends: the parent-
    // death signal of the VM's helpers must not fire with it.
    let session = thread::spawn(|| session(None)).join().expect("starter");
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        session.end_reason(),
        None,
        "the session ended with its thread"
    );
    let output = session.exec(&sh("echo alive")).expect("exec").output(LIMIT);
    assert_eq!(output.stdout, b"alive\n");
}

#[test]
fn an_idle_session_ends_with_that_reason() {
    let session = session(Some(Duration::from_secs(2)));
    assert_eq!(
        session.exec(&sh("sleep 3")).expect("exec").wait(),
        ExecStatus::Exited(0),
        "a running exec is not idleness"
    );
    assert_eq!(
        session.wait_end(Duration::from_secs(60)),
        Some(EndReason::IdleTimeout)
    );
}

#[test]
fn sessions_end_for_the_guests_power_off_and_their_timeout() {
    let session = session(None);
    // sysrq 'o' powers the machine off at once, as a guest program may.
    let _ = session
        .exec(&sh("echo o > /proc/sysrq-trigger; sleep 30"))
        .expect("exec")
        .wait();
    assert_eq!(
        session.wait_end(Duration::from_secs(60)),
        Some(EndReason::PoweredOff)
    );

    let mut config = Config::default_machine();
    config.timeout = Some(Duration::from_secs(20));
    let session = vmette::start_session(&config).expect("session");
    let status = session
        .exec(&ExecSpec::new(["sleep", "100"]))
        .expect("exec")
        .wait();
    assert_eq!(status, ExecStatus::SessionEnded(EndReason::SessionTimeout));
    assert_eq!(session.end_reason(), Some(EndReason::SessionTimeout));
}

#[test]
fn an_unread_exec_does_not_stall_another() {
    const TOTAL: usize = 50 * 1024 * 1024;
    const PATTERN: &[u8] = b"0123456789abcdef\n";
    let session = session(None);
    // Warm up, then measure the normal round trip.
    echo_time(&session);
    let normal = (0..3).map(|_| echo_time(&session)).max().expect("times");

    let flood = session
        .exec(&sh(&format!("yes 0123456789abcdef | head -c {TOTAL}")))
        .expect("exec");
    let started = Instant::now();
    let mut during = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        during.push(echo_time(&session));
        thread::sleep(Duration::from_millis(500));
    }
    let worst = during.iter().max().copied().expect("times");
    eprintln!(
        "echo round trip: normal {normal:?}, while a 50 MB exec is unread: worst {worst:?} of {}",
        during.len()
    );
    assert!(
        worst <= normal * 2 + Duration::from_millis(250),
        "an unread exec delayed another: {worst:?} against {normal:?} normally"
    );

    let mut received = 0usize;
    let status = loop {
        match flood.next_event() {
            Some(ExecEvent::Stdout(data)) => {
                for (i, byte) in data.iter().enumerate() {
                    let at = received + i;
                    assert_eq!(*byte, PATTERN[at % PATTERN.len()], "byte {at} is wrong");
                }
                received += data.len();
            }
            Some(ExecEvent::Stderr(data)) => panic!("stderr: {}", String::from_utf8_lossy(&data)),
            Some(ExecEvent::Exit(status)) => break status,
            None => panic!("no exit"),
        }
    };
    assert_eq!(status, ExecStatus::Exited(0));
    assert_eq!(received, TOTAL, "the 50 MB did not arrive intact");
    assert_eq!(session.stop(), EndReason::Stopped);
}

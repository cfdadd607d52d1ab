//! The manager on real VMs: limits refuse at once and start nothing,
//! names find sessions, removal stops them, and idle sessions are evicted
//! and free their slot and memory.

use std::time::{Duration, Instant};

use vmette::{Config, EndReason, ExecSpec, ExecStatus};
use vmette_manager::{Limits, Manager, ManagerError};

fn machine(memory_mib: u32) -> Config {
    let mut config = Config::default_machine();
    config.memory_mib = memory_mib;
    config
}

#[test]
fn limits_names_removal_and_idle_eviction() {
    let manager = Manager::new(
        vmette::default_engine().expect("engine"),
        Box::new(vmette::images::Images::locate().expect("the image store")),
        Box::new(vmette::net::UserNetwork),
        Limits {
            max_sessions: 2,
            max_memory_mib: 900,
            idle_timeout: Some(Duration::from_secs(3)),
        },
    );

    // Its own idle timeout wins over the manager's short one.
    let mut long_lived = machine(512);
    long_lived.idle_timeout = Some(Duration::from_secs(600));
    let web = manager
        .create(&long_lived, Some("web"))
        .expect("create web");
    assert!(matches!(
        manager.create(&machine(128), Some("web")),
        Err(ManagerError::NameTaken(_))
    ));
    let refused = Instant::now();
    assert!(
        matches!(
            manager.create(&machine(512), None),
            Err(ManagerError::LimitReached(_))
        ),
        "512 more MiB is over the 900 MiB budget"
    );
    assert!(
        refused.elapsed() < Duration::from_secs(1),
        "a refusal starts nothing"
    );
    let small = manager.create(&machine(256), None).expect("create small");
    assert!(
        matches!(
            manager.create(&machine(128), None),
            Err(ManagerError::LimitReached(_))
        ),
        "two sessions are the most"
    );
    let status = manager.status();
    assert_eq!((status.sessions, status.memory_mib), (2, 768));

    // Found by name and by id; it runs commands.
    assert_eq!(manager.get("web").expect("by name").id, web.id);
    let by_id = manager.get(small.id.as_str()).expect("by id");
    let output = by_id
        .session
        .exec(&ExecSpec::new(["echo", "hi"]))
        .expect("exec")
        .output(1024);
    assert_eq!(output.status, ExecStatus::Exited(0));
    assert_eq!(output.stdout, b"hi\n");
    assert_eq!(manager.list().len(), 2);

    // Removal stops it and frees its name, slot and memory.
    assert_eq!(manager.remove("web").expect("remove"), EndReason::Stopped);
    assert!(matches!(manager.get("web"), Err(ManagerError::NotFound(_))));
    assert_eq!(manager.status().memory_mib, 256);
    drop(web);

    // Idle eviction: the session ends by itself, the sweep frees it.
    assert_eq!(
        small.session.wait_end(Duration::from_secs(60)),
        Some(EndReason::IdleTimeout)
    );
    let swept = manager.sweep();
    assert_eq!(swept, vec![(small.id.clone(), EndReason::IdleTimeout)]);
    let status = manager.status();
    assert_eq!((status.sessions, status.memory_mib), (0, 0));
    assert!(matches!(
        manager.remove(small.id.as_str()),
        Err(ManagerError::NotFound(_))
    ));
}

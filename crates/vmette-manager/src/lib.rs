//! The session manager: the registry of live sessions that a long-lived
//! front end keeps — `vmetted` serves it over HTTP, and `vmette-mcp` will
//! use it in-process. One implementation of ids, names, limits and idle
//! eviction, never a copy.
//!
//! [`Manager::create`] admits a session only if the limits allow it (a
//! count of sessions and a budget of guest memory, both reserved before
//! the VM boots, so concurrent creates cannot overshoot), then boots it
//! outside the registry's lock. Sessions end by themselves (their idle
//! timeout, a crash, the guest powering off); [`Manager::sweep`] takes
//! ended ones out of the registry and frees what they held.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use vmette_core::assets::Silent;
use vmette_core::{Config, EndReason, Engine, ImageProvider, NetworkProvider, Session, STOP_GRACE};

/// Default idle eviction: a session with no exec for this long ends.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Default most live sessions.
pub const DEFAULT_MAX_SESSIONS: usize = 8;

/// Longest session name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// What the manager admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most sessions alive (or booting) at once.
    pub max_sessions: usize,
    /// Most guest memory of all live sessions together, MiB.
    pub max_memory_mib: u64,
    /// Idle timeout for sessions whose config sets none; `None` keeps idle
    /// sessions until they are removed.
    pub idle_timeout: Option<Duration>,
}

impl Limits {
    /// The defaults: [`DEFAULT_MAX_SESSIONS`], half the host's memory for
    /// guests, [`DEFAULT_IDLE_TIMEOUT`].
    pub fn host_default() -> Limits {
        Limits {
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_memory_mib: host_memory_mib() / 2,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }
}

fn host_memory_mib() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on failure.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        return 4096;
    }
    (pages as u64).saturating_mul(size as u64) >> 20
}

/// A session's id: `vm-` and 16 hex digits, unique for the manager's life.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    fn fresh() -> SessionId {
        use std::io::Read;
        let mut bytes = [0u8; 8];
        // The kernel's randomness; the clock still gives distinct ids in
        // the unlikely case it cannot be read.
        let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
        if read.is_err() {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            bytes = nanos.to_le_bytes();
        }
        SessionId(format!(
            "vm-{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why the manager refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// A limit would be exceeded; nothing was started.
    #[error("{0}")]
    LimitReached(String),
    /// No live session has this id or name.
    #[error("no session is called {0}")]
    NotFound(String),
    /// Another live session has this name.
    #[error("a session called {0} already exists")]
    NameTaken(String),
    /// The name cannot be used.
    #[error("invalid session name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The session could not be started.
    #[error(transparent)]
    Session(#[from] vmette_core::Error),
}

/// One live session and what the manager knows of it.
pub struct Managed {
    /// Its id.
    pub id: SessionId,
    /// Its name, if it was given one.
    pub name: Option<String>,
    /// When it was created.
    pub created: SystemTime,
    /// Its guest memory, MiB.
    pub memory_mib: u32,
    /// Its virtual CPUs.
    pub vcpus: u8,
    /// Whether its guest has a network device.
    pub networked: bool,
    /// The session itself.
    pub session: Session,
}

/// What [`Manager::status`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Live sessions (booting ones included).
    pub sessions: usize,
    /// Guest memory they hold, MiB.
    pub memory_mib: u64,
    /// The limits in force.
    pub limits: Limits,
}

/// The registry of live sessions.
pub struct Manager {
    engine: Box<dyn Engine>,
    images: Box<dyn ImageProvider>,
    network: Box<dyn NetworkProvider>,
    limits: Limits,
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    live: HashMap<SessionId, Arc<Managed>>,
    /// Names of live and booting sessions.
    names: HashMap<String, SessionId>,
    /// Sessions admitted but still booting.
    booting: usize,
    /// Memory of live and booting sessions, MiB.
    memory_mib: u64,
}

impl Registry {
    /// The id a key names: a live or booting session's name, else the key
    /// itself taken as an id.
    fn id_of(&self, key: &str) -> SessionId {
        self.names
            .get(key)
            .cloned()
            .unwrap_or_else(|| SessionId(key.into()))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn check_name(name: &str) -> Result<(), ManagerError> {
    let invalid = |reason| {
        Err(ManagerError::InvalidName {
            name: name.into(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return invalid("it must be 1 to 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || !name.as_bytes()[0].is_ascii_alphanumeric()
    {
        return invalid("use letters, digits, '-', '_' and '.', starting with a letter or digit");
    }
    if name.starts_with("vm-") {
        return invalid("names starting with vm- are kept for ids");
    }
    Ok(())
}

impl Manager {
    /// A manager that starts sessions on `engine` within `limits`, with
    /// named images resolved by `images` and networks from `network`.
    pub fn new(
        engine: Box<dyn Engine>,
        images: Box<dyn ImageProvider>,
        network: Box<dyn NetworkProvider>,
        limits: Limits,
    ) -> Manager {
        Manager {
            engine,
            images,
            network,
            limits,
            registry: Mutex::new(Registry::default()),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Boots a session for `config`, named `name` if given, once the limits
    /// admit it; a refusal starts nothing. A named image is resolved (and
    /// pulled, if need be) first.
    pub fn create(
        &self,
        config: &Config,
        name: Option<&str>,
    ) -> Result<Arc<Managed>, ManagerError> {
        if let Some(name) = name {
            check_name(name)?;
        }
        let mut config = config.resolve_image(&*self.images, &Silent)?;
        config.validate_machine()?;
        if config.idle_timeout.is_none() {
            config.idle_timeout = self.limits.idle_timeout;
        }
        let memory = u64::from(config.memory_mib);
        let id = SessionId::fresh();
        {
            let mut registry = lock(&self.registry);
            let count = registry.live.len() + registry.booting;
            if count >= self.limits.max_sessions {
                return Err(ManagerError::LimitReached(format!(
                    "{count} sessions are running, the most this daemon allows; stop one first or raise the limit"
                )));
            }
            if registry.memory_mib + memory > self.limits.max_memory_mib {
                return Err(ManagerError::LimitReached(format!(
                    "a {memory} MiB session would take guest memory past the {} MiB budget ({} MiB in use); stop a session, ask for less memory, or raise the budget",
                    self.limits.max_memory_mib, registry.memory_mib
                )));
            }
            if let Some(name) = name {
                if registry.names.contains_key(name) {
                    return Err(ManagerError::NameTaken(name.into()));
                }
                registry.names.insert(name.into(), id.clone());
            }
            registry.booting += 1;
            registry.memory_mib += memory;
        }

        // Booting takes seconds: outside the lock, with the slot reserved.
        let started = Session::start_with(&*self.engine, Some(&*self.network), &config, &Silent);
        let mut registry = lock(&self.registry);
        registry.booting -= 1;
        match started {
            Ok(session) => {
                let managed = Arc::new(Managed {
                    id: id.clone(),
                    name: name.map(Into::into),
                    created: SystemTime::now(),
                    memory_mib: config.memory_mib,
                    vcpus: config.vcpus,
                    networked: config.nat().is_some(),
                    session,
                });
                registry.live.insert(id, Arc::clone(&managed));
                Ok(managed)
            }
            Err(error) => {
                registry.memory_mib -= memory;
                if let Some(name) = name {
                    registry.names.remove(name);
                }
                Err(error.into())
            }
        }
    }

    /// The live session with this id or name.
    pub fn get(&self, key: &str) -> Result<Arc<Managed>, ManagerError> {
        let registry = lock(&self.registry);
        let id = registry.id_of(key);
        registry
            .live
            .get(&id)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(key.into()))
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<Arc<Managed>> {
        let mut all: Vec<_> = lock(&self.registry).live.values().cloned().collect();
        all.sort_by_key(|m| m.created);
        all
    }

    /// Stops the session with this id or name and takes it out of the
    /// registry; returns why it ended (`Stopped` unless it had already
    /// ended otherwise).
    pub fn remove(&self, key: &str) -> Result<EndReason, ManagerError> {
        let managed = {
            let mut registry = lock(&self.registry);
            let managed = self.take(&mut registry, key)?;
            registry.memory_mib -= u64::from(managed.memory_mib);
            managed
        };
        managed.session.stop_handle().stop();
        Ok(managed
            .session
            .wait_end(STOP_GRACE + Duration::from_secs(5))
            .unwrap_or(EndReason::Stopped))
    }

    fn take(&self, registry: &mut Registry, key: &str) -> Result<Arc<Managed>, ManagerError> {
        let id = registry.id_of(key);
        let managed = registry
            .live
            .remove(&id)
            .ok_or_else(|| ManagerError::NotFound(key.into()))?;
        if let Some(name) = &managed.name {
            registry.names.remove(name);
        }
        Ok(managed)
    }

    /// Takes every session that has ended (idle timeout, crash, power-off)
    /// out of the registry, freeing its slot and memory; returns them with
    /// their reasons.
    pub fn sweep(&self) -> Vec<(SessionId, EndReason)> {
        let mut registry = lock(&self.registry);
        let ended: Vec<(SessionId, EndReason)> = registry
            .live
            .values()
            .filter_map(|m| m.session.end_reason().map(|r| (m.id.clone(), r)))
            .collect();
        for (id, reason) in &ended {
            if let Ok(managed) = self.take(&mut registry, id.as_str()) {
                registry.memory_mib -= u64::from(managed.memory_mib);
                tracing::info!(%id, %reason, "session ended");
            }
        }
        ended
    }

    /// Counts and limits.
    pub fn status(&self) -> Status {
        let registry = lock(&self.registry);
        Status {
            sessions: registry.live.len() + registry.booting,
            memory_mib: registry.memory_mib,
            limits: self.limits.clone(),
        }
    }

    /// Stops every live session, as at the daemon's shutdown.
    pub fn stop_all(&self) {
        let all: Vec<_> = {
            let mut registry = lock(&self.registry);
            registry.names.clear();
            registry.memory_mib = 0;
            registry.live.drain().map(|(_, m)| m).collect()
        };
        for managed in &all {
            managed.session.stop_handle().stop();
        }
        for managed in &all {
            managed
                .session
                .wait_end(STOP_GRACE + Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_shaped() {
        let a = SessionId::fresh();
        let b = SessionId::fresh();
        assert_ne!(a, b);
        assert!(
            a.as_str().starts_with("vm-") && a.as_str().len() == 19,
            "{a}"
        );
    }

    #[test]
    fn names_are_plain_and_never_look_like_ids() {
        for good in ["web", "a.b-c_1", "9lives"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".hidden",
            "a b",
            "a/b",
            "vm-0123",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}

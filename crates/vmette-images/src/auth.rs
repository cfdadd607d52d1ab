//! Registry credentials: from the environment (`VMETTE_REGISTRY_HOST`,
//! `VMETTE_REGISTRY_USERNAME`, `VMETTE_REGISTRY_PASSWORD`, for that one
//! registry only), else from Docker's `config.json` (`$DOCKER_CONFIG`, else
//! `~/.docker/config.json`; the `auth` field or `username` and
//! `password`). Credential helpers are not run. A password never reaches a
//! log, an error or `Debug` output.

use std::path::PathBuf;

use base64::Engine as _;

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token; never shown.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Most bytes of a Docker config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The credentials for `registry` (`host[:port]`, `docker.io` for Docker
/// Hub), if any are configured.
pub fn for_registry(registry: &str) -> Option<Credentials> {
    from_env(registry, |name| std::env::var(name).ok()).or_else(|| {
        let path = docker_config_path()?;
        let text = read_bounded(&path)?;
        from_docker_config(&text, registry)
    })
}

fn from_env(registry: &str, var: impl Fn(&str) -> Option<String>) -> Option<Credentials> {
    let host = var("VMETTE_REGISTRY_HOST")?;
    if !same_registry(&host, registry) {
        return None;
    }
    Some(Credentials {
        username: var("VMETTE_REGISTRY_USERNAME")?,
        password: var("VMETTE_REGISTRY_PASSWORD")?,
    })
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".docker").join("config.json"))
}

fn read_bounded(path: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES).read_to_string(&mut text).ok()?;
    Some(text)
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::HashMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn from_docker_config(text: &str, registry: &str) -> Option<Credentials> {
    let config: DockerConfig = serde_json::from_str(text).ok()?;
    let entry = config
        .auths
        .iter()
        .find(|(key, _)| same_registry(key, registry))
        .map(|(_, entry)| entry)?;
    if let Some(encoded) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (username, password) = text.split_once(':')?;
        return Some(Credentials {
            username: username.into(),
            password: password.into(),
        });
    }
    Some(Credentials {
        username: entry.username.clone()?,
        password: entry.password.clone()?,
    })
}

/// Whether a config key (`https://index.docker.io/v1/`, `host:port`, …)
/// names `registry`.
fn same_registry(key: &str, registry: &str) -> bool {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("");
    let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    host == registry || (hub(host) && hub(registry))
}

/// `text` with every occurrence of the password (and its Basic encoding)
/// replaced, for messages that quote a server or a library.
pub fn redact(text: &str, credentials: Option<&Credentials>) -> String {
    let Some(c) = credentials else {
        return text.to_string();
    };
    let mut out = text.to_string();
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
    for secret in [basic.as_str(), c.password.as_str()] {
        if !secret.is_empty() {
            out = out.replace(secret, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_entries_match_by_registry() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let text = format!(
            r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},
            "https://index.docker.io/v1/":{{"username":"bob","password":"pw"}}}}}}"#
        );
        let local = from_docker_config(&text, "127.0.0.1:5000").expect("an entry");
        assert_eq!(
            (local.username.as_str(), local.password.as_str()),
            ("alice", "s3cret")
        );
        let hub = from_docker_config(&text, "docker.io").expect("the hub entry");
        assert_eq!(hub.username, "bob");
        assert_eq!(from_docker_config(&text, "ghcr.io"), None);
    }

    #[test]
    fn environment_credentials_are_for_their_registry_only() {
        let vars = |name: &str| {
            Some(match name {
                "VMETTE_REGISTRY_HOST" => "reg.example.com".to_string(),
                "VMETTE_REGISTRY_USERNAME" => "u".to_string(),
                _ => "p".to_string(),
            })
        };
        assert!(from_env("reg.example.com", vars).is_some());
        assert!(from_env("docker.io", vars).is_none());
    }

    #[test]
    fn passwords_never_show() {
        let c = Credentials {
            username: "alice".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:hunter2");
        let text = format!("server said: bad password hunter2 in Basic {basic}");
        let redacted = redact(&text, Some(&c));
        assert!(
            !redacted.contains("hunter2") && !redacted.contains(&basic),
            "{redacted}"
        );
    }
}

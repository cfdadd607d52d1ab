//! Image names as Docker reads them: `python:3.12` is
//! `docker.io/library/python:3.12`, a missing tag is `latest`, and the
//! first component is a registry only if it has a `.` or a `:`, or is
//! `localhost`.

use oci_client::Reference;

use crate::ImageError;

/// A parsed, normalised registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    reference: Reference,
}

impl ImageName {
    /// Parses `text` the way `docker pull` does.
    pub fn parse(text: &str) -> Result<ImageName, ImageError> {
        let bad = |reason: &str| ImageError::BadReference {
            reference: text.to_string(),
            reason: reason.to_string(),
        };
        if text.is_empty() || text.len() > 512 {
            return Err(bad("it must be 1 to 512 characters"));
        }
        if text != text.trim() || text.chars().any(|c| c.is_control()) {
            return Err(bad("it has spaces or control characters"));
        }
        let reference: Reference = text
            .parse()
            .map_err(|e: oci_client::ParseError| bad(&e.to_string()))?;
        if reference
            .repository()
            .chars()
            .any(|c| c.is_ascii_uppercase())
        {
            return Err(bad("repository names must be lowercase"));
        }
        Ok(ImageName { reference })
    }

    /// The full name, registry and tag included (and digest, if given).
    pub fn canonical(&self) -> String {
        self.reference.whole()
    }

    /// The registry's host and port as written (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        self.reference.registry()
    }

    /// The repository in the registry (`library/python`).
    pub fn repository(&self) -> &str {
        self.reference.repository()
    }

    /// Whether the registry is on this machine, where plain HTTP is allowed.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(host_of(self.registry()))
    }

    pub(crate) fn reference(&self) -> &Reference {
        &self.reference
    }
}

/// Whether `host` (a name, or an address without brackets) is this
/// machine: `localhost` or a loopback address.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host part of `host[:port]`, brackets of an IPv6 literal removed.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.rsplit_once(':').map_or(registry, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> String {
        ImageName::parse(text)
            .expect("a valid reference")
            .canonical()
    }

    #[test]
    fn names_are_normalised_as_docker_does() {
        assert_eq!(canonical("python:3.12"), "docker.io/library/python:3.12");
        assert_eq!(canonical("ubuntu"), "docker.io/library/ubuntu:latest");
        assert_eq!(canonical("team/tool"), "docker.io/team/tool:latest");
        assert_eq!(canonical("ghcr.io/o/r:v1"), "ghcr.io/o/r:v1");
        assert_eq!(canonical("localhost/x"), "localhost/x:latest");
        assert_eq!(
            canonical("127.0.0.1:5000/test/img:tag"),
            "127.0.0.1:5000/test/img:tag"
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            canonical(&format!("alpine@{digest}")),
            format!("docker.io/library/alpine@{digest}")
        );
    }

    #[test]
    fn bad_references_are_refused() {
        for bad in [
            ":::bad",
            "",
            "UPPER/case",
            "a b",
            "x@sha256:short",
            "tab\tname",
        ] {
            assert!(ImageName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_this_machine_is_loopback() {
        for (text, loopback) in [
            ("127.0.0.1:5000/a", true),
            ("localhost:5000/a", true),
            ("127.1.2.3:80/a", true),
            ("10.0.0.1:5000/a", false),
            ("python", false),
            ("localhost.example.com/a", false),
        ] {
            assert_eq!(
                ImageName::parse(text).expect("valid").is_loopback(),
                loopback,
                "{text}"
            );
        }
    }
}

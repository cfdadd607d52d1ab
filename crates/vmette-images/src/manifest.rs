//! The JSON documents of an image — manifests, indexes and the config —
//! read into the few fields vmette uses, with their limits checked.
//! Docker's v2 schema 2 types and the OCI types have the same shape.

use serde::Deserialize;

/// Most bytes of a manifest or index.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Most bytes of an image config.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;
/// Most layers of one image (Docker's own limit is 127).
pub const MAX_LAYERS: usize = 128;
/// Most entries of an index.
const MAX_INDEX_ENTRIES: usize = 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What a manifest request accepts, indexes included.
pub const ACCEPTED: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Layer media types vmette unpacks (any compression is sniffed again
/// from the bytes).
const LAYER_TYPES: [&str; 5] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// A content descriptor: what a blob is, how big, and its digest.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// The platform an index entry is for.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// A manifest or an index: which one is told by its fields, since Docker
/// omits `mediaType` in some documents.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// A single-platform manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What a manifest request returned.
#[derive(Debug)]
pub enum Fetched {
    Image(Manifest),
    Index(Vec<Descriptor>),
}

/// Parses a manifest or index, checking sizes, counts and digests' shape.
pub fn parse(bytes: &[u8]) -> Result<Fetched, String> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(format!(
            "its manifest is {} bytes, over the limit of {MAX_MANIFEST_BYTES}",
            bytes.len()
        ));
    }
    let document: Document =
        serde_json::from_slice(bytes).map_err(|e| format!("its manifest is not valid: {e}"))?;
    if document.schema_version != 2 {
        return Err(format!(
            "its manifest has schema version {}, and only 2 is supported",
            document.schema_version
        ));
    }
    let media_type = document.media_type.as_deref().unwrap_or("");
    if let Some(entries) = document.manifests {
        if !matches!(media_type, "" | OCI_INDEX | DOCKER_LIST) {
            return Err(format!("its index has the unknown media type {media_type}"));
        }
        if entries.len() > MAX_INDEX_ENTRIES {
            return Err("its index has too many entries".into());
        }
        for entry in &entries {
            check_digest(&entry.digest)?;
        }
        return Ok(Fetched::Index(entries));
    }
    if !matches!(media_type, "" | OCI_MANIFEST | DOCKER_MANIFEST) {
        return Err(format!(
            "its manifest has the unsupported media type {media_type}"
        ));
    }
    let (Some(config), Some(layers)) = (document.config, document.layers) else {
        return Err("its manifest has no config or no layers".into());
    };
    if layers.is_empty() || layers.len() > MAX_LAYERS {
        return Err(format!(
            "it has {} layers; 1 to {MAX_LAYERS} are supported",
            layers.len()
        ));
    }
    check_digest(&config.digest)?;
    if config.size > MAX_CONFIG_BYTES {
        return Err(format!(
            "its config is {} bytes, over the limit of {MAX_CONFIG_BYTES}",
            config.size
        ));
    }
    for layer in &layers {
        check_digest(&layer.digest)?;
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            return Err(format!(
                "it has a layer of the unsupported type {:?}",
                layer.media_type
            ));
        }
    }
    Ok(Fetched::Image(Manifest { config, layers }))
}

/// Only sha256 digests, written in full lowercase hex.
pub fn check_digest(digest: &str) -> Result<(), String> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "it names a blob by the unsupported digest {:?}",
            truncate(digest)
        )),
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

/// The platform vmette runs guests of: Linux on the host's architecture.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The index entry for Linux on `architecture`; for arm64, the `v8`
/// variant (or none) before any other.
pub fn choose<'a>(entries: &'a [Descriptor], architecture: &str) -> Option<&'a Descriptor> {
    let matching = |e: &&Descriptor| {
        e.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == architecture)
            && matches!(e.media_type.as_str(), "" | OCI_MANIFEST | DOCKER_MANIFEST)
    };
    let preferred = |e: &&Descriptor| {
        let variant = e.platform.as_ref().and_then(|p| p.variant.as_deref());
        architecture != "arm64" || matches!(variant, None | Some("v8"))
    };
    entries
        .iter()
        .filter(matching)
        .find(preferred)
        .or_else(|| entries.iter().find(matching))
}

/// The runtime part of an image config.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct ConfigFile {
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Parses a config blob into what runs take from it.
pub fn parse_config(bytes: &[u8]) -> Result<ConfigFile, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("its config is not valid: {e}"))
}

impl ConfigFile {
    /// The config in the core's terms; `Env` entries without `=` are
    /// dropped, as Docker ignores them.
    pub fn image_config(&self) -> vmette_core::ImageConfig {
        let run = self.config.clone().unwrap_or_default();
        vmette_core::ImageConfig {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run
                .env
                .unwrap_or_default()
                .iter()
                .filter_map(|e| e.split_once('='))
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            workdir: run.working_dir.filter(|d| d.starts_with('/')),
            user: run.user.filter(|u| !u.is_empty()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: &str, variant: Option<&str>, n: char) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", n.to_string().repeat(64)),
            size: 100,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(String::from),
            }),
        }
    }

    #[test]
    fn an_index_resolves_to_the_hosts_platform() {
        let entries = vec![
            entry("unknown", None, '0'),
            entry("arm", Some("v7"), '1'),
            entry("arm64", Some("v9"), '2'),
            entry("arm64", Some("v8"), '3'),
            entry("amd64", None, '4'),
        ];
        assert_eq!(
            choose(&entries, "amd64").map(|e| &e.digest),
            Some(&entries[4].digest)
        );
        assert_eq!(
            choose(&entries, "arm64").map(|e| &e.digest),
            Some(&entries[3].digest)
        );
        assert_eq!(
            choose(&entries[..3], "arm64").map(|e| &e.digest),
            Some(&entries[2].digest)
        );
        assert_eq!(choose(&entries[..2], "amd64"), None);
    }

    #[test]
    fn manifests_are_bounded_and_checked() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let good = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"x","digest":"{digest}","size":10}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{digest}","size":5}}]}}"#
        );
        assert!(matches!(parse(good.as_bytes()), Ok(Fetched::Image(_))));
        let bad_digest = good.replace(&digest, "md5:abc");
        assert!(parse(bad_digest.as_bytes()).is_err());
        let foreign = good.replace("rootfs.diff.tar.gzip", "rootfs.foreign.diff.tar.gzip");
        assert!(parse(foreign.as_bytes()).is_err());
        let huge_config = good.replace("\"size\":10", "\"size\":999999999999");
        assert!(parse(huge_config.as_bytes())
            .expect_err("refused")
            .contains("config"));
        let mut padded = good.into_bytes();
        padded.resize(MAX_MANIFEST_BYTES + 1, b' ');
        assert!(parse(&padded)
            .expect_err("refused")
            .contains("over the limit"));
        assert!(parse(br#"{"schemaVersion":1}"#).is_err());
    }

    #[test]
    fn config_fields_follow_docker() {
        let config = parse_config(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","BAD","A=b=c"],
            "WorkingDir":"/app","User":"app","Entrypoint":["/e"],"Cmd":["c"]}}"#,
        )
        .expect("a valid config")
        .image_config();
        assert_eq!(
            config.env,
            vec![("PATH".into(), "/bin".into()), ("A".into(), "b=c".into())]
        );
        assert_eq!(config.workdir.as_deref(), Some("/app"));
        assert_eq!(config.entrypoint, vec!["/e"]);
        assert_eq!(config.cmd, vec!["c"]);
    }
}

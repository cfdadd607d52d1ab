//! Pulling an image from a registry with `oci-client`: the manifest (an
//! index resolved to this host's platform), the config and the layers,
//! each checked against its digest and size as it streams into the store.

use std::io::Write;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use sha2::{Digest, Sha256};

use crate::arrivals::Arrivals;
use crate::auth::{self, Credentials};
use crate::manifest::{self, Descriptor, Fetched, Manifest};
use crate::{ImageError, ImageName, PullProgress, Store};

/// Longest wait to connect, and for any read to make progress: a registry
/// that accepts a connection and then says nothing is given up on.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Layers downloaded at once.
const PARALLEL_DOWNLOADS: usize = 3;

/// A server's or library's words for a message: control characters
/// escaped, at most 200 characters, so that it stays one line.
pub(crate) fn quoted(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// What a pull fetched: the manifest and where its parts are stored.
pub struct Pulled {
    pub manifest_digest: String,
    pub manifest: Manifest,
    pub config: manifest::ConfigFile,
}

/// How to reach registries, and how much to take from them.
pub struct Access<'a> {
    pub insecure: &'a [String],
    /// Most bytes of all layers together, as their manifest declares them;
    /// checked before a byte of them is fetched.
    pub layer_limit: u64,
}

/// Longest a manifest or token request may take in all, however the
/// bytes trickle in.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);
/// After this long, a blob must have come at `MIN_RATE` on average.
pub(crate) const RATE_GRACE: Duration = Duration::from_secs(30);
/// Slowest average a blob download may keep, bytes per second.
pub(crate) const MIN_RATE: u64 = 32 << 10;

/// Pulls `name` into `store`; blobs already there are not fetched again.
///
/// `arrivals` hears of the layers, and of each as it is stored (top ones
/// first), so that packing can begin before the pull ends. Layers are not
/// fetched at all when the root they make is already stored.
pub fn pull(
    store: &Store,
    name: &ImageName,
    access: &Access<'_>,
    progress: &dyn PullProgress,
    arrivals: &Arrivals,
) -> Result<Pulled, ImageError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ImageError::store("cannot start the pull's runtime"))?;
    // The registry client panics on some malformed answers (a bearer token
    // that is not a valid header value); that is the registry's fault, and
    // one refusal, not a crash.
    let pulled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(pull_async(store, name, access, progress, arrivals))
    }));
    pulled.unwrap_or_else(|_| {
        Err(ImageError::Refused {
            reference: name.canonical(),
            reason: "the registry's answer broke the registry client".into(),
        })
    })
}

/// `future`, given up on after `REQUEST_DEADLINE`.
async fn within_deadline<T>(
    session: &Session<'_>,
    future: impl std::future::Future<Output = Result<T, OciDistributionError>>,
) -> Result<T, ImageError> {
    match tokio::time::timeout(REQUEST_DEADLINE, future).await {
        Ok(result) => result.map_err(|e| session.error(e)),
        Err(_) => Err(ImageError::Unreachable {
            reference: session.name.canonical(),
            registry: session.name.registry().to_string(),
            reason: format!("it did not answer within {} s", REQUEST_DEADLINE.as_secs()),
        }),
    }
}

struct Session<'a> {
    client: Client,
    name: &'a ImageName,
    credentials: Option<Credentials>,
}

impl Session<'_> {
    /// An `oci-client` failure as one of ours, credentials removed.
    fn error(&self, error: OciDistributionError) -> ImageError {
        let reference = self.name.canonical();
        let registry = self.name.registry().to_string();
        let text = quoted(&auth::redact(&error.to_string(), self.credentials.as_ref()));
        match &error {
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => ImageError::Auth {
                reference,
                registry,
            },
            OciDistributionError::ServerError { code: 401, .. } => ImageError::Auth {
                reference,
                registry,
            },
            OciDistributionError::ImageManifestNotFoundError(_)
            | OciDistributionError::ServerError { code: 404, .. } => {
                ImageError::NotFound { reference }
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                use oci_client::errors::OciErrorCode as Code;
                let codes: Vec<&Code> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, Code::Unauthorized | Code::Denied))
                {
                    ImageError::Auth {
                        reference,
                        registry,
                    }
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        Code::ManifestUnknown | Code::NameUnknown | Code::NotFound
                    )
                }) {
                    ImageError::NotFound { reference }
                } else {
                    // The codes only: a registry's own words may echo what
                    // it was sent, credentials included, in any encoding.
                    let codes: Vec<String> = codes
                        .iter()
                        .take(4)
                        .map(|c| quoted(&format!("{c:?}")))
                        .collect();
                    ImageError::Refused {
                        reference,
                        reason: format!("the registry refused it ({})", codes.join(", ")),
                    }
                }
            }
            OciDistributionError::ServerError { code, .. } => ImageError::Refused {
                reference,
                reason: format!("the registry answered with HTTP status {code}"),
            },
            OciDistributionError::RequestError(e) => ImageError::Unreachable {
                reference,
                registry,
                reason: if e.is_timeout() {
                    format!("no answer within {} s", STALL_TIMEOUT.as_secs())
                } else if e.is_connect() {
                    "the connection failed (is the registry running, and is the name right?)".into()
                } else {
                    text
                },
            },
            _ => ImageError::Refused {
                reference,
                reason: text,
            },
        }
    }

    fn refused(&self, reason: impl Into<String>) -> ImageError {
        ImageError::Refused {
            reference: self.name.canonical(),
            reason: reason.into(),
        }
    }

    fn auth(&self) -> RegistryAuth {
        match &self.credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

async fn pull_async(
    store: &Store,
    name: &ImageName,
    access: &Access<'_>,
    progress: &dyn PullProgress,
    arrivals: &Arrivals,
) -> Result<Pulled, ImageError> {
    // rustls needs a process-wide provider; another caller may have set one.
    #[cfg(not(target_os = "macos"))]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = name.registry().to_string();
    let plain_http = name.is_loopback() || access.insecure.contains(&registry);
    let config = ClientConfig {
        protocol: if plain_http {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(STALL_TIMEOUT),
        read_timeout: Some(STALL_TIMEOUT),
        platform_resolver: None,
        max_concurrent_download: PARALLEL_DOWNLOADS,
        user_agent: concat!("vmette/", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    };
    let session = Session {
        client: Client::new(config),
        name,
        credentials: auth::for_registry(&registry),
    };
    let auth = session.auth();
    let reference = name.reference();
    let (bytes, mut digest) = within_deadline(
        &session,
        session
            .client
            .pull_manifest_raw(reference, &auth, &manifest::ACCEPTED),
    )
    .await?;
    let mut fetched = manifest::parse(&bytes).map_err(|e| session.refused(e))?;
    if let Fetched::Index(entries) = &fetched {
        let architecture = manifest::host_architecture();
        let entry = manifest::choose(entries, architecture)
            .ok_or_else(|| session.refused(format!("it has no linux/{architecture} image")))?
            .clone();
        let by_digest = reference.clone_with_digest(entry.digest.clone());
        let (bytes, _) = within_deadline(
            &session,
            session
                .client
                .pull_manifest_raw(&by_digest, &auth, &manifest::ACCEPTED),
        )
        .await?;
        if bytes.len() as u64 != entry.size {
            return Err(session.refused(format!(
                "its index says the manifest has {} bytes, and it has {}",
                entry.size,
                bytes.len()
            )));
        }
        fetched = manifest::parse(&bytes).map_err(|e| session.refused(e))?;
        digest = entry.digest;
    }
    let Fetched::Image(manifest) = fetched else {
        return Err(session.refused("its index points to another index"));
    };

    let declared = manifest
        .layers
        .iter()
        .try_fold(0u64, |sum, layer| sum.checked_add(layer.size));
    if declared.is_none_or(|total| total > access.layer_limit) {
        return Err(session.refused(format!(
            "its layers are declared larger than the limit of {} bytes",
            access.layer_limit
        )));
    }
    fetch_blob(&session, store, &manifest.config, progress, false).await?;
    let config_bytes = std::fs::read(store.blob_path(&manifest.config.digest))
        .map_err(ImageError::store("cannot read a stored config"))?;
    let config = manifest::parse_config(&config_bytes).map_err(|e| session.refused(e))?;
    let architecture = manifest::host_architecture();
    if config.os != "linux" || config.architecture != architecture {
        return Err(session.refused(format!(
            "it is for {}/{}, and this host runs linux/{architecture}",
            config.os, config.architecture
        )));
    }
    let digests: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
    arrivals.announce(digests.clone());
    if !store.root_path(&crate::store::root_key(&digests)).is_file() {
        // Top first: the packer reads from the top down.
        futures_util::stream::iter(manifest.layers.iter().rev())
            .map(|layer| async {
                fetch_blob(&session, store, layer, progress, true).await?;
                arrivals.stored(&layer.digest);
                Ok::<(), ImageError>(())
            })
            .buffer_unordered(PARALLEL_DOWNLOADS)
            .try_collect::<Vec<()>>()
            .await?;
    }
    Ok(Pulled {
        manifest_digest: digest,
        manifest,
        config,
    })
}

/// Streams one blob into the store, hashing and counting as it comes: more
/// bytes than the descriptor says end the download at once, and a digest
/// that does not match keeps it out of the store.
async fn fetch_blob(
    session: &Session<'_>,
    store: &Store,
    descriptor: &Descriptor,
    progress: &dyn PullProgress,
    is_layer: bool,
) -> Result<(), ImageError> {
    let target = store.blob_path(&descriptor.digest);
    if target.is_file() {
        if is_layer {
            progress.layer_done(&descriptor.digest, descriptor.size, true);
        }
        return Ok(());
    }
    if is_layer {
        progress.layer_started(&descriptor.digest, descriptor.size);
    }
    let mut file = store.temp_file()?;
    let mut stream = within_deadline(
        session,
        session
            .client
            .pull_blob_stream(session.name.reference(), descriptor.digest.as_str()),
    )
    .await?;
    let started = std::time::Instant::now();
    let mut hash = Sha256::new();
    let mut received: u64 = 0;
    let what = if is_layer { "a layer" } else { "the config" };
    while let Some(chunk) = stream.stream.next().await {
        let chunk = chunk.map_err(|e| {
            let wrong_digest = e
                .get_ref()
                .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>());
            if wrong_digest {
                session.refused(format!(
                    "{what} ({}) does not match its digest",
                    descriptor.digest
                ))
            } else {
                ImageError::Unreachable {
                    reference: session.name.canonical(),
                    registry: session.name.registry().to_string(),
                    reason: format!("the download of {what} broke off: {e}"),
                }
            }
        })?;
        received += chunk.len() as u64;
        let elapsed = started.elapsed();
        if elapsed > RATE_GRACE && received < MIN_RATE.saturating_mul(elapsed.as_secs()) {
            return Err(ImageError::Unreachable {
                reference: session.name.canonical(),
                registry: session.name.registry().to_string(),
                reason: format!(
                    "{what} came slower than {} KiB/s; giving up",
                    MIN_RATE >> 10
                ),
            });
        }
        if received > descriptor.size {
            return Err(session.refused(format!(
                "{what} ({}) is longer than the {} bytes its manifest says",
                descriptor.digest, descriptor.size
            )));
        }
        hash.update(&chunk);
        file.write_all(&chunk)
            .map_err(ImageError::store("cannot write a blob to the image store"))?;
        if is_layer {
            progress.layer_advanced(&descriptor.digest, received);
        }
    }
    if received != descriptor.size {
        return Err(session.refused(format!(
            "{what} ({}) has {received} bytes, and its manifest says {}",
            descriptor.digest, descriptor.size
        )));
    }
    let actual = format!("sha256:{}", hex::encode(hash.finalize()));
    if actual != descriptor.digest {
        return Err(session.refused(format!(
            "{what} does not match its digest: expected {}, got {actual}",
            descriptor.digest
        )));
    }
    store.persist(file, &target)?;
    if is_layer {
        progress.layer_done(&descriptor.digest, descriptor.size, false);
    }
    Ok(())
}

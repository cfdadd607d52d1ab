use std::io;

/// Why an image could not be found, fetched or converted. Every message
/// is a sentence that names the reference; none carries a credential.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The text is not an image reference.
    #[error("{reference:?} is not a valid image reference: {reason}")]
    BadReference {
        /// What was given.
        reference: String,
        /// Why it does not parse.
        reason: String,
    },
    /// `--offline`, and the store does not have the image.
    #[error("the image {reference} is not in the local store, and pulling is turned off (--offline); run `vmette pull {reference}` first")]
    NotStored {
        /// The image.
        reference: String,
    },
    /// The registry refused the credentials, or asked for some.
    #[error("authentication to {registry} failed for {reference}; check the user name and password in ~/.docker/config.json or VMETTE_REGISTRY_*")]
    Auth {
        /// The image.
        reference: String,
        /// The registry.
        registry: String,
    },
    /// The registry has no such repository or tag.
    #[error("the image {reference} was not found: check its name and tag")]
    NotFound {
        /// The image.
        reference: String,
    },
    /// The registry could not be reached or did not answer in time.
    #[error("cannot reach the registry {registry} for {reference}: {reason}")]
    Unreachable {
        /// The image.
        reference: String,
        /// The registry.
        registry: String,
        /// What failed.
        reason: String,
    },
    /// The registry sent something wrong, or the image breaks a rule.
    #[error("the image {reference} is refused: {reason}")]
    Refused {
        /// The image.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A local file (a tarball, an image) is missing or unreadable.
    #[error("{path}: {reason}")]
    File {
        /// The path as given.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A preset could not be built.
    #[error("cannot build the preset {name}: {reason}")]
    Preset {
        /// The preset.
        name: String,
        /// What failed.
        reason: String,
    },
    /// A tarball could not be downloaded, or is not what was asked for.
    #[error("cannot use the tarball at {url}: {reason}")]
    Download {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The packer (`tar2sqfs`) failed or is missing.
    #[error("cannot pack the root of {reference}: {reason}")]
    Pack {
        /// The image.
        reference: String,
        /// What failed.
        reason: String,
    },
    /// The store could not be read or written.
    #[error("{context}: {source}")]
    Store {
        /// What was being done.
        context: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    pub(crate) fn store(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
        let context = context.into();
        move |source| ImageError::Store { context, source }
    }
}

use std::io;

use vmette_assets::AssetError;
use vmette_proto::FrameError;

use crate::engine::EngineError;

/// Why a run failed before the command could report an exit status.
///
/// A command that ran and failed is not an error: its status is in
/// [`crate::RunOutput`]. These are failures of vmette itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A [`crate::Config`] field is wrong; nothing was started.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The image a [`crate::Rootfs::Named`] root names could not be found
    /// or fetched; the message names the reference.
    #[error(transparent)]
    Image(Box<dyn std::error::Error + Send + Sync>),
    /// The network stack could not attach the guest or publish a port;
    /// the message names the setting.
    #[error(transparent)]
    Network(crate::NetworkError),
    /// The kernel, initramfs or root image could not be prepared.
    #[error("cannot prepare the VM's boot files")]
    Assets(#[source] AssetError),
    /// The engine could not start the VM.
    #[error("the VM could not be started")]
    StartFailed(#[source] EngineError),
    /// The guest did not come up, or could not assemble its root.
    #[error("the guest did not boot: {reason}")]
    BootFailed {
        /// What went wrong.
        reason: String,
        /// The end of the guest console, for diagnosis.
        console: String,
    },
    /// The guest agent sent something the host cannot accept.
    #[error("the guest agent broke the protocol: {0}")]
    Protocol(String),
    /// The control channel to the guest failed.
    #[error("the control channel to the guest failed")]
    Channel(#[source] FrameError),
    /// A file operation in the guest failed; the session goes on.
    #[error("{message}")]
    File {
        /// The guest path.
        path: String,
        /// What kind of failure.
        kind: vmette_proto::FileErrorKind,
        /// One sentence from the guest.
        message: String,
    },
    /// A tree copied out of the guest could not be unpacked on the host;
    /// nothing was written outside the target directory.
    #[error("cannot unpack the tree copied out of the guest")]
    Unpack(#[source] crate::tree::UnpackError),
    /// The command left its stdin unread for this long; what fitted was sent.
    #[error("the command did not read its stdin within {0:?}")]
    StdinFull(std::time::Duration),
    /// The exec has ended, so its stdin takes nothing more.
    #[error("the command has ended; its stdin takes nothing more")]
    ExecEnded,
    /// The session ended, so it can run nothing more.
    #[error("the session has ended: {0}")]
    SessionEnded(crate::EndReason),
    /// A host-side file or process operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// Whether the same request could succeed if simply tried again. Only
    /// failures of the moment (a busy host, a VM that died on start) are;
    /// a bad config or missing file is not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::InvalidConfig { .. }
            | Error::Assets(_)
            | Error::Image(_)
            | Error::Network(_)
            | Error::Protocol(_)
            | Error::SessionEnded(_)
            | Error::ExecEnded
            | Error::File { .. }
            | Error::Unpack(_) => false,
            Error::StdinFull(_) => true,
            Error::StartFailed(_)
            | Error::BootFailed { .. }
            | Error::Channel(_)
            | Error::Io { .. } => true,
        }
    }
}

impl From<vmette_proto::InvalidMessage> for Error {
    /// A request that breaks the protocol's rules is the caller's mistake:
    /// it is refused before anything is sent, naming the setting.
    fn from(error: vmette_proto::InvalidMessage) -> Error {
        Error::InvalidConfig {
            field: error.field,
            reason: error.reason.to_string(),
        }
    }
}

impl From<EngineError> for Error {
    /// An engine's [`EngineError::InvalidConfig`] is the caller's mistake
    /// and is reported as [`Error::InvalidConfig`]; every other engine error
    /// means the VM could not start.
    fn from(error: EngineError) -> Error {
        match error {
            EngineError::InvalidConfig { field, reason } => Error::InvalidConfig { field, reason },
            other => Error::StartFailed(other),
        }
    }
}

use std::io;
use std::path::PathBuf;

/// Why an asset could not be found, fetched or built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssetError {
    /// Neither `XDG_CACHE_HOME` nor `HOME` says where the cache goes.
    #[error("cannot tell where the cache goes: set XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// A host tool could not be started.
    #[error("could not run {tool}; run ./setup.sh to install it")]
    ToolMissing {
        /// The tool.
        tool: String,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },
    /// A host tool ran and failed.
    #[error("{tool} failed ({status}): {output}")]
    ToolFailed {
        /// The tool.
        tool: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of what it printed.
        output: String,
    },
    /// The kernel meta-package names no kernel image package.
    #[error("apt names no kernel package for {meta}; run `apt-get update` as root")]
    NoKernelPackage {
        /// The meta-package asked about.
        meta: String,
    },
    /// No kernel module with this name exists in the kernel's tree.
    #[error("kernel module {name} is not in {dir}")]
    ModuleMissing {
        /// The module's name.
        name: String,
        /// The tree searched.
        dir: PathBuf,
    },
    /// A kernel module's metadata could not be read.
    #[error("cannot read the metadata of kernel module {path}: {reason}")]
    ModuleMetadata {
        /// The module file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The static guest agent binary was not found.
    #[error("the vmette-guest agent was not found (looked in {searched}); run ./setup.sh or set VMETTE_GUEST_AGENT")]
    GuestAgentMissing {
        /// The places looked in, joined for display.
        searched: String,
    },
    /// A file operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

impl AssetError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> AssetError {
        let context = context.into();
        move |source| AssetError::Io { context, source }
    }
}

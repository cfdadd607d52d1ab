//! The command line, as clap sees it. Values stay strings here; `run.rs`
//! turns them into a [`vmette::Config`] with the parsers in `values.rs`, so
//! every error reads the same way.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

const RUN_EXAMPLES: &str = "\
Examples:
  vmette run -- uname -a
  vmette run --sh 'echo $HOME | wc -c'
  echo hi | vmette run -- cat
  vmette run --share ./src:/src --workdir /src -- ls -la
  vmette run --share ./out:/out:rw -- sh -c 'date > /out/stamp'
  vmette run --timeout 30s --memory 1G --scratch 2G -- make -j2
  vmette run -t -- bash

Stdin: forwarded when it is not a terminal (a pipe, a file). With -t the
terminal itself is the command's, through a PTY in the guest, in raw mode
here (Ctrl-C and Ctrl-\\ go to the guest). With -i a terminal is forwarded
without a PTY. Otherwise a terminal is not read.

Exit status: the command's own code; 128+N if it died of signal N;
124 on timeout; 125 if vmette failed before the command ran;
126/127 if the command could not be started or was not found.";

const SHELL_EXAMPLES: &str = "\
Examples:
  vmette shell
  vmette shell --share .:/work:rw --workdir /work
  vmette shell -- python3

Exits with the shell's own status.";

const EXAMPLES: &str = "\
Examples:
  vmette run -- uname -a
  vmette run --share .:/work:rw --workdir /work -- make test
  vmette doctor
  vmette cache prune --dry-run";

/// Run commands in throwaway, hardware-isolated Linux microVMs.
#[derive(Debug, Parser)]
#[command(name = "vmette", version, about, propagate_version = true, after_help = EXAMPLES)]
pub struct Cli {
    /// Print only errors from vmette itself.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Say more about what vmette does (repeat for more).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a microVM, run one command in it, and power it off.
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// An interactive shell in a throwaway microVM: `run -t` with the
    /// image's shell, or with the command given.
    #[command(after_help = SHELL_EXAMPLES)]
    Shell(Box<RunArgs>),
    /// Fetch the kernel and build the initramfs and default image now.
    #[command(after_help = "Examples:\n  vmette setup\n  vmette setup --rebuild-image")]
    Setup(SetupArgs),
    /// List or prune the cache of kernels, initramfs archives and images.
    #[command(
        subcommand,
        after_help = "Examples:\n  vmette cache list\n  vmette cache prune --dry-run"
    )]
    Cache(CacheCommand),
    /// Check what vmette needs on this host and say how to fix what is missing.
    #[command(after_help = "Examples:\n  vmette doctor\n  vmette doctor --json")]
    Doctor(JsonArgs),
    /// Print version information.
    Version(JsonArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Root file system: a host directory (shared read-only, with a
    /// throwaway overlay) or an erofs/squashfs/ext4 image.
    #[arg(long, value_name = "DIR|IMAGE")]
    pub rootfs: Option<PathBuf>,
    /// Let writes to a directory rootfs reach the host directory.
    #[arg(long)]
    pub rootfs_rw: bool,
    /// Share a host directory (read-only unless :rw). Repeatable.
    #[arg(long, value_name = "HOST_DIR:GUEST_PATH[:ro|:rw]")]
    pub share: Vec<String>,
    /// Attach a disk image as a block device (/dev/disk/by-id/virtio-vmette-diskN). Repeatable.
    #[arg(long, value_name = "IMAGE[:ro]")]
    pub disk: Vec<String>,
    /// Keep the root's writes on an ephemeral ext4 disk of this size instead of in memory.
    #[arg(long, value_name = "SIZE")]
    pub scratch: Option<String>,
    /// Set an environment variable for the command. Repeatable.
    #[arg(short, long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the command in the guest.
    #[arg(short, long, value_name = "GUEST_PATH")]
    pub workdir: Option<String>,
    /// Kill the VM after this long and exit 124.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory (MiB, or with a unit: 512M, 1G).
    #[arg(long, default_value = "512M", value_name = "SIZE")]
    pub memory: String,
    /// Kernel image instead of the cached cloud kernel.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initramfs instead of the one vmette builds.
    #[arg(long, value_name = "FILE")]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel arguments, appended to (and so overriding) vmette's own.
    #[arg(long, value_name = "ARGS")]
    pub cmdline: Option<String>,
    /// Accelerator: auto picks KVM only where it really works.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Give the command a terminal: a PTY in the guest, this terminal in
    /// raw mode.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Forward stdin even when it is a terminal (without -t: no PTY).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run this line with /bin/sh -c instead of a command.
    #[arg(long, value_name = "LINE", conflicts_with = "command")]
    pub sh: Option<String>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Build the default image again even if it exists.
    #[arg(long)]
    pub rebuild_image: bool,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Show every entry of the cache with its size.
    List(JsonArgs),
    /// Remove old kernels, stale initramfs archives and unfinished work.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Say what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON for programs instead of text for people.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JsonArgs {
    /// Print JSON for programs instead of text for people.
    #[arg(long)]
    pub json: bool,
}

//! The command line, as clap sees it. Values stay strings here; `run.rs`
//! turns them into a [`vmette::Config`] with the parsers in `values.rs`, so
//! every error reads the same way.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

const RUN_EXAMPLES: &str = "\
Examples:
  vmette run -- uname -a
  vmette run python -- python3 -c 'print(6*7)'
  vmette run python:3.12-slim -- python3 -c 'print(6*7)'
  vmette run --sha256 9f86d0… https://example.com/root.tar.gz -- ls /
  vmette run --entrypoint /bin/sh node:22 -- -c 'node --version'
  vmette run ./rootfs.tar.zst -- ls /
  vmette run --sh 'echo $HOME | wc -c'
  echo hi | vmette run -- cat
  vmette run --share ./src:/src --workdir /src -- ls -la
  vmette run --share ./out:/out:rw -- sh -c 'date > /out/stamp'
  vmette run --timeout 30s --memory 1G --scratch 2G -- make -j2
  vmette run -t -- bash
  vmette run --net toolbox -- curl -sI https://example.com
  vmette run -p 8000:8000 python -- python3 -m http.server 8000

Stdin: forwarded when it is not a terminal (a pipe, a file). With -t the
terminal itself is the command's, through a PTY in the guest, in raw mode
here (Ctrl-C and Ctrl-\\ go to the guest). With -i a terminal is forwarded
without a PTY. Otherwise a terminal is not read.

The image comes first, as with docker run, and the command after --:
`vmette run uname -a` means the image `uname`. A path (./, ../, /, ~/) is a
directory, a tarball or a file-system image, and an http(s) URL a tarball.
A bare preset name is a preset, built from Debian packages at first use:
debian (the default image), python, node, toolbox. Any other word is looked
up in the local store, then pulled from its registry (python:3.12 is
docker.io/library/python:3.12, not the preset).

Exit status: the command's own code; 128+N if it died of signal N;
124 on timeout; 125 if vmette failed before the command ran;
126/127 if the command could not be started or was not found.";

const SHELL_EXAMPLES: &str = "\
Examples:
  vmette shell
  vmette shell --share .:/work:rw --workdir /work
  vmette shell -- python3
  vmette shell python:3.12-slim

Exits with the shell's own status.";

const CREATE_EXAMPLES: &str = "\
Examples:
  vmette create --name work
  vmette create --name py python:3.12-slim
  id=$(vmette create --memory 1G | tail -n 1)
  vmette create --name ci --timeout 1h --idle-timeout 10m
  vmette create --name web --net -p 0:8000 python

The sandbox lives until `vmette stop`, its --timeout, or --idle-timeout
with no exec (the daemon's default is 30 minutes).";

const PORT_EXAMPLES: &str = "\
Examples:
  vmette port web add 0:8001
  vmette port web add 127.0.0.1:9000:9000 --json
  vmette port web ls
  vmette port web rm 9000";

const EXEC_EXAMPLES: &str = "\
Examples:
  vmette exec work -- uname -a
  vmette exec -e KEY=value -w /tmp work -- sh -c 'echo $KEY > f'
  echo hi | vmette exec work -- cat
  vmette exec -it work -- bash

Stdin follows the rule of `vmette run`: forwarded when it is not a
terminal; the terminal itself with -t (a PTY in the guest, raw mode here);
a terminal without a PTY with -i. Exits with the command's own status.";

const CP_EXAMPLES: &str = "\
Examples:
  vmette cp ./report.pdf work:/tmp/report.pdf
  vmette cp ./src work:/src          # a directory's contents into /src
  vmette cp work:/var/log/app.log .
  vmette cp work:/out ./out          # a guest directory into ./out

A guest side is ID:/PATH (an absolute path). A file copied to an existing
directory lands in it under its own name.";

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
    /// Start a sandbox that stays up, served by the vmetted daemon
    /// (started on demand); prints its id.
    #[command(after_help = CREATE_EXAMPLES)]
    Create(Box<CreateArgs>),
    /// Run a command in a sandbox made by `vmette create`.
    #[command(after_help = EXEC_EXAMPLES)]
    Exec(ExecArgs),
    /// Publish, close and list a sandbox's guest ports on the host while it
    /// runs (the sandbox needs a network: --net, -p or --allow-host-port
    /// at `vmette create`).
    #[command(after_help = PORT_EXAMPLES)]
    Port(PortArgs),
    /// Copy files or directories between the host and a sandbox.
    #[command(after_help = CP_EXAMPLES)]
    Cp(CpArgs),
    /// List the daemon's sandboxes.
    #[command(after_help = "Examples:\n  vmette ps\n  vmette ps --json")]
    Ps(JsonArgs),
    /// Stop sandboxes (their guests power off cleanly).
    #[command(
        after_help = "Examples:\n  vmette stop work\n  vmette stop vm-0123456789abcdef other"
    )]
    Stop(StopArgs),
    /// The vmetted daemon: its status, or stop it (with all its sandboxes).
    #[command(
        subcommand,
        after_help = "Examples:\n  vmette daemon status --json\n  vmette daemon stop"
    )]
    Daemon(DaemonCommand),
    /// Pull an image from its registry into the local store.
    #[command(
        after_help = "Examples:\n  vmette pull python:3.12-slim\n  vmette pull 127.0.0.1:5000/team/tool:v2\n\nCredentials come from ~/.docker/config.json ($DOCKER_CONFIG), or from\nVMETTE_REGISTRY_HOST, VMETTE_REGISTRY_USERNAME and VMETTE_REGISTRY_PASSWORD."
    )]
    Pull(PullArgs),
    /// List the images in the local store, presets marked.
    #[command(after_help = "Examples:\n  vmette images\n  vmette images --json")]
    Images(JsonArgs),
    /// Show what the store knows of an image: config, layers, platform,
    /// where it came from.
    #[command(
        after_help = "Examples:\n  vmette inspect python\n  vmette inspect python:3.12-slim --json"
    )]
    Inspect(InspectArgs),
    /// Remove images from the store; a root a VM uses is freed by a later
    /// `vmette prune`.
    #[command(
        after_help = "Examples:\n  vmette rmi python:3.12-slim\n  vmette rmi node ./root.tar"
    )]
    Rmi(RmiArgs),
    /// Free what no image in the store names (and with --all, every image
    /// no VM uses); prints what it freed.
    #[command(after_help = "Examples:\n  vmette prune\n  vmette prune --all --json")]
    Prune(ImagePruneArgs),
    /// Fetch the kernel and build the initramfs and default image now.
    #[command(
        after_help = "Examples:\n  vmette setup\n  vmette setup --presets python,node\n  vmette setup --rebuild-image"
    )]
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
pub struct ImageArgs {
    /// Use only images already in the local store; never pull.
    #[arg(long)]
    pub offline: bool,
    /// Reach this registry (HOST[:PORT]) over plain HTTP. Loopback
    /// registries always are. Repeatable.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    /// Refuse to store an image or tarball that is, or expands to, more
    /// than this (an image already stored is not measured again).
    #[arg(long, default_value = "64G", value_name = "SIZE")]
    pub image_limit: String,
    /// The sha256 the tarball (a file, or one downloaded from a URL) must
    /// have.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image, named as for `vmette run`.
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// Print JSON for programs instead of text for people.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RmiArgs {
    /// The images, named as for `vmette run`.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ImagePruneArgs {
    /// Remove every image that no VM uses, presets included.
    #[arg(long)]
    pub all: bool,
    /// Print JSON for programs instead of text for people.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image reference.
    #[arg(value_name = "IMAGE")]
    pub image: String,
    #[command(flatten)]
    pub images: ImageArgs,
    /// Print the stored image as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The image: a registry reference, a name in the local store, a preset
    /// (debian), or a path to a directory, tarball or file-system image.
    #[arg(value_name = "IMAGE")]
    pub image: Option<String>,
    #[command(flatten)]
    pub images: ImageArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Replace the image's entrypoint; the image's Cmd is then dropped.
    #[arg(long, value_name = "COMMAND")]
    pub entrypoint: Option<String>,
    /// Run the command as this user (NAME, UID, NAME:GROUP or UID:GID).
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// Root file system: a host directory (shared read-only, with a
    /// throwaway overlay) or an erofs/squashfs/ext4 image.
    #[arg(long, value_name = "DIR|IMAGE", conflicts_with = "image")]
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
    /// The command and its arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The guest's network: none unless asked.
#[derive(Debug, Args)]
pub struct NetworkArgs {
    /// Give the guest outbound network access (NAT), except to loopback,
    /// private, link-local and metadata addresses.
    #[arg(long)]
    pub net: bool,
    /// Let the guest reach only this name (and the other allowed ones):
    /// HTTP and HTTPS to it unless a port is given, checked by its Host or
    /// TLS server name; `*.example.com` covers the names below it. Gives
    /// the guest a network. Repeatable.
    #[arg(long, value_name = "NAME[:PORT]")]
    pub allow_host: Vec<String>,
    /// Let the guest reach only this IPv4 range (and the other allowed
    /// ones), on every port, TCP and UDP, unless a port is given. Gives the
    /// guest a network. Repeatable.
    #[arg(long, value_name = "CIDR[:PORT]")]
    pub allow_cidr: Vec<String>,
    /// Publish a guest TCP port on the host (127.0.0.1 unless HOST_IP is
    /// given; HOST_PORT 0 picks a free one). Without --net the guest still
    /// reaches nothing. Repeatable.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
    /// Let the guest reach this port of the host's loopback, at its
    /// gateway's address (10.0.2.2). Repeatable.
    #[arg(long, value_name = "PORT")]
    pub allow_host_port: Vec<String>,
    /// Resolve the guest's DNS queries with this server instead of the
    /// host's resolver configuration.
    #[arg(long, value_name = "IP[:PORT]")]
    pub dns: Option<String>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image, as for `vmette run`; the default image when absent.
    #[arg(value_name = "IMAGE")]
    pub image: Option<String>,
    #[command(flatten)]
    pub images: ImageArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
    /// A unique name to use instead of the id.
    #[arg(long)]
    pub name: Option<String>,
    /// Guest memory (MiB, or with a unit: 512M, 1G).
    #[arg(long, default_value = "512M", value_name = "SIZE")]
    pub memory: String,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Keep the root's writes on an ephemeral ext4 disk of this size.
    #[arg(long, value_name = "SIZE")]
    pub scratch: Option<String>,
    /// End the sandbox after this long.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// End the sandbox after this long with no exec.
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Share a host directory (read-only unless :rw). Repeatable.
    #[arg(long, value_name = "HOST_DIR:GUEST_PATH[:ro|:rw]")]
    pub share: Vec<String>,
    /// Attach a disk image as a block device. Repeatable.
    #[arg(long, value_name = "IMAGE[:ro]")]
    pub disk: Vec<String>,
    /// Root file system: a host directory or an erofs/squashfs/ext4 image.
    #[arg(long, value_name = "DIR|IMAGE", conflicts_with = "image")]
    pub rootfs: Option<PathBuf>,
    /// Let writes to a directory rootfs reach the host directory.
    #[arg(long)]
    pub rootfs_rw: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Run the command as this user (NAME, UID, NAME:GROUP or UID:GID).
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// Give the command a terminal: a PTY in the guest, this terminal in raw mode.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Forward stdin even when it is a terminal (without -t: no PTY).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Set an environment variable for the command. Repeatable.
    #[arg(short, long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the command in the guest.
    #[arg(short, long, value_name = "GUEST_PATH")]
    pub workdir: Option<String>,
    /// The sandbox's id or name.
    #[arg(value_name = "ID")]
    pub id: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PortArgs {
    /// The sandbox's id or name.
    pub id: String,
    #[command(subcommand)]
    pub action: PortAction,
}

#[derive(Debug, Subcommand)]
pub enum PortAction {
    /// Publish a guest TCP port; prints the host address it listens on.
    Add {
        /// `[HOST_IP:]HOST_PORT:GUEST_PORT`; HOST_PORT 0 picks a free one.
        #[arg(value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT")]
        mapping: String,
        /// Print the port as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Close a published port and the connections it accepted.
    Rm {
        /// The host port.
        #[arg(value_name = "HOST_PORT")]
        port: String,
    },
    /// List the published ports.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: a host path, or ID:/PATH in a sandbox.
    pub source: String,
    /// Where to: ID:/PATH in a sandbox, or a host path.
    pub destination: String,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The sandboxes' ids or names.
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Whether it runs, its sandboxes and limits.
    Status(JsonArgs),
    /// Stop it; its sandboxes power off first.
    Stop,
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
    /// Also build these presets (python, node, toolbox), unless built.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub presets: Vec<String>,
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

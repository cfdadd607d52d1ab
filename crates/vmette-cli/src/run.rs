//! `vmette run`: flags to a [`vmette::Config`], output streamed to this
//! process's stdout and stderr, Ctrl-C forwarded to the guest command.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::mpsc;

use anyhow::{bail, Context};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vmette::{
    Accel, AllowedCidr, AllowedHost, Allowlist, Config, Egress, Nat, Network, OutputStream, Rootfs,
    RunStatus, Runner, Stdin,
};

use vmette::images::{Images, Settings};

use crate::args::{AccelArg, ImageArgs, NetworkArgs, RunArgs};
use crate::progress::{PullBars, Spinner};
use crate::{terminal, values};

/// `vmette shell` without a command: root's login shell from the image's
/// `/etc/passwd`, else `/bin/sh`.
pub const IMAGE_SHELL: &str =
    "shell=$(awk -F: '$1 == \"root\" { print $7 }' /etc/passwd 2>/dev/null); exec \"${shell:-/bin/sh}\" -l";

pub fn run(args: RunArgs, quiet: bool, verbose: u8) -> anyhow::Result<ExitCode> {
    let tty = args.tty;
    let images = images(&args.images, quiet)?;
    let config = config_from(args)?;
    let config = {
        let spinner = Spinner::new(quiet || tty);
        config.resolve_image(&images, &spinner)?
    };
    config.validate()?;

    // Ctrl-C, SIGTERM and SIGHUP go to the guest command first; the run
    // then tears the VM down and exits 128+N.
    let (interrupts_tx, interrupts) = mpsc::channel();
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot handle signals")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if interrupts_tx.send(signal).is_err() {
                    return;
                }
            }
        })
        .context("cannot start the signal thread")?;

    let engine = vmette::default_engine()?;
    let asked = config
        .nat()
        .map(|nat| nat.publish.clone())
        .unwrap_or_default();
    let report = |published: &[vmette::PublishedPort]| {
        report_chosen(
            asked.iter().map(|m| m.host_port),
            published.iter().map(|p| (p.guest_port, p.host)),
        )
    };
    let mut runner = Runner::new(&*engine)
        .network(vmette::default_network())
        .on_published(&report)
        .interrupts(interrupts);
    // Raw mode from here to the end of the run, restored on every way out
    // of this function (errors included) before anything is printed.
    let raw = if tty {
        runner = runner.resizes(terminal::watch_size()?);
        Some(terminal::RawMode::enter()?)
    } else {
        None
    };
    let spinner = Spinner::new(quiet || tty);
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let mut sink = |stream: OutputStream, data: &[u8]| {
        let result = match stream {
            OutputStream::Stdout => {
                let mut out = stdout.lock();
                out.write_all(data).and_then(|()| out.flush())
            }
            OutputStream::Stderr => {
                let mut err = stderr.lock();
                err.write_all(data).and_then(|()| err.flush())
            }
        };
        // A reader that went away (`| head -1`) must not fail the run.
        if result.is_err() {
            tracing::debug!("host output closed");
        }
    };
    let output = runner.progress(&spinner).run_streaming(&config, &mut sink);
    drop(raw);
    let output = output.map_err(|error| explain(error, verbose))?;
    drop(spinner);

    if let Some(denials) = output.denials.filter(|d| verbose > 0 && d.total() > 0) {
        eprintln!("vmette: refused by the network policy: {denials}");
    }
    match &output.status {
        RunStatus::TimedOut if !quiet => {
            eprintln!("vmette: the command timed out; the VM was stopped.")
        }
        RunStatus::NotStarted { message, .. } => eprintln!("vmette: {message}"),
        _ => {}
    }
    Ok(ExitCode::from(output.exit_code().clamp(0, 255) as u8))
}

/// Shows the guest console of a failed boot with `-v`, or says how to see it.
fn explain(error: vmette::Error, verbose: u8) -> anyhow::Error {
    if let vmette::Error::BootFailed { console, .. } = &error {
        if verbose > 0 && !console.is_empty() {
            eprintln!("--- guest console (last lines) ---\n{console}\n---");
        } else {
            let message = crate::sentence(&anyhow::Error::new(error));
            return anyhow::anyhow!("{message} (rerun with -v to see the guest console)");
        }
    }
    anyhow::Error::new(error)
}

/// Parses every value of a repeatable flag; the first bad one is the error.
fn parse_each<T>(
    values: &[String],
    parse: fn(&str) -> Result<T, String>,
) -> anyhow::Result<Vec<T>> {
    values
        .iter()
        .map(|value| parse(value))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)
}

/// The network the flags ask for: none without `--net`, `--allow-host`,
/// `--allow-cidr`, `-p` or `--allow-host-port`.
pub fn network_from(args: &NetworkArgs) -> anyhow::Result<Network> {
    let publish = parse_each(&args.publish, values::publish)?;
    let host_ports = parse_each(&args.allow_host_port, values::host_port)?;
    let dns = args
        .dns
        .as_deref()
        .map(values::dns_server)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let hosts = parse_each(&args.allow_host, |text| {
        text.parse::<AllowedHost>()
            .map_err(|e| format!("--allow-host {e}"))
    })?;
    let cidrs = parse_each(&args.allow_cidr, |text| {
        text.parse::<AllowedCidr>()
            .map_err(|e| format!("--allow-cidr {e}"))
    })?;
    let egress = if !hosts.is_empty() || !cidrs.is_empty() {
        Egress::Allowlist(Allowlist { hosts, cidrs })
    } else if args.net {
        Egress::Open
    } else {
        Egress::Closed
    };
    if egress.is_closed() && publish.is_empty() && host_ports.is_empty() {
        if dns.is_some() {
            bail!("--dns needs a network; add --net");
        }
        return Ok(Network::None);
    }
    Ok(Network::Nat(Nat {
        egress,
        host_ports,
        publish,
        dns,
    }))
}

/// Tells the user the host ports they asked vmette to pick: `asked` are
/// the host ports of the mappings, `published` each one's guest port and
/// host address, in the same order.
pub fn report_chosen<A: std::fmt::Display>(
    asked: impl IntoIterator<Item = u16>,
    published: impl IntoIterator<Item = (u16, A)>,
) {
    for (host_port, (guest_port, address)) in asked.into_iter().zip(published) {
        if host_port == 0 {
            eprintln!("vmette: guest port {guest_port} is published on {address}");
        }
    }
}

/// The image provider the CLI's runs resolve with.
pub fn images(args: &ImageArgs, quiet: bool) -> anyhow::Result<Images> {
    let limit = values::size_mib("--image-limit", &args.image_limit)
        .map_err(anyhow::Error::msg)?
        .saturating_mul(1 << 20);
    let images = Images::new(
        vmette::assets::Cache::locate()?,
        Settings {
            offline: args.offline,
            insecure_registries: args.insecure_registry.clone(),
            limits: vmette::images::Limits {
                expanded_bytes: limit,
                ..vmette::images::Limits::default()
            },
            tarball_limit: limit,
            expected_sha256: args.sha256.clone(),
        },
    );
    Ok(images.with_progress(PullBars::new(quiet)))
}

fn config_from(args: RunArgs) -> anyhow::Result<Config> {
    let command = match (&args.sh, args.command.is_empty()) {
        (Some(line), _) => vec!["/bin/sh".to_string(), "-c".to_string(), line.clone()],
        (None, false) => args.command.clone(),
        (None, true) if args.image.is_none() => {
            bail!("no command given; put it after --, e.g. vmette run -- uname -a")
        }
        (None, true) => Vec::new(),
    };
    let mut config = Config::new(command);
    config.user = args.user;
    config.entrypoint = args
        .entrypoint
        .map(|e| if e.is_empty() { Vec::new() } else { vec![e] });
    config.env = parse_each(&args.env, values::env_pair)?;
    config.shares = parse_each(&args.share, values::share)?;
    config.disks = parse_each(&args.disk, values::disk)?;
    config.network = network_from(&args.network)?;
    config.workdir = args.workdir;
    config.timeout = args
        .timeout
        .as_deref()
        .map(|t| values::duration("--timeout", t))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    config.scratch_mib = args
        .scratch
        .as_deref()
        .map(|s| values::size_mib("--scratch", s))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let memory = values::size_mib("--memory", &args.memory).map_err(anyhow::Error::msg)?;
    config.memory_mib = u32::try_from(memory).unwrap_or(u32::MAX);
    config.vcpus = args.vcpus;
    config.kernel = args.kernel;
    config.initramfs = args.initramfs;
    config.cmdline_extra = args.cmdline;
    config.accel = match args.accel {
        AccelArg::Auto => Accel::Auto,
        AccelArg::Kvm => Accel::Hardware,
        AccelArg::Tcg => Accel::Emulation,
    };
    config.rootfs = match args.rootfs {
        None if args.rootfs_rw => bail!("--rootfs-rw needs --rootfs DIR"),
        None => match args.image {
            Some(image) => Rootfs::Named(image),
            None => Rootfs::Default,
        },
        Some(path) if path.is_dir() => Rootfs::Directory {
            path,
            writable: args.rootfs_rw,
        },
        Some(_) if args.rootfs_rw => {
            bail!("--rootfs-rw works only with a directory rootfs, not an image")
        }
        Some(path) => Rootfs::Image(path),
    };
    // The stdin rule (see `run --help`): pipes and files are forwarded; a
    // terminal only with -t (as the guest PTY's) or -i, since without a
    // PTY it would only swallow keystrokes.
    let terminal = std::io::stdin().is_terminal();
    config.stdin = if !terminal || args.tty || args.interactive {
        Stdin::Inherit
    } else {
        Stdin::Null
    };
    if args.tty {
        if !terminal {
            bail!("-t needs a terminal on stdin; without one, drop -t and pipe the input");
        }
        config.pty = Some(terminal::size());
    }
    Ok(config)
}

//! The verbs that work through `vmetted`: `create`, `exec`, `cp`, `ps`,
//! `stop` and `daemon`. Each is a client of the daemon's HTTP API
//! ([`crate::client`]); `vmette run` and `vmette shell` need no daemon.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use base64::Engine as _;
use vmette_api::{ExecInfo, ExecRequest, SessionInfo, SessionRequest, Stat};

use crate::args::{
    CpArgs, CreateArgs, DaemonCommand, ExecArgs, ImageArgs, NetworkArgs, PortAction, PortArgs,
    StopArgs,
};
use crate::client::{ApiFailure, Client};
use crate::{terminal, values};

/// Exit status when vmette itself failed.
const FAILED: u8 = crate::EXIT_VMETTE_ERROR;

pub fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let memory = values::size_mib("--memory", &args.memory).map_err(anyhow::Error::msg)?;
    let seconds = |flag: &str, value: &Option<String>| -> anyhow::Result<Option<u64>> {
        value
            .as_deref()
            .map(|v| values::duration(flag, v).map(|d| d.as_secs().max(1)))
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    let request = SessionRequest {
        name: args.name,
        memory_mib: Some(u32::try_from(memory).unwrap_or(u32::MAX)),
        vcpus: Some(args.vcpus),
        scratch_mib: args
            .scratch
            .as_deref()
            .map(|s| values::size_mib("--scratch", s))
            .transpose()
            .map_err(anyhow::Error::msg)?,
        timeout_s: seconds("--timeout", &args.timeout)?,
        idle_timeout_s: seconds("--idle-timeout", &args.idle_timeout)?,
        shares: args
            .share
            .iter()
            .map(|s| {
                let share = values::share(s).map_err(anyhow::Error::msg)?;
                Ok(vmette_api::ShareRequest {
                    host_path: absolute(&share.host_path)?,
                    guest_path: share.guest_path,
                    writable: share.writable,
                })
            })
            .collect::<anyhow::Result<_>>()?,
        disks: args
            .disk
            .iter()
            .map(|d| {
                let disk = values::disk(d).map_err(anyhow::Error::msg)?;
                Ok(vmette_api::DiskRequest {
                    path: absolute(&disk.path)?,
                    read_only: disk.read_only,
                })
            })
            .collect::<anyhow::Result<_>>()?,
        rootfs: match &args.rootfs {
            Some(path) => Some(vmette_api::RootfsRequest {
                path: absolute(path)?,
                writable: args.rootfs_rw,
            }),
            None if args.rootfs_rw => bail!("--rootfs-rw needs --rootfs DIR"),
            None => None,
        },
        image: args
            .image
            .as_deref()
            .map(|image| image_for_daemon(image, &args.images))
            .transpose()?,
        network: network_request(&args.network)?,
    };
    let client = Client::connect(true)?;
    let session: SessionInfo = client.json("POST", "/v1/sessions", Some(&request))?;
    let asked = request.network.map(|n| n.publish).unwrap_or_default();
    crate::run::report_chosen(
        asked.iter().map(|m| m.host_port),
        session
            .published
            .iter()
            .map(|p| (p.guest_port, host_address(p))),
    );
    println!("{}", session.id);
    Ok(ExitCode::SUCCESS)
}

/// The network flags as the daemon takes them; checked here first, so a
/// bad flag fails before the daemon is asked.
fn network_request(args: &NetworkArgs) -> anyhow::Result<Option<vmette_api::NetworkRequest>> {
    let vmette::Network::Nat(nat) = crate::run::network_from(args)? else {
        return Ok(None);
    };
    let (allow_hosts, allow_cidrs) = match &nat.egress {
        vmette::Egress::Allowlist(list) => (
            list.hosts.iter().map(ToString::to_string).collect(),
            list.cidrs.iter().map(ToString::to_string).collect(),
        ),
        vmette::Egress::Closed | vmette::Egress::Open => (Vec::new(), Vec::new()),
    };
    Ok(Some(vmette_api::NetworkRequest {
        outbound: !nat.egress.is_closed(),
        allow_hosts,
        allow_cidrs,
        publish: nat.publish.iter().map(port_request).collect(),
        host_ports: nat.host_ports,
        dns: nat.dns.map(|d| d.to_string()),
    }))
}

fn port_request(mapping: &vmette::PortMapping) -> vmette_api::PortRequest {
    vmette_api::PortRequest {
        host_ip: Some(mapping.host_ip.to_string()),
        host_port: mapping.host_port,
        guest_port: mapping.guest_port,
    }
}

fn host_address(port: &vmette_api::PublishedPortInfo) -> String {
    match port.host_ip.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, port.host_port).to_string(),
        Err(_) => format!("{}:{}", port.host_ip, port.host_port),
    }
}

pub fn port(args: PortArgs) -> anyhow::Result<ExitCode> {
    let client = Client::connect(false).context("no sandbox is running")?;
    let base = format!("/v1/sessions/{}/ports", url_segment(&args.id));
    match args.action {
        PortAction::Add { mapping, json } => {
            let mapping = values::publish(&mapping).map_err(anyhow::Error::msg)?;
            let port: vmette_api::PublishedPortInfo =
                client.json("POST", &base, Some(&port_request(&mapping)))?;
            if json {
                println!("{}", serde_json::to_string(&port)?);
            } else {
                println!("{}", host_address(&port));
            }
        }
        PortAction::Rm { port } => {
            let number = port
                .rsplit(':')
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| anyhow::anyhow!("{port:?} is not a host port (1 to 65535)"))?;
            client.delete(&format!("{base}/{number}"))?;
        }
        PortAction::Ls { json } => {
            let ports: Vec<vmette_api::PublishedPortInfo> =
                client.json("GET", &base, None::<&()>)?;
            if json {
                println!("{}", serde_json::to_string(&ports)?);
            } else {
                for port in &ports {
                    println!("{} -> {}", host_address(port), port.guest_port);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The image as the daemon should take it: a path made absolute, and a
/// registry image pulled (or a preset built) here first, so its progress
/// shows on this terminal and the daemon finds it in the store they share.
fn image_for_daemon(image: &str, settings: &ImageArgs) -> anyhow::Result<String> {
    if let Some(path) = vmette::images::as_path(image) {
        return absolute(&path);
    }
    let spinner = crate::progress::Spinner::new(false);
    crate::run::images(settings, false)?.resolve_word(image, &spinner)?;
    Ok(image.to_string())
}

/// A host path as the daemon needs it: absolute, and existing.
fn absolute(path: &Path) -> anyhow::Result<String> {
    let path =
        std::fs::canonicalize(path).with_context(|| format!("cannot find {}", path.display()))?;
    Ok(path.to_string_lossy().into_owned())
}

pub fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let client = Arc::new(Client::connect(true)?);
    let terminal_in = std::io::stdin().is_terminal();
    if args.tty && !terminal_in {
        bail!("-t needs a terminal on stdin; without one, drop -t and pipe the input");
    }
    let forward = !terminal_in || args.tty || args.interactive;
    let size = args.tty.then(terminal::size);
    let request = ExecRequest {
        argv: args.command,
        env: args
            .env
            .iter()
            .map(|e| values::env_pair(e))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?,
        workdir: args.workdir,
        user: args.user,
        stdin: forward,
        tty: args.tty,
        rows: size.map(|s| s.rows),
        cols: size.map(|s| s.cols),
        timeout_ms: None,
    };
    let id = url_segment(&args.id);
    let exec: ExecInfo =
        client.json("POST", &format!("/v1/sessions/{id}/execs"), Some(&request))?;
    let base = format!("/v1/sessions/{}/execs/{}", exec.session, exec.id);

    let raw = if args.tty {
        let resizes = terminal::watch_size()?;
        let resizer = Arc::clone(&client);
        let path = format!("{base}/resize");
        std::thread::Builder::new()
            .name("resize".into())
            .spawn(move || {
                for size in resizes {
                    let body = vmette_api::ResizeRequest {
                        rows: size.rows,
                        cols: size.cols,
                    };
                    let _ = resizer.json::<()>("POST", &path, Some(&body));
                }
            })
            .context("cannot start the resize thread")?;
        Some(terminal::RawMode::enter()?)
    } else {
        None
    };
    if forward {
        let feeder = Arc::clone(&client);
        let base = base.clone();
        // Stdin blocks; this thread may outlive the exec, and the process
        // exits anyway.
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut stdin = std::io::stdin();
                loop {
                    let n = match stdin.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = buf[..n].to_vec();
                    if feeder.post_bytes(&format!("{base}/stdin"), chunk).is_err() {
                        return;
                    }
                }
                let _ = feeder.json::<()>("POST", &format!("{base}/stdin/close"), None::<&()>);
            })
            .context("cannot start the stdin thread")?;
    }

    let mut code = None;
    let mut failure = None;
    let streamed = client.events(&format!("{base}/events"), |kind, data| {
        let bytes = || {
            base64::engine::general_purpose::STANDARD
                .decode(data.data.as_deref().unwrap_or_default())
                .context("the daemon sent output that is not base64")
        };
        match kind {
            "stdout" | "pty" => write_out(&mut std::io::stdout(), &bytes()?),
            "stderr" => write_out(&mut std::io::stderr(), &bytes()?),
            "exit" => {
                code = data.end.exit_code;
                if data.end.reason.as_deref() == Some("session_ended") {
                    failure = data.end.message.clone();
                }
            }
            "failed" => {
                code = data.end.exit_code;
                failure = data.end.message.clone();
            }
            _ => {}
        }
        Ok(())
    });
    drop(raw);
    streamed?;
    if let Some(message) = failure {
        eprintln!("vmette: {message}");
    }
    Ok(ExitCode::from(
        code.map_or(FAILED, |c| c.clamp(0, 255) as u8),
    ))
}

/// Whether `pid` is a `vmetted` process of this user.
fn is_our_vmetted(pid: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let named = std::fs::read_to_string(proc_dir.join("comm")).is_ok_and(|c| c.trim() == "vmetted");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    named && std::fs::metadata(&proc_dir).is_ok_and(|m| m.uid() == uid)
}

fn write_out(out: &mut dyn Write, data: &[u8]) {
    // A reader that went away (`| head -1`) must not fail the exec.
    if out.write_all(data).and_then(|()| out.flush()).is_err() {
        tracing::debug!("host output closed");
    }
}

/// A guest side of `cp`: `ID:/PATH`.
fn guest_side(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    let plain = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    (plain && path.starts_with('/')).then_some((id, path))
}

pub fn cp(args: CpArgs) -> anyhow::Result<ExitCode> {
    match (guest_side(&args.source), guest_side(&args.destination)) {
        (None, Some((id, path))) => {
            copy_in(&Client::connect(true)?, Path::new(&args.source), id, path)
        }
        (Some((id, path)), None) => copy_out(
            &Client::connect(true)?,
            id,
            path,
            Path::new(&args.destination),
        ),
        (Some(_), Some(_)) => {
            bail!("both sides name a sandbox; copy through the host in two steps")
        }
        (None, None) => bail!("neither side names a sandbox; write one side as ID:/PATH"),
    }?;
    Ok(ExitCode::SUCCESS)
}

fn query(path: &str) -> String {
    let mut out = String::new();
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn url_segment(id: &str) -> String {
    query(id).replace('/', "%2F")
}

fn guest_stat(client: &Client, id: &str, path: &str) -> anyhow::Result<Option<Stat>> {
    let url = format!(
        "/v1/sessions/{}/files/stat?path={}",
        url_segment(id),
        query(path)
    );
    match client.json::<Stat>("GET", &url, None::<&()>) {
        Ok(stat) => Ok(Some(stat)),
        Err(error)
            if error
                .downcast_ref::<ApiFailure>()
                .is_some_and(|f| f.code == "not_found") =>
        {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

fn copy_in(client: &Client, source: &Path, id: &str, destination: &str) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(source).with_context(|| format!("cannot read {}", source.display()))?;
    let seg = url_segment(id);
    if meta.is_dir() {
        let (reader, writer) = std::io::pipe().context("cannot make a pipe for the tar stream")?;
        let dir = source.to_path_buf();
        let packer = std::thread::Builder::new()
            .name("pack".into())
            .spawn(move || vmette::tree::pack(&dir, writer))
            .context("cannot start the tar packer")?;
        let url = format!("/v1/sessions/{seg}/tree?path={}", query(destination));
        let sent = client.upload(&url, "application/x-tar", reader);
        let packed = packer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the packer failed")));
        sent?;
        packed.with_context(|| format!("cannot pack {}", source.display()))?;
        return Ok(());
    }
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let into_dir = destination.ends_with('/')
        || guest_stat(client, id, destination)?.is_some_and(|s| s.kind == "directory");
    let target = if into_dir {
        format!("{}/{name}", destination.trim_end_matches('/'))
    } else {
        destination.to_string()
    };
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    let file =
        std::fs::File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
    let url = format!(
        "/v1/sessions/{seg}/files?path={}&mode={mode:o}",
        query(&target)
    );
    client.upload(&url, "application/octet-stream", file)?;
    Ok(())
}

fn copy_out(client: &Client, id: &str, source: &str, destination: &Path) -> anyhow::Result<()> {
    let Some(stat) = guest_stat(client, id, source)? else {
        bail!("{source} does not exist in {id}");
    };
    let seg = url_segment(id);
    if stat.kind == "directory" {
        std::fs::create_dir_all(destination)
            .with_context(|| format!("cannot create {}", destination.display()))?;
        let (reader, mut writer) =
            std::io::pipe().context("cannot make a pipe for the tar stream")?;
        let target = destination.to_path_buf();
        // What the guest sends is unpacked by the unpacker that refuses
        // every escape from the target.
        let unpacker = std::thread::Builder::new()
            .name("unpack".into())
            .spawn(move || {
                let limits = vmette::tree::UnpackLimits {
                    max_total_bytes: vmette::DEFAULT_TRANSFER_LIMIT,
                    max_entries: 1_000_000,
                };
                vmette::tree::unpack(reader, &target, &limits)
            })
            .context("cannot start the tar unpacker")?;
        let url = format!("/v1/sessions/{seg}/tree?path={}", query(source));
        let fetched = client.download(&url, &mut writer);
        drop(writer);
        let unpacked = unpacker
            .join()
            .map_err(|_| anyhow::anyhow!("the unpacker failed"))?;
        // A refused member stops the unpacker and so breaks the download:
        // the unpacker's reason is the real one.
        unpacked.with_context(|| format!("cannot unpack into {}", destination.display()))?;
        fetched?;
        return Ok(());
    }
    let name = Path::new(source)
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_default();
    let target = if destination.is_dir() {
        destination.join(name)
    } else {
        destination.to_path_buf()
    };
    // Into a new file beside the target, renamed over it only once whole,
    // so that a failed copy leaves an existing file as it was.
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut partial = tempfile::Builder::new()
        .prefix(".vmette-cp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    let url = format!("/v1/sessions/{seg}/files?path={}", query(source));
    client.download(&url, partial.as_file_mut())?;
    partial
        .persist(&target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    Ok(())
}

pub fn ps(json: bool) -> anyhow::Result<ExitCode> {
    let client = Client::connect(true)?;
    let sessions: Vec<SessionInfo> = client.json("GET", "/v1/sessions", None::<&()>)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&sessions)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<16} {:>8} {:>5}  STATE",
        "ID", "NAME", "MEMORY", "CPUS"
    );
    for s in &sessions {
        println!(
            "{:<20} {:<16} {:>7}M {:>5}  {}",
            s.id,
            s.name.as_deref().unwrap_or("-"),
            s.memory_mib,
            s.vcpus,
            s.state
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stop(args: StopArgs) -> anyhow::Result<ExitCode> {
    let client = Client::connect(false).context("no sandbox is running")?;
    for id in &args.ids {
        let ended: vmette_api::Ended = client.json(
            "DELETE",
            &format!("/v1/sessions/{}", url_segment(id)),
            None::<&()>,
        )?;
        println!("{}", ended.id);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn daemon(command: DaemonCommand) -> anyhow::Result<ExitCode> {
    match command {
        DaemonCommand::Status(args) => {
            let status = match Client::connect(false) {
                Ok(client) => {
                    client.json::<vmette_api::Status>("GET", "/v1/status", None::<&()>)?
                }
                Err(_) => {
                    if args.json {
                        println!("{}", serde_json::json!({ "running": false }));
                    } else {
                        println!("vmetted is not running");
                    }
                    return Ok(ExitCode::from(1));
                }
            };
            if args.json {
                let mut value = serde_json::to_value(&status)?;
                value["running"] = serde_json::Value::Bool(true);
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!(
                    "vmetted {} (pid {}): {} of {} sessions, {} of {} MiB guest memory",
                    status.version,
                    status.pid,
                    status.sessions,
                    status.max_sessions,
                    status.memory_mib,
                    status.max_memory_mib
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DaemonCommand::Stop => {
            let Ok(client) = Client::connect(false) else {
                return Ok(ExitCode::SUCCESS);
            };
            let status: vmette_api::Status = client.json("GET", "/v1/status", None::<&()>)?;
            // Only a plain pid of a vmetted of ours is signalled, never a
            // group or everything (0, -1), whatever the answer said.
            let pid = i32::try_from(status.pid).ok().filter(|pid| *pid > 1);
            let Some(pid) = pid.filter(|pid| is_our_vmetted(*pid)) else {
                bail!(
                    "vmetted reported pid {}, which is not a vmetted of this user",
                    status.pid
                );
            };
            // SAFETY: kill has no memory-safety preconditions.
            if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
                bail!(
                    "cannot stop vmetted (pid {pid}): {}",
                    std::io::Error::last_os_error()
                );
            }
            // Gone means its sessions are down too: it stops them first.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
            // SAFETY: signal 0 only asks whether the pid exists.
            while unsafe { libc::kill(pid, 0) } == 0 {
                if std::time::Instant::now() >= deadline {
                    bail!("vmetted (pid {pid}) did not stop within 90 s");
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

//! `vmetted`, the vmette daemon: sessions that outlive a command, for
//! programs in any language, over an HTTP/1.1 JSON API on a unix socket.
//!
//! The socket is 0600 in a 0700 directory, one daemon per directory (a
//! lock file), and every connection's peer must be this daemon's own user,
//! checked before a byte is read (`listener.rs`). Sessions live in a
//! [`vmette_manager::Manager`]; the routes are in `api.rs`, exec output as
//! Server-Sent Events in `events.rs`. Each session's VM and helpers die
//! with the daemon, however it ends: the library's watchdogs see to that.

mod api;
mod attach;
mod events;
mod files;
mod listener;
mod openapi;
mod ports;
mod stdin;
mod tcp;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vmette_manager::{Limits, Manager};

/// How often ended sessions are swept out of the registry.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

const EXAMPLES: &str = "\
Examples:
  vmetted
  vmetted --max-sessions 4 --max-memory 8G --idle-timeout 10m
  vmetted --listen 127.0.0.1:0
  curl --unix-socket $XDG_RUNTIME_DIR/vmette/vmetted.sock http://vmette/v1/status";

/// Serve vmette sessions over HTTP on a unix socket.
#[derive(Debug, Parser)]
#[command(name = "vmetted", version, about, after_help = EXAMPLES)]
struct Args {
    /// Directory of the socket and lock file [default: $XDG_RUNTIME_DIR/vmette].
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<PathBuf>,
    /// Most live sessions.
    #[arg(long, default_value_t = vmette_manager::DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
    /// Most guest memory of all sessions together (MiB, or 8G) [default: half the host's].
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
    /// End sessions idle this long (30m, 90s; 0 never) [default: 30m].
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<String>,
    /// Also serve on this loopback TCP address (127.0.0.1:PORT or
    /// [::1]:PORT; port 0 picks one), with the bearer token from the
    /// socket directory's `token` file.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Use only images already in the store; never pull.
    #[arg(long)]
    offline: bool,
    /// Reach this registry (HOST[:PORT]) over plain HTTP; loopback ones
    /// always are. Repeatable.
    #[arg(long, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// Print the API's OpenAPI description (docs/openapi.json) and exit.
    #[arg(long)]
    openapi: bool,
    /// Say more (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(125)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if args.openapi {
        return match openapi::json() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("vmetted: cannot write the description: {error}");
                ExitCode::from(125)
            }
        };
    }
    vmette::process::raise_open_files_limit();
    let level = match args.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(format!(
                    "{level},oci_client=error,rustls_platform_verifier=off"
                ))
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut text = error.to_string();
            for cause in error.chain().skip(1) {
                text.push_str(": ");
                text.push_str(&cause.to_string());
            }
            eprintln!("vmetted: {text}");
            ExitCode::from(125)
        }
    }
}

fn serve(args: Args) -> anyhow::Result<()> {
    let mut limits = Limits::host_default();
    limits.max_sessions = args.max_sessions;
    if let Some(memory) = &args.max_memory {
        limits.max_memory_mib = parse_mib(memory)?;
    }
    if let Some(idle) = &args.idle_timeout {
        let idle = parse_duration(idle)?;
        limits.idle_timeout = (!idle.is_zero()).then_some(idle);
    }
    // Refused before anything starts: only loopback is served over TCP.
    let listen = args.listen.map(tcp::loopback_only).transpose()?;
    let dir = match args.socket_dir {
        Some(dir) => dir,
        None => listener::default_dir()?,
    };
    let engine = vmette::default_engine()?;
    let images = vmette::images::Images::new(
        vmette::assets::Cache::locate()?,
        vmette::images::Settings {
            offline: args.offline,
            insecure_registries: args.insecure_registry.clone(),
            ..vmette::images::Settings::default()
        },
    );
    let daemon = api::Daemon::new(Manager::new(
        engine,
        Box::new(images),
        Box::new(vmette::net::UserNetwork),
        limits,
    ));
    // Made now, filled by pause and resume later; a restart never clears it.
    if let Some(state) = vmette_api::state_dir() {
        use std::os::unix::fs::DirBuilderExt;
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state)
        {
            tracing::warn!("cannot create the state directory {}: {e}", state.display());
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let lock = runtime.block_on(async {
        let bound = listener::bind(&dir)?;
        let admission = listener::Admission::new();
        eprintln!("vmetted: serving {}", bound.socket.0.display());
        if let Some(address) = listen {
            let token = tcp::token(&dir)?;
            let tcp = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address}"))?;
            let address = tcp.local_addr()?;
            let gate = tcp::Gate::new(token, address);
            let app = api::router(Arc::clone(&daemon)).layer(axum::middleware::from_fn_with_state(
                gate,
                tcp::require_token,
            ));
            eprintln!(
                "vmetted: serving http://{address} (bearer token in {})",
                dir.join(tcp::TOKEN_NAME).display()
            );
            tokio::spawn(tcp::serve(tcp, app, admission.clone()));
        }
        let sweeper = Arc::clone(&daemon);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                sweeper.manager.sweep();
                sweeper.forget_dead();
            }
        });
        let app = api::router(Arc::clone(&daemon));
        tokio::select! {
            () = listener::serve(&bound.listener, app, admission) => {}
            () = shutdown_signal() => {}
        }
        // The socket goes first, so no new client reaches a daemon that is
        // shutting down; the lock stays until its sessions are down.
        drop(bound.listener);
        drop(bound.socket);
        anyhow::Ok(bound.lock)
    })?;
    // Graceful: every session powers off (flushing its writable disks).
    runtime.shutdown_timeout(Duration::from_secs(1));
    daemon.manager.stop_all();
    drop(lock);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `512`, `512M`, `8G` as MiB.
fn parse_mib(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (digits, scale) = match text.char_indices().last() {
        Some((i, 'G' | 'g')) => (&text[..i], 1024),
        Some((i, 'M' | 'm')) => (&text[..i], 1),
        _ => (text, 1),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| anyhow::anyhow!("--max-memory {text:?} is not a size such as 8G or 4096M"))?;
    Ok(value.saturating_mul(scale))
}

/// `90s`, `10m`, `2h`, `45` (seconds).
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (digits, scale) = match text.char_indices().last() {
        Some((i, 's')) => (&text[..i], 1),
        Some((i, 'm')) => (&text[..i], 60),
        Some((i, 'h')) => (&text[..i], 3600),
        _ => (text, 1),
    };
    let value: u64 = digits.parse().map_err(|_| {
        anyhow::anyhow!("--idle-timeout {text:?} is not a duration such as 30m or 90s")
    })?;
    Ok(Duration::from_secs(value.saturating_mul(scale)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_mib("8G").ok(), Some(8192));
        assert_eq!(parse_mib("512").ok(), Some(512));
        assert!(parse_mib("lots").is_err());
        assert_eq!(parse_duration("10m").ok(), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("0").ok(), Some(Duration::ZERO));
        assert!(parse_duration("soon").is_err());
    }
}

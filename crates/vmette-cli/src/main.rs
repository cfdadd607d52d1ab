//! `vmette`, the command-line front end of the vmette library.
//!
//! `main` decides the exit status and is the one place that prints errors:
//! each failure becomes one sentence on stderr (the error and its causes)
//! and exit status 125, so scripts can tell vmette's failures from the
//! guest command's.

mod args;
mod cache;
mod client;
mod doctor;
mod images;
mod progress;
mod pull;
mod run;
mod setup;
mod terminal;
mod values;
mod verbs;

use std::process::ExitCode;

use clap::Parser;

/// Exit status when vmette itself failed before the command ran.
pub const EXIT_VMETTE_ERROR: u8 = 125;

fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    init_logging(cli.quiet, cli.verbose);
    vmette::process::raise_open_files_limit();
    let result = match cli.command {
        args::Command::Run(args) => run::run(*args, cli.quiet, cli.verbose),
        args::Command::Shell(mut args) => {
            args.tty = true;
            if args.command.is_empty() && args.sh.is_none() {
                args.sh = Some(run::IMAGE_SHELL.into());
                // The shell itself, not the image's entrypoint running it.
                args.entrypoint.get_or_insert_with(String::new);
            }
            run::run(*args, cli.quiet, cli.verbose)
        }
        args::Command::Pull(args) => pull::pull(args, cli.quiet),
        args::Command::Create(args) => verbs::create(*args),
        args::Command::Port(args) => verbs::port(args),
        args::Command::Exec(args) => verbs::exec(args),
        args::Command::Cp(args) => verbs::cp(args),
        args::Command::Ps(args) => verbs::ps(args.json),
        args::Command::Stop(args) => verbs::stop(args),
        args::Command::Daemon(command) => verbs::daemon(command),
        args::Command::Images(args) => images::list(args.json),
        args::Command::Inspect(args) => images::inspect(&args),
        args::Command::Rmi(args) => images::remove(&args, cli.quiet),
        args::Command::Prune(args) => images::prune(&args, cli.quiet),
        args::Command::Setup(args) => setup::setup(&args, cli.quiet),
        args::Command::Cache(command) => cache::cache(command),
        args::Command::Doctor(args) => doctor::doctor(args.json),
        args::Command::Version(args) => version(args.json),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("vmette: {}", sentence(&error));
            ExitCode::from(EXIT_VMETTE_ERROR)
        }
    }
}

/// Help and version go to stdout with status 0; real usage errors become
/// one line and status 125.
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = error.print();
        return ExitCode::SUCCESS;
    }
    let rendered = error.to_string();
    let first = rendered
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    eprintln!("vmette: {first}; see 'vmette --help'.");
    ExitCode::from(EXIT_VMETTE_ERROR)
}

/// The error and its causes as one line.
pub fn sentence(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for (index, cause) in error.chain().enumerate() {
        let part = cause.to_string();
        if index > 0 {
            if text.contains(&part) {
                continue;
            }
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn init_logging(quiet: bool, verbose: u8) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    // The registry client's own logs quote registries' answers (which may
    // echo credentials) and warn about them: errors only, unless asked for
    // by VMETTE_LOG.
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMETTE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{level},oci_client=error,rustls_platform_verifier=off"
        ))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

fn version(json: bool) -> anyhow::Result<ExitCode> {
    let version = env!("CARGO_PKG_VERSION");
    let engine = vmette::default_engine()?;
    let engine = engine.name();
    let protocol = vmette::PROTOCOL_VERSION;
    if json {
        let value = serde_json::json!({
            "version": version,
            "protocol": protocol,
            "engine": engine,
        });
        println!("{value}");
    } else {
        println!("vmette {version} (engine {engine}, guest protocol {protocol})");
    }
    Ok(ExitCode::SUCCESS)
}

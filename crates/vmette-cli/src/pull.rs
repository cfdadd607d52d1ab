//! `vmette pull`: an image from its registry into the local store, with a
//! bar per layer on a terminal.

use std::process::ExitCode;

use crate::args::PullArgs;

pub fn pull(args: PullArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let images = crate::run::images(&args.images, quiet)?;
    let found = images.pull(&args.image)?;
    if let Some(record) = &found.record {
        if args.json {
            println!("{}", serde_json::to_string_pretty(record)?);
        } else {
            println!("{} {}", record.name, record.digest);
        }
    }
    Ok(ExitCode::SUCCESS)
}

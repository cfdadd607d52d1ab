//! `vmette images`, `inspect`, `rmi` and `prune`: the local image store,
//! for people (a table, sizes in MiB) and programs (`--json`).

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::bail;
use vmette::images::{Images, Listed, Removal};

use crate::args::{ImagePruneArgs, InspectArgs, RmiArgs};

fn images() -> anyhow::Result<Images> {
    Ok(Images::locate()?)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// `YYYY-MM-DD HH:MM` (UTC) of `secs` since the epoch.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (hour, minute) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Days to a civil date, after Howard Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}")
}

/// How long ago `secs` since the epoch was, in the largest whole unit.
fn ago(secs: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let past = now.saturating_sub(secs);
    let (n, unit) = match past {
        0..=59 => return "just now".into(),
        60..=3599 => (past / 60, "minute"),
        3600..=86_399 => (past / 3600, "hour"),
        _ => (past / 86_400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

fn created(listed: &Listed) -> String {
    match (&listed.created, listed.stored_at) {
        // RFC 3339 from the image's config: its date and minute.
        (Some(text), _) => text.chars().take(16).collect::<String>().replace('T', " "),
        (None, Some(secs)) => utc(secs),
        (None, None) => "-".into(),
    }
}

fn short_digest(digest: Option<&str>) -> String {
    digest.map_or_else(
        || "-".into(),
        |d| d.trim_start_matches("sha256:").chars().take(12).collect(),
    )
}

pub fn list(json: bool) -> anyhow::Result<ExitCode> {
    let images = images()?;
    let listed = images.list()?;
    let on_disk = images.store_bytes()?;
    if json {
        println!(
            "{}",
            serde_json::json!({"images": listed, "store_bytes": on_disk})
        );
        return Ok(ExitCode::SUCCESS);
    }
    let width = listed
        .iter()
        .map(|l| l.reference.len() + if l.preset { 9 } else { 0 })
        .max()
        .unwrap_or(0)
        .max(9);
    println!(
        "{:<width$}  {:<12}  {:>10}  {:<16}  LAST USED",
        "REFERENCE", "DIGEST", "SIZE", "CREATED"
    );
    for l in &listed {
        let name = if l.preset {
            format!("{} (preset)", l.reference)
        } else {
            l.reference.clone()
        };
        println!(
            "{name:<width$}  {:<12}  {:>10}  {:<16}  {}",
            short_digest(l.digest.as_deref()),
            mib(l.bytes),
            created(l),
            l.last_used_at.map_or_else(|| "-".into(), ago),
        );
    }
    // Images that share a base layer share its blob: the store takes
    // less than its images add up to.
    let counted: u64 = listed
        .iter()
        .filter(|l| l.digest.is_some())
        .map(|l| l.bytes)
        .sum();
    let shared = if counted > on_disk {
        format!(" ({} counted per image: they share blobs)", mib(counted))
    } else {
        String::new()
    };
    println!(
        "{} images; the store takes {}{shared}",
        listed.len(),
        mib(on_disk)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn inspect(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let Some(inspected) = images()?.inspect(&args.image)? else {
        bail!(
            "{} is not in the local store; `vmette images` lists what is, and `vmette pull` or a run stores it",
            args.image
        );
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&inspected)?);
        return Ok(ExitCode::SUCCESS);
    }
    let l = &inspected.listed;
    println!("reference   {}", l.reference);
    println!("stored as   {}", inspected.stored_as);
    println!("digest      {}", l.digest.as_deref().unwrap_or("-"));
    println!("origin      {}", serde_json::to_string(&inspected.origin)?);
    println!(
        "platform    {}",
        inspected.platform.as_deref().unwrap_or("-")
    );
    println!("size        {}", mib(l.bytes));
    println!("created     {}", created(l));
    println!(
        "last used   {}",
        l.last_used_at.map_or_else(|| "-".into(), ago)
    );
    println!("root        {}", inspected.root.display());
    let c = &inspected.config;
    println!("entrypoint  {}", serde_json::to_string(&c.entrypoint)?);
    println!("cmd         {}", serde_json::to_string(&c.cmd)?);
    println!("workdir     {}", c.workdir.as_deref().unwrap_or("-"));
    println!("user        {}", c.user.as_deref().unwrap_or("-"));
    for var in &c.env {
        println!("env         {var}");
    }
    for layer in &inspected.layers {
        println!("layer       {} {}", layer.digest, mib(layer.bytes));
    }
    Ok(ExitCode::SUCCESS)
}

fn say_waiting(quiet: bool) -> impl Fn() {
    move || {
        if !quiet {
            eprintln!("vmette: waiting for another vmette process to finish with the image store");
        }
    }
}

fn report(removal: &Removal, quiet: bool) {
    if quiet {
        return;
    }
    for item in &removal.freed {
        println!(
            "freed {:<5} {:>10}  {}",
            item.kind,
            mib(item.bytes),
            item.name
        );
    }
    for item in &removal.in_use {
        println!(
            "kept  {:<5} {:>10}  {} (a VM uses it)",
            item.kind,
            mib(item.bytes),
            item.name
        );
    }
}

pub fn remove(args: &RmiArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let images = images()?;
    let mut missing = Vec::new();
    for word in &args.images {
        match images.remove(word, &say_waiting(quiet))? {
            Some(removal) => report(&removal, quiet),
            None => missing.push(word.as_str()),
        }
    }
    if !missing.is_empty() {
        bail!(
            "{} not in the local store; `vmette images` lists what is",
            match missing.as_slice() {
                [one] => format!("{one} is"),
                many => format!("{} are", many.join(", ")),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn prune(args: &ImagePruneArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let removal = images()?.prune(args.all, &say_waiting(quiet || args.json))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "freed": removal.freed,
                "in_use": removal.in_use,
                "freed_bytes": removal.freed_bytes(),
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    report(&removal, quiet);
    if !quiet {
        println!("freed {} in all", mib(removal.freed_bytes()));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_seconds_read_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00");
        assert_eq!(utc(1_796_083_200 + 3_600 * 13 + 60 * 7), "2026-12-01 13:07");
    }
}

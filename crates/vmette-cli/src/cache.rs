//! `vmette cache`: what the cache holds, and pruning what no run will use.

use std::process::ExitCode;

use vmette::assets::inventory::{self, Asset};
use vmette::assets::Cache;

use crate::args::CacheCommand;

pub fn cache(command: CacheCommand) -> anyhow::Result<ExitCode> {
    let cache = Cache::locate()?;
    match command {
        CacheCommand::List(args) => {
            let assets = inventory::list(&cache);
            print(&cache, &assets, args.json, "");
        }
        CacheCommand::Prune(args) => {
            let engine = vmette::default_engine()?;
            let removed = inventory::prune(&cache, engine.guest_modules(), args.dry_run)?;
            let verb = if args.dry_run {
                "would remove "
            } else {
                "removed "
            };
            print(&cache, &removed, args.json, verb);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print(cache: &Cache, assets: &[Asset], json: bool, verb: &str) {
    // The image store lives in the cache too; `vmette images` and `vmette
    // prune` are its own list and prune.
    let store = cache.root().join("store");
    let store_bytes = vmette::images::Images::new(cache.clone(), Default::default())
        .store_bytes()
        .unwrap_or(0);
    if json {
        let entries: Vec<_> = assets
            .iter()
            .map(|a| {
                serde_json::json!({
                    "kind": a.kind.name(),
                    "path": a.path.display().to_string(),
                    "bytes": a.bytes,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "cache": cache.root().display().to_string(),
                "entries": entries,
                "store": {"path": store.display().to_string(), "bytes": store_bytes},
            })
        );
        return;
    }
    for asset in assets {
        println!(
            "{verb}{:<11} {:>9.1} MiB  {}",
            asset.kind.name(),
            asset.bytes as f64 / (1024.0 * 1024.0),
            asset.path.display()
        );
    }
    let total: u64 = assets.iter().map(|a| a.bytes).sum();
    println!(
        "{verb}{} entries, {:.1} MiB in {}",
        assets.len(),
        total as f64 / (1024.0 * 1024.0),
        cache.root().display()
    );
    if verb.is_empty() {
        println!(
            "image store {:>9.1} MiB  {} (see `vmette images`)",
            store_bytes as f64 / (1024.0 * 1024.0),
            store.display()
        );
    }
}

//! `vmette setup`: fetch and build every boot asset now rather than on the
//! first run. Idempotent: what is already in the cache is kept.

use std::process::ExitCode;

use anyhow::bail;

use vmette::assets::{guest_agent, image, initramfs, kernel, Cache};

use crate::args::SetupArgs;
use crate::progress::Spinner;

pub fn setup(args: &SetupArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let cache = Cache::locate()?;
    let spinner = Spinner::new(quiet);
    let kernel = kernel::ensure(&cache, &spinner)?;
    let agent = guest_agent::locate()?;
    let engine = vmette::default_engine()?;
    let initramfs = initramfs::ensure(&cache, &kernel, &agent, engine.guest_modules())?;
    let image = if args.rebuild_image {
        image::build_default(&cache, &spinner)?
    } else {
        image::ensure_default(&cache, &spinner)?
    };
    let mut presets = Vec::new();
    for name in &args.presets {
        let Some(preset) = vmette::images::preset::named(name) else {
            let names: Vec<&str> = vmette::images::PRESETS.iter().map(|p| p.name).collect();
            bail!(
                "{name:?} is not a preset; the presets are {}",
                names.join(", ")
            );
        };
        presets.push(preset);
    }
    let images = vmette::images::Images::new(cache.clone(), vmette::images::Settings::default());
    let mut built = Vec::new();
    for preset in presets {
        if let Some(record) = images.build_preset(preset, &spinner)? {
            built.push((preset.name, images.store()?.root_path(&record.root)));
        }
    }
    drop(spinner);
    if !quiet {
        println!("kernel     {} ({})", kernel.image.display(), kernel.release);
        println!("initramfs  {}", initramfs.display());
        println!("image      {}", image.display());
        for (name, root) in built {
            println!("preset     {name} {}", root.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! `vmette doctor`: what vmette needs on this host, what it found, and the
//! command that fixes what is missing.

use std::process::ExitCode;

use vmette::assets::{guest_agent, image, kernel, Cache};
use vmette::Check;

pub fn doctor(json: bool) -> anyhow::Result<ExitCode> {
    let engine = vmette::default_engine()?;
    let mut checks = vec![Check {
        name: "engine".into(),
        detail: engine.name().into(),
        fix: None,
    }];
    checks.extend(engine.diagnose());
    checks.extend(asset_checks());

    let healthy = checks.iter().all(|c| c.fix.is_none());
    if json {
        let list: Vec<_> = checks
            .iter()
            .map(|c| serde_json::json!({"name": c.name, "detail": c.detail, "fix": c.fix}))
            .collect();
        println!("{}", serde_json::json!({"ok": healthy, "checks": list}));
    } else {
        for check in &checks {
            let mark = if check.fix.is_none() { "ok " } else { "!! " };
            println!("{mark} {:<12} {}", check.name, check.detail);
            if let Some(fix) = &check.fix {
                println!("    {:<12} fix: {fix}", "");
            }
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn asset_checks() -> Vec<Check> {
    let setup = || Some("vmette setup".to_string());
    let Ok(cache) = Cache::locate() else {
        return vec![Check {
            name: "cache".into(),
            detail: "no cache directory: neither XDG_CACHE_HOME nor HOME is set".into(),
            fix: Some("set HOME or XDG_CACHE_HOME".into()),
        }];
    };
    let mut checks = vec![Check {
        name: "cache".into(),
        detail: format!(
            "{} ({:.1} MiB)",
            cache.root().display(),
            cache.size_bytes() as f64 / (1024.0 * 1024.0)
        ),
        fix: None,
    }];
    checks.push(match kernel::cached(&cache) {
        Ok(Some(k)) => Check {
            name: "kernel".into(),
            detail: format!("{} ({})", k.release, k.image.display()),
            fix: None,
        },
        _ => Check {
            name: "kernel".into(),
            detail: format!("{} not fetched yet", kernel::meta_package()),
            fix: setup(),
        },
    });
    checks.push(match guest_agent::locate() {
        Ok(path) => Check {
            name: "guest agent".into(),
            detail: path.display().to_string(),
            fix: None,
        },
        Err(e) => Check {
            name: "guest agent".into(),
            detail: e.to_string(),
            fix: Some("./setup.sh".into()),
        },
    });
    let default_image = image::default_image_path(&cache);
    checks.push(Check {
        name: "image".into(),
        detail: if default_image.is_file() {
            default_image.display().to_string()
        } else {
            "default image not built yet".into()
        },
        fix: (!default_image.is_file()).then(setup).flatten(),
    });
    for tool in [
        "mmdebstrap",
        "mkfs.erofs",
        "mkfs.ext4",
        "apt-get",
        "dpkg-deb",
    ] {
        if vmette::assets::host_tool::locate(tool).is_none() {
            checks.push(Check {
                name: tool.into(),
                detail: "not found".into(),
                fix: Some("./setup.sh".into()),
            });
        }
    }
    checks
}

//! Parsers for flag values: sizes, durations, `KEY=VALUE`, shares, disks.
//! Each error is one sentence naming the flag and what it expects.

use std::path::PathBuf;
use std::time::Duration;

use vmette::{Disk, Share};

/// A size in MiB: `512` (MiB), `512M`, `2G`, `1GiB`.
pub fn size_mib(flag: &str, text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (number, unit) = split_number(&lower);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{flag} expects a size like 512M or 2G, not {text:?}"))?;
    let factor = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" | "m" => 1,
        "g" => 1024,
        "t" => 1024 * 1024,
        _ => {
            return Err(format!(
                "{flag} expects a size like 512M or 2G, not {text:?}"
            ))
        }
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("{flag} size {text:?} is too large"))
}

/// A duration: `30s`, `2m`, `1h`, `500ms`, or a bare number of seconds.
pub fn duration(flag: &str, text: &str) -> Result<Duration, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (number, unit) = split_number(&lower);
    let bad = || format!("{flag} expects a duration like 30s, 2m or 1h, not {text:?}");
    let value: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(bad()),
    };
    if !seconds.is_finite() || !(0.0..=366.0 * 86400.0).contains(&seconds) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    (&text[..end], &text[end..])
}

/// `KEY=VALUE`.
pub fn env_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() && !key.contains('\0') => {
            Ok((key.to_string(), value.to_string()))
        }
        _ => Err(format!("--env expects KEY=VALUE, not {text:?}")),
    }
}

/// `HOST_DIR:GUEST_PATH[:ro|:rw]`; read-only unless `:rw`.
pub fn share(text: &str) -> Result<Share, String> {
    let (rest, writable) = match text.rsplit_once(':') {
        Some((rest, "rw")) => (rest, true),
        Some((rest, "ro")) => (rest, false),
        _ => (text, false),
    };
    let (host, guest) = rest
        .rsplit_once(':')
        .filter(|(host, guest)| !host.is_empty() && !guest.is_empty())
        .ok_or_else(|| format!("--share expects HOST_DIR:GUEST_PATH[:ro|:rw], not {text:?}"))?;
    if !guest.starts_with('/') {
        return Err(format!(
            "--share guest path {guest:?} must be absolute (like /mnt/data)"
        ));
    }
    Ok(Share {
        host_path: PathBuf::from(host),
        guest_path: guest.to_string(),
        writable,
    })
}

/// `IMAGE[:ro]`.
pub fn disk(text: &str) -> Result<Disk, String> {
    let (path, read_only) = match text.strip_suffix(":ro") {
        Some(path) => (path, true),
        None => (text.strip_suffix(":rw").unwrap_or(text), false),
    };
    if path.is_empty() {
        return Err(format!("--disk expects IMAGE[:ro], not {text:?}"));
    }
    Ok(Disk {
        path: PathBuf::from(path),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size_mib("--memory", "512"), Ok(512));
        assert_eq!(size_mib("--memory", "512M"), Ok(512));
        assert_eq!(size_mib("--memory", "1G"), Ok(1024));
        assert_eq!(size_mib("--memory", "2GiB"), Ok(2048));
        assert!(size_mib("--memory", "lots").is_err());
        assert!(size_mib("--memory", "1X").is_err());
        assert!(size_mib("--memory", "").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("--timeout", "30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("--timeout", "2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("--timeout", "1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            duration("--timeout", "500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(duration("--timeout", "3"), Ok(Duration::from_secs(3)));
        assert!(duration("--timeout", "soon").is_err());
        assert!(duration("--timeout", "3d").is_err());
    }

    #[test]
    fn env_pairs() {
        assert_eq!(env_pair("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(env_pair("A="), Ok(("A".into(), String::new())));
        assert!(env_pair("NOEQUALS").is_err());
        assert!(env_pair("=x").is_err());
    }

    #[test]
    fn shares() {
        let s = share("/a:/b").expect("share");
        assert_eq!(
            (s.host_path, s.guest_path, s.writable),
            ("/a".into(), "/b".into(), false)
        );
        assert!(share("/a:/b:rw").expect("rw").writable);
        assert!(!share("/a:/b:ro").expect("ro").writable);
        assert!(share("/a").is_err());
        assert!(share("/a:").is_err());
        assert!(share("/a:rw").is_err());
        assert!(share("/a:relative").is_err());
    }

    #[test]
    fn disks() {
        assert!(disk("/x.img:ro").expect("disk").read_only);
        assert!(!disk("/x.img").expect("disk").read_only);
        assert!(disk(":ro").is_err());
    }
}

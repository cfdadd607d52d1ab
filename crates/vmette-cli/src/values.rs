//! Parsers for flag values: sizes, durations, `KEY=VALUE`, shares, disks,
//! published ports and network addresses.
//! Each error is one sentence naming the flag and what it expects.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use vmette::{Disk, PortMapping, Share};

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

/// `[HOST_IP:]HOST_PORT:GUEST_PORT`, the host IP 127.0.0.1 unless given
/// (an IPv6 one in brackets); a host port of 0 picks a free one.
pub fn publish(text: &str) -> Result<PortMapping, String> {
    let bad = |why: String| {
        format!("-p {text}: {why}; expected [HOST_IP:]HOST_PORT:GUEST_PORT, e.g. -p 8000:80")
    };
    let (rest, guest) = text
        .rsplit_once(':')
        .ok_or_else(|| bad("no guest port".into()))?;
    let (host_ip, host_port) = match rest.rsplit_once(':') {
        Some((ip, port)) => {
            let ip = ip
                .strip_prefix('[')
                .and_then(|i| i.strip_suffix(']'))
                .unwrap_or(ip);
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| bad(format!("{ip:?} is not an IP address")))?;
            (ip, port)
        }
        None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
    };
    let host_port = port_number(host_port).map_err(&bad)?;
    let guest_port = port_number(guest).map_err(&bad)?;
    if guest_port == 0 {
        return Err(bad("the guest port must be 1 to 65535".into()));
    }
    Ok(PortMapping {
        host_ip,
        host_port,
        guest_port,
    })
}

fn port_number(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| format!("{text:?} is not a port (0 to 65535)"))
}

/// A port of the host's loopback for `--allow-host-port`: 1 to 65535.
pub fn host_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!(
            "--allow-host-port expects a port of 1 to 65535, not {text:?}"
        )),
    }
}

/// `IP` or `IP:PORT` (an IPv6 one as `[IP]:PORT`) of a DNS server; port 53
/// unless given.
pub fn dns_server(text: &str) -> Result<SocketAddr, String> {
    vmette::net::resolver::server_address(text)
        .ok_or_else(|| format!("--dns expects IP or IP:PORT of a DNS server, not {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports() {
        assert_eq!(publish("8000:80"), Ok(PortMapping::loopback(8000, 80)));
        assert_eq!(publish("0:80"), Ok(PortMapping::loopback(0, 80)));
        let any = publish("0.0.0.0:8080:8080").expect("parse");
        assert!(any.host_ip.is_unspecified());
        let v6 = publish("[::1]:8080:80").expect("parse");
        assert_eq!(v6.host_ip, IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
        for bad in [
            "80", "70000:80", "8000:0", "8000:-1", "x:1:2", ":80", "8000:",
        ] {
            assert!(publish(bad).is_err(), "{bad}");
        }
        assert!(host_port("0").is_err() && host_port("65536").is_err() && host_port("x").is_err());
        assert_eq!(host_port("8080"), Ok(8080));
        assert_eq!(
            dns_server("198.18.0.53"),
            Ok("198.18.0.53:53".parse().expect("addr"))
        );
        assert_eq!(
            dns_server("127.0.0.1:5353"),
            Ok("127.0.0.1:5353".parse().expect("addr"))
        );
        assert!(dns_server("dns.example").is_err());
    }

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

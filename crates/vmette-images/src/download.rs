//! Root tarballs over HTTP(S): downloaded into the store once, bounded in
//! size and time, checked against `--sha256` when one is given, and then
//! converted like a local tarball. The URL is the image's name; a stored
//! download is used again unless its digest is not the one asked for.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::registry::{quoted, MIN_RATE, RATE_GRACE, STALL_TIMEOUT};
use crate::store::{ImageRecord, Store};
use crate::{tarball, ImageError, Settings};

/// Longest wait for a server's answer to begin.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

/// Whether `word` is an HTTP(S) URL.
pub fn is_url(word: &str) -> bool {
    word.starts_with("https://") || word.starts_with("http://")
}

/// The root of the tarball at `url`, downloaded on first use, or when
/// the stored one's digest is not the one `settings` expects, or `again`.
pub fn fetch(
    store: &Store,
    url: &str,
    settings: &Settings,
    again: bool,
    steps: &dyn vmette_core::assets::Progress,
) -> Result<(PathBuf, ImageRecord), ImageError> {
    let parsed = reqwest::Url::parse(url).ok();
    // Messages name the URL without credentials, and with control
    // characters escaped so that it stays one line.
    let shown = match &parsed {
        Some(parsed) => {
            let mut shown = parsed.clone();
            let _ = shown.set_username("");
            let _ = shown.set_password(None);
            quoted(shown.as_str())
        }
        None => quoted(url),
    };
    let failed = |reason: String| ImageError::Download {
        url: shown.clone(),
        reason,
    };
    // The URL is the image's name, shown in listings: nothing in it may
    // read as more than the one name (the URL parser drops tabs and
    // newlines, so the name and what is fetched would differ too).
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(failed(
            "the URL has spaces or control characters; percent-encode them".into(),
        ));
    }
    let Some(parsed) = parsed else {
        return Err(failed("it is not a valid URL".into()));
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(failed(
            "the URL carries credentials, which would be stored with the image; serve the file without them".into(),
        ));
    }
    let expected = expected_digest(settings).map_err(failed)?;
    // Plain HTTP from another machine can be changed on the way; a pinned
    // digest makes that harmless.
    let plain_allowed = expected.is_some() || is_loopback(&parsed);
    if parsed.scheme() == "http" && !plain_allowed {
        return Err(failed(
            "plain HTTP from another machine can be tampered with on the way; use https, or pin the file with --sha256".into(),
        ));
    }
    if let Some(record) = store.lookup(url).filter(|_| !again) {
        if expected.as_ref().is_none_or(|e| *e == record.digest) {
            return Ok((store.root_path(&record.root), record));
        }
    }
    if settings.offline {
        return Err(ImageError::NotStored {
            reference: url.to_string(),
        });
    }
    steps.step(&format!("downloading {shown}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ImageError::store("cannot start the download's runtime"))?;
    let (digest, file) = runtime
        .block_on(download(
            store,
            parsed,
            settings.tarball_limit,
            plain_allowed,
        ))
        .map_err(failed)?;
    if let Some(expected) = expected.as_deref().filter(|e| *e != digest) {
        return Err(failed(mismatch(&digest, expected)));
    }
    if !tarball::looks_like_tarball(file.path()) {
        return Err(failed(
            "it is not a tarball (tar, tar.gz or tar.zst)".into(),
        ));
    }
    tarball::store_and_pack(store, url.to_string(), &digest, file, None, settings, url)
}

/// The refusal of a tarball whose `digest` is not the `expected` one.
pub(crate) fn mismatch(digest: &str, expected: &str) -> String {
    format!(
        "its sha256 is {}, not the {} that --sha256 asks for",
        digest.trim_start_matches("sha256:"),
        expected.trim_start_matches("sha256:")
    )
}

/// The digest `--sha256` asks for, if it does.
pub(crate) fn expected_digest(settings: &Settings) -> Result<Option<String>, String> {
    settings
        .expected_sha256
        .as_deref()
        .map(normalised_digest)
        .transpose()
}

fn is_loopback(url: &reqwest::Url) -> bool {
    url.host_str().is_some_and(|host| {
        crate::reference::is_loopback_host(host.trim_start_matches('[').trim_end_matches(']'))
    })
}

/// Where a download may be redirected: never from HTTPS to plain HTTP,
/// plain HTTP only where the first URL could use it, no other scheme, at
/// most ten hops.
fn redirects(plain_allowed: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let secure_before = attempt.previous().iter().any(|u| u.scheme() == "https");
        let next = attempt.url();
        let refusal = match next.scheme() {
            _ if attempt.previous().len() >= 10 => Some("it was redirected more than ten times"),
            "https" => None,
            "http" if secure_before => Some("it was redirected from HTTPS to plain HTTP"),
            "http" if plain_allowed || is_loopback(next) => None,
            "http" => Some("it was redirected to plain HTTP on another machine"),
            _ => Some("it was redirected to a scheme other than HTTP(S)"),
        };
        match refusal {
            Some(reason) => attempt.error(reason),
            None => attempt.follow(),
        }
    })
}

/// `sha256:HEX` from `HEX` or `sha256:HEX`, lowercase.
fn normalised_digest(given: &str) -> Result<String, String> {
    let hex = given.strip_prefix("sha256:").unwrap_or(given);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "--sha256 must be 64 hexadecimal digits, not {:?}",
            given.chars().take(80).collect::<String>()
        ));
    }
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

/// Downloads `url` into a store temp file, at most `limit` bytes, and
/// returns its digest with the file.
async fn download(
    store: &Store,
    url: reqwest::Url,
    limit: u64,
    plain_allowed: bool,
) -> Result<(String, tempfile::NamedTempFile), String> {
    #[cfg(not(target_os = "macos"))]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(STALL_TIMEOUT)
        .read_timeout(STALL_TIMEOUT)
        .redirect(redirects(plain_allowed))
        .user_agent(concat!("vmette/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let response = match tokio::time::timeout(ANSWER_DEADLINE, client.get(url).send()).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) if e.is_timeout() => {
            return Err(format!(
                "the server did not answer within {} s",
                STALL_TIMEOUT.as_secs()
            ))
        }
        Ok(Err(e)) if e.is_connect() => {
            return Err(format!("cannot connect to the server: {}", cause(&e)))
        }
        Ok(Err(e)) => return Err(format!("the request failed: {}", cause(&e))),
        Err(_) => {
            return Err(format!(
                "the server did not answer within {} s",
                ANSWER_DEADLINE.as_secs()
            ))
        }
    };
    let status = response.status();
    if !status.is_success() {
        return Err(format!("the server answered HTTP {}", status.as_u16()));
    }
    if let Some(length) = response.content_length() {
        if length > limit {
            return Err(format!(
                "it is {length} bytes, over the limit of {limit} (--image-limit)"
            ));
        }
    }
    let mut file = store.temp_file().map_err(|e| e.to_string())?;
    let mut hash = Sha256::new();
    let mut received: u64 = 0;
    let started = Instant::now();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            if e.is_timeout() {
                format!(
                    "the download stalled for {} s; giving up",
                    STALL_TIMEOUT.as_secs()
                )
            } else {
                format!("the download broke off: {}", cause(&e))
            }
        })?;
        received += chunk.len() as u64;
        if received > limit {
            return Err(format!(
                "it is over the limit of {limit} bytes (--image-limit)"
            ));
        }
        let elapsed = started.elapsed();
        if elapsed > RATE_GRACE && received < MIN_RATE.saturating_mul(elapsed.as_secs()) {
            return Err(format!(
                "it came slower than {} KiB/s; giving up",
                MIN_RATE >> 10
            ));
        }
        hash.update(&chunk);
        file.write_all(&chunk)
            .map_err(|e| format!("cannot write it to the image store: {e}"))?;
    }
    file.as_file()
        .sync_all()
        .map_err(|e| format!("cannot write it to the image store: {e}"))?;
    Ok((format!("sha256:{}", hex::encode(hash.finalize())), file))
}

/// What a request error says, down its chain of causes (the top words
/// are often only "error sending request"), without the URL, which the
/// message names once: at most 200 characters on one line.
fn cause(error: &reqwest::Error) -> String {
    let mut words: Vec<String> = Vec::new();
    let mut next: Option<&dyn std::error::Error> = Some(error);
    while let Some(error) = next {
        let mut text = error.to_string();
        if let Some(url) = error
            .downcast_ref::<reqwest::Error>()
            .and_then(reqwest::Error::url)
        {
            text = text.replace(&format!(" for url ({url})"), "");
        }
        if !words.iter().any(|w| w.contains(&text)) {
            words.push(text);
        }
        next = error.source();
    }
    quoted(&words.join(": "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_64_hex_digits_with_or_without_the_prefix() {
        let hex = "AB".repeat(32);
        let want = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(normalised_digest(&hex), Ok(want.clone()));
        assert_eq!(normalised_digest(&format!("sha256:{hex}")), Ok(want));
        assert!(normalised_digest("abc").is_err());
        assert!(normalised_digest(&"g".repeat(64)).is_err());
        assert!(normalised_digest(&format!("sha512:{hex}")).is_err());
    }

    #[test]
    fn redirects_never_go_from_https_to_http_nor_plain_off_loopback() {
        let url = |text: &str| reqwest::Url::parse(text).expect("a URL");
        assert!(is_loopback(&url("http://127.0.0.1:8000/x")));
        assert!(is_loopback(&url("http://[::1]/x")));
        assert!(is_loopback(&url("http://localhost/x")));
        assert!(!is_loopback(&url("http://192.0.2.1/x")));
        assert!(!is_loopback(&url("http://localhost.example/x")));
    }

    #[test]
    fn only_http_and_https_are_urls() {
        assert!(is_url("https://example.com/root.tar"));
        assert!(is_url("http://127.0.0.1:8000/root.tar.gz"));
        assert!(!is_url("ftp://example.com/root.tar"));
        assert!(!is_url("python:3.12"));
        assert!(!is_url("./https://x"));
    }
}

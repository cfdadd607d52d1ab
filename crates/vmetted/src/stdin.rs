//! Writing to an exec's stdin from async handlers.
//!
//! The library waits for the guest's room on a blocking thread. A write
//! here waits in slices of a second, each on a blocking thread of its own,
//! so that when the client goes away (its request or attach future is
//! dropped) the write stops within a slice and lets go of its bytes, and
//! a writer with nothing to write holds no thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use vmette::{Exec, MAX_CHUNK_LEN};

/// How long one slice of a write waits for the guest to have room.
const SLICE: Duration = Duration::from_secs(1);

/// Writes `data` to `exec`'s stdin, each chunk waiting for room at most
/// `patience` (without end when `None`): then [`vmette::Error::StdinFull`],
/// with the chunks before it written.
pub async fn write(
    exec: &Arc<Exec>,
    data: Bytes,
    patience: Option<Duration>,
) -> Result<(), vmette::Error> {
    let mut start = 0;
    while start < data.len() {
        let chunk = data.slice(start..data.len().min(start + MAX_CHUNK_LEN));
        start += chunk.len();
        let began = Instant::now();
        loop {
            let exec = Arc::clone(exec);
            let slice = chunk.clone();
            // A chunk is one reservation of the guest's room: all of it
            // is written in a slice, or none.
            let written = tokio::task::spawn_blocking(move || {
                exec.stdin().write_all_within(&slice, Some(SLICE))
            })
            .await
            .unwrap_or_else(|failed| {
                Err(vmette::Error::Io {
                    context: "a stdin write failed".into(),
                    source: std::io::Error::other(failed),
                })
            });
            match written {
                Err(vmette::Error::StdinFull(_)) => {
                    if let Some(patience) = patience.filter(|p| began.elapsed() >= *p) {
                        return Err(vmette::Error::StdinFull(patience));
                    }
                }
                written => {
                    written?;
                    break;
                }
            }
        }
    }
    Ok(())
}

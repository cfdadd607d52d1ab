//! A spinner on stderr for long first-time work. indicatif draws nothing
//! when stderr is not a terminal, so scripts and CI logs stay clean.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use vmette::assets::Progress;

pub struct Spinner {
    bar: Mutex<Option<ProgressBar>>,
    quiet: bool,
}

impl Spinner {
    pub fn new(quiet: bool) -> Spinner {
        Spinner {
            bar: Mutex::new(None),
            quiet,
        }
    }
}

impl Progress for Spinner {
    fn step(&self, message: &str) {
        if self.quiet {
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bar.get_or_insert_with(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>3} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        bar.set_message(message.to_string());
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A bar per layer while an image is pulled, on a terminal only.
pub struct PullBars {
    bars: indicatif::MultiProgress,
    layers: Mutex<std::collections::HashMap<String, ProgressBar>>,
}

impl PullBars {
    pub fn new(quiet: bool) -> PullBars {
        let target = if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressDrawTarget::hidden()
        } else {
            indicatif::ProgressDrawTarget::stderr()
        };
        PullBars {
            bars: indicatif::MultiProgress::with_draw_target(target),
            layers: Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn short(digest: &str) -> String {
        digest
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect()
    }
}

impl vmette::images::PullProgress for PullBars {
    fn layer_started(&self, digest: &str, size: u64) {
        let bar = self.bars.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(PullBars::short(digest));
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        layers.insert(digest.to_string(), bar);
    }

    fn layer_advanced(&self, digest: &str, received: u64) {
        let layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bar) = layers.get(digest) {
            bar.set_position(received);
        }
    }

    fn layer_done(&self, digest: &str, size: u64, cached: bool) {
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        let bar = layers.remove(digest).unwrap_or_else(|| {
            let bar = self.bars.add(ProgressBar::new(size));
            bar.set_prefix(PullBars::short(digest));
            bar
        });
        bar.set_position(size);
        bar.finish_with_message(if cached { "already stored" } else { "done" });
    }

    fn packing(&self) {
        let _ = self.bars.println("packing the root file system");
    }
}

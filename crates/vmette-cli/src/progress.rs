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

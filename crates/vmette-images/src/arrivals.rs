//! Which layers of a pull are in the store yet, so that the packer can
//! start on the top layer while the ones below are still downloading.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Shared by a pull, which announces and stores layers, and the packer,
/// which waits for them.
#[derive(Default)]
pub struct Arrivals {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    layers: Option<Vec<String>>,
    stored: HashSet<String>,
    failed: bool,
}

impl Arrivals {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The image's layers, bottom first, are known.
    pub fn announce(&self, layers: Vec<String>) {
        self.lock().layers = Some(layers);
        self.changed.notify_all();
    }

    /// A layer is in the store.
    pub fn stored(&self, digest: &str) {
        self.lock().stored.insert(digest.to_string());
        self.changed.notify_all();
    }

    /// The pull failed or ended; nothing more will arrive.
    pub fn close(&self) {
        self.lock().failed = true;
        self.changed.notify_all();
    }

    /// The layers, once announced; `None` if the pull ended first.
    pub fn layers(&self) -> Option<Vec<String>> {
        let mut state = self.lock();
        loop {
            if let Some(layers) = &state.layers {
                return Some(layers.clone());
            }
            if state.failed {
                return None;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Waits until `digest` is stored; false if the pull ended without it.
    pub fn wait(&self, digest: &str) -> bool {
        let mut state = self.lock();
        loop {
            if state.stored.contains(digest) {
                return true;
            }
            if state.failed {
                return false;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

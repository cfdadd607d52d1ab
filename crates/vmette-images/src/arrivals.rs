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
        self.wait_for(|state| state.layers.clone())
    }

    /// Waits until `digest` is stored; false if the pull ended without it.
    pub fn wait(&self, digest: &str) -> bool {
        self.wait_for(|state| state.stored.contains(digest).then_some(()))
            .is_some()
    }

    /// Waits until `found` finds something, or the pull has ended.
    fn wait_for<T>(&self, found: impl Fn(&State) -> Option<T>) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(value) = found(&state) {
                return Some(value);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_wake_for_their_layer_or_the_end() {
        let arrivals = Arrivals::default();
        std::thread::scope(|scope| {
            let packer = scope.spawn(|| {
                let layers = arrivals.layers().expect("announced");
                (arrivals.wait(&layers[1]), arrivals.wait(&layers[0]))
            });
            arrivals.announce(vec!["bottom".into(), "top".into()]);
            arrivals.stored("top");
            arrivals.close();
            assert_eq!(packer.join().expect("the packer"), (true, false));
        });
        let ended = Arrivals::default();
        ended.close();
        assert_eq!(ended.layers(), None);
    }
}

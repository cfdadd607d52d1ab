//! Output credit: how many more bytes one output stream may send before
//! the host grants more ([`vmette_proto::OUTPUT_WINDOW`] at first).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use vmette_proto::OUTPUT_WINDOW;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How many more bytes one output stream may send.
pub struct Credit {
    state: Mutex<CreditState>,
    changed: Condvar,
}

struct CreditState {
    available: usize,
    closed: bool,
}

impl Credit {
    pub fn new() -> Arc<Credit> {
        Arc::new(Credit {
            state: Mutex::new(CreditState {
                available: OUTPUT_WINDOW,
                closed: false,
            }),
            changed: Condvar::new(),
        })
    }

    /// Takes up to `want` bytes of credit, waiting for some if there is
    /// none (after calling `on_block`); 0 once the stream is closed.
    pub fn take(&self, want: usize, on_block: impl FnOnce()) -> usize {
        let mut state = lock(&self.state);
        if state.available == 0 && !state.closed {
            on_block();
        }
        while state.available == 0 && !state.closed {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            return 0;
        }
        let granted = want.min(state.available);
        state.available -= granted;
        granted
    }

    pub fn grant(&self, bytes: usize) {
        let mut state = lock(&self.state);
        // A host that grants beyond the window only hurts itself; the cap
        // keeps the guest's own accounting bounded.
        state.available = (state.available + bytes).min(OUTPUT_WINDOW);
        self.changed.notify_all();
    }

    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }
}

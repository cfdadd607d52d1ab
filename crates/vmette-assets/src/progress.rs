/// Receives progress of long asset work (kernel download, image build), so
/// a front end can show it. Implementations must be cheap to call.
pub trait Progress: Sync {
    /// A new step begins, described for a human.
    fn step(&self, message: &str);
    /// The current long task is over.
    fn finish(&self);
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn step(&self, _message: &str) {}
    fn finish(&self) {}
}

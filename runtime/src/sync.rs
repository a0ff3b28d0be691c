//! The locks and atomics of tapgate's concurrent cores, from one place so that a loom build
//! (`RUSTFLAGS="--cfg tapgate_loom"`, run by `scripts/test`) checks the same code under every
//! interleaving loom can reach. Normally they are std's.
//!
//! The cfg is tapgate's own rather than `loom`: under `--cfg loom` tokio switches to its internal
//! loom build, which needs loom as tokio's own dependency and does not compile here.

#[cfg(not(tapgate_loom))]
pub use std::sync::{Arc, Mutex, MutexGuard, atomic};
#[cfg(not(tapgate_loom))]
pub use std::thread;

#[cfg(tapgate_loom)]
pub use loom::sync::{Arc, Mutex, MutexGuard, atomic};
#[cfg(tapgate_loom)]
pub use loom::thread;

/// Runs a loom model: every interleaving of `model`'s threads within loom's bounds (a normal
/// build runs it once, so the same test also runs as an ordinary test).
pub fn model<F: Fn() + Sync + Send + 'static>(model: F) {
    #[cfg(tapgate_loom)]
    loom::model(model);
    #[cfg(not(tapgate_loom))]
    model();
}

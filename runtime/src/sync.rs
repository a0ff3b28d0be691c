//! The locks and atomics of tapgate's concurrent cores, from one place so that a loom build
//! (`RUSTFLAGS="--cfg tapgate_loom"`, run by `scripts/test`) checks the same code under every
//! interleaving loom can reach. Normally they are std's.
//!
//! The cfg is tapgate's own rather than `loom`: under `--cfg loom` tokio switches to its internal
//! loom build, which needs loom as tokio's own dependency and does not compile here.

#[cfg(not(tapgate_loom))]
pub use std::sync::{Arc, Condvar, Mutex, MutexGuard, atomic};
#[cfg(not(tapgate_loom))]
pub use std::thread;

#[cfg(tapgate_loom)]
pub use loom::sync::{Arc, Condvar, Mutex, MutexGuard, atomic};
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

/// [`model`] with at most `preemptions` forced thread switches per interleaving, for models
/// whose full space is too large to walk in the suite's time (loom's guidance: bugs need few
/// preemptions; two or three find most).
pub fn model_bounded<F: Fn() + Sync + Send + 'static>(preemptions: usize, model: F) {
    #[cfg(tapgate_loom)]
    {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(preemptions);
        builder.check(model);
    }
    #[cfg(not(tapgate_loom))]
    {
        let _ = preemptions;
        model();
    }
}

/// Runs a future to completion on this thread: loom's executor in a loom build, so a wake-up
/// the future waits for is part of the model; a current-thread tokio runtime otherwise.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    #[cfg(tapgate_loom)]
    return loom::future::block_on(future);
    #[cfg(not(tapgate_loom))]
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
        .block_on(future)
}

#[cfg(not(tapgate_loom))]
pub use tokio::sync::Notify;

/// tokio's `Notify` as far as tapgate uses it, built on loom's primitives so a model explores
/// every moment a wake-up can come: a `Notified` is woken by any `notify_waiters` after it was
/// created, polled or not (tokio documents the same), and `enable` has nothing more to do.
#[cfg(tapgate_loom)]
pub use loom_notify::Notify;

#[cfg(tapgate_loom)]
mod loom_notify {
    use loom::sync::Mutex;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    #[derive(Default)]
    pub struct Notify {
        generation: AtomicUsize,
        waiters: Mutex<Vec<Waker>>,
    }

    impl Notify {
        pub fn new() -> Self {
            Self::default()
        }

        pub fn notified(&self) -> Notified<'_> {
            Notified {
                notify: self,
                created_at: self.generation.load(Ordering::SeqCst),
            }
        }

        pub fn notify_waiters(&self) {
            let waiters = {
                let mut waiters = self.waiters.lock().expect("waiters");
                self.generation.fetch_add(1, Ordering::SeqCst);
                std::mem::take(&mut *waiters)
            };
            waiters.into_iter().for_each(Waker::wake);
        }
    }

    pub struct Notified<'a> {
        notify: &'a Notify,
        created_at: usize,
    }

    impl Notified<'_> {
        pub fn enable(self: Pin<&mut Self>) {}
    }

    impl Future for Notified<'_> {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let notify = self.notify;
            let mut waiters = notify.waiters.lock().expect("waiters");
            if notify.generation.load(Ordering::SeqCst) != self.created_at {
                return Poll::Ready(());
            }
            waiters.push(cx.waker().clone());
            Poll::Pending
        }
    }
}

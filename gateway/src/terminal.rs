//! What every connection of one terminal shares on this gateway: its resend window, the
//! approvals restored from other gateways, and the wake-ups for answers and revocation.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tapgate_journal::JournalRecord;
use tapgate_protocol::{Admission, SequenceWindow, Tag, TapResult};
use tapgate_runtime::sync::Mutex;
use tapgate_runtime::sync::Notify;

/// Per-terminal replay state, shared by every connection of that terminal.
pub(crate) struct TerminalState {
    pub(crate) window: Mutex<SequenceWindow<TapResult>>,
    /// Approvals another gateway decided and shared, restored into the window at a Hello here
    /// and not yet in this gateway's journal: a resend of one is journaled here too (settlement
    /// books the tap once), so the approval is on record whichever gateway's journal survives.
    pub(crate) restored: Mutex<HashMap<u64, JournalRecord>>,
    answered: Notify,
    /// Set, and its sessions woken, when the gate is revoked in the directory.
    pub(crate) revoked: AtomicBool,
    pub(crate) revocation: Notify,
}

impl TerminalState {
    pub(crate) fn new(window: u16) -> Arc<TerminalState> {
        Arc::new(TerminalState {
            window: Mutex::new(SequenceWindow::new(window)),
            restored: Mutex::default(),
            answered: Notify::new(),
            revoked: AtomicBool::new(false),
            revocation: Notify::new(),
        })
    }

    /// Records a tap's answer in the window and wakes every resend waiting for it.
    pub(crate) fn complete(&self, result: TapResult) {
        self.window
            .lock()
            .expect("window lock")
            .complete(result.sequence, result);
        self.answered.notify_waiters();
    }

    /// The answer to a tap whose first copy is still being decided, once it is; `None` when
    /// the window no longer holds the tap (evicted or replaced). Callers bound the wait.
    pub(crate) async fn answer_of(&self, sequence: u64, tag: Tag) -> Option<TapResult> {
        loop {
            let notified = self.answered.notified();
            tokio::pin!(notified);
            // Created (and so woken by any later notify_waiters) before the window is read, so
            // an answer completed between the read and the wait still wakes it.
            notified.as_mut().enable();
            match self
                .window
                .lock()
                .expect("window lock")
                .admit(sequence, tag)
            {
                Admission::Resend(answer) => return Some(answer),
                Admission::InFlight => {}
                _ => return None,
            }
            notified.await;
        }
    }
}

/// Models run under loom by `scripts/test` (and once each as ordinary tests).
#[cfg(test)]
mod loom_models {
    use super::*;
    use crate::session::fixtures::approval;
    use tapgate_runtime::sync::{block_on, model, thread};

    const TAG: Tag = [7; tapgate_protocol::TAG_LEN];

    /// A tap's first copy is being decided on one connection when its resend arrives on
    /// another; the first copy's answer completes at any moment of the resend's wait. The
    /// resend always gets that answer: no wake-up is lost between reading the window and
    /// waiting (loom reports a deadlock if one is).
    #[test]
    fn a_resend_waiting_for_its_first_copy_gets_its_answer() {
        model(|| {
            let state = TerminalState::new(8);
            let first = state.window.lock().expect("window lock").admit(5, TAG);
            assert!(matches!(first, Admission::Fresh));
            let deciding = {
                let state = state.clone();
                thread::spawn(move || state.complete(approval(5)))
            };
            let answer = block_on(state.answer_of(5, TAG));
            deciding.join().expect("first copy");
            assert_eq!(answer, Some(approval(5)));
        });
    }
}

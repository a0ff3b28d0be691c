//! The in-process directory of the demo and the tests.

use super::{CHANGE_CHANNEL, CardChange, ChangeEvent, RideClaim, TerminalChange, TerminalRecord};
use crate::card::{CardRecord, CardState};
use crate::decide::CountedRide;
use crate::deny::{DenyEvent, deny_reason};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, RwLock};
use tapgate_protocol::{DenyEntry, Reason};
use tokio::sync::{broadcast, mpsc};

/// In-process directory for the demo and tests.
pub struct EmbeddedDirectory {
    pub(super) cards: RwLock<HashMap<u64, CardRecord>>,
    pub(super) terminals: RwLock<HashMap<u64, TerminalRecord>>,
    pub(super) changes: broadcast::Sender<ChangeEvent>,
    /// The deny list, numbered under its lock as the Redis directory's script numbers it.
    deny: Mutex<DenyLog>,
    deny_changes: broadcast::Sender<DenyEvent>,
}

#[derive(Default)]
struct DenyLog {
    version: u64,
    /// Chained through every change as the Redis script chains its digest.
    history: u64,
    /// Keyed at random when the directory starts, so a node restarted empty, which numbers its
    /// changes from 1 again, gives them histories that gates of its earlier run do not hold.
    digest: RandomState,
    cards: HashMap<u64, Reason>,
}

impl DenyLog {
    fn chain(&mut self, entry: DenyEntry) {
        self.history = self.digest.hash_one((self.history, self.version, entry));
    }
}

impl Default for EmbeddedDirectory {
    fn default() -> Self {
        Self {
            cards: RwLock::default(),
            terminals: RwLock::default(),
            changes: broadcast::channel(CHANGE_CHANNEL).0,
            deny: Mutex::default(),
            deny_changes: broadcast::channel(CHANGE_CHANNEL).0,
        }
    }
}

impl EmbeddedDirectory {
    pub fn card(&self, card_id: u64) -> Option<CardRecord> {
        self.cards
            .read()
            .expect("card map lock")
            .get(&card_id)
            .copied()
    }

    pub fn terminal(&self, terminal_id: u64) -> Option<TerminalRecord> {
        self.terminals
            .read()
            .expect("terminal map lock")
            .get(&terminal_id)
            .copied()
    }

    pub fn put_card(&self, record: CardRecord) {
        self.cards
            .write()
            .expect("card map lock")
            .insert(record.card_id, record);
        self.note_state(record.card_id, record.state);
        // No receivers is fine: nobody caches yet.
        let _ = self.changes.send(ChangeEvent::Changed(CardChange {
            card_id: record.card_id,
            record: Some(record),
        }));
    }

    pub fn put_terminal(&self, record: TerminalRecord) {
        self.terminals
            .write()
            .expect("terminal map lock")
            .insert(record.terminal_id, record);
        let _ = self
            .changes
            .send(ChangeEvent::TerminalChanged(TerminalChange {
                terminal_id: record.terminal_id,
                record: Some(record),
            }));
    }

    /// Takes a gate out of service: it is refused at its next Hello, and gateways close the
    /// sessions it has open.
    pub fn revoke_terminal(&self, terminal_id: u64) {
        self.terminals
            .write()
            .expect("terminal map lock")
            .remove(&terminal_id);
        let _ = self
            .changes
            .send(ChangeEvent::TerminalChanged(TerminalChange {
                terminal_id,
                record: None,
            }));
    }

    pub(super) fn take_counted_ride(&self, card_id: u64, ride: CountedRide) -> RideClaim {
        match self.cards.write().expect("card map lock").get_mut(&card_id) {
            Some(card) => {
                in_period(card, ride);
                if card.rides_left == 0 {
                    return RideClaim::NoneLeft;
                }
                card.rides_left -= 1;
                RideClaim::Taken {
                    left: card.rides_left,
                }
            }
            None => RideClaim::NoneLeft,
        }
    }

    pub(super) fn set_state(&self, card_id: u64, state: CardState) -> Option<CardRecord> {
        self.change_card(card_id, |card| card.state = state)
    }

    pub(super) fn top_up(&self, card_id: u64, ride: CountedRide, rides: u32) -> Option<u32> {
        let record = self.change_card(card_id, |card| {
            in_period(card, ride);
            card.rides_left = card.rides_left.saturating_add(rides);
        })?;
        Some(record.rides_left)
    }

    /// Changes one card in place, under the lock, and publishes the result as a change.
    fn change_card(
        &self,
        card_id: u64,
        change: impl FnOnce(&mut CardRecord),
    ) -> Option<CardRecord> {
        let record = {
            let mut cards = self.cards.write().expect("card map lock");
            let card = cards.get_mut(&card_id)?;
            change(card);
            *card
        };
        self.note_state(card_id, record.state);
        let _ = self.changes.send(ChangeEvent::Changed(CardChange {
            card_id,
            record: Some(record),
        }));
        Some(record)
    }

    /// Puts the card on the deny list, or takes it off, when its state says so: a change with
    /// the next version.
    fn note_state(&self, card_id: u64, state: CardState) {
        let reason = deny_reason(state);
        let mut log = self.deny.lock().expect("deny log lock");
        let held = log.cards.get(&card_id).copied().unwrap_or(Reason::Approved);
        if held == reason {
            return;
        }
        if reason == Reason::Approved {
            log.cards.remove(&card_id);
        } else {
            log.cards.insert(card_id, reason);
        }
        let entry = DenyEntry { card_id, reason };
        log.version += 1;
        log.chain(entry);
        // Sent under the lock, so versions go out in order.
        let _ = self.deny_changes.send(DenyEvent::Changed {
            version: log.version,
            history: log.history,
            entry,
        });
    }

    fn whole_deny_list(&self) -> (DenyEvent, broadcast::Receiver<DenyEvent>) {
        let log = self.deny.lock().expect("deny log lock");
        let entries = log
            .cards
            .iter()
            .map(|(&card_id, &reason)| DenyEntry { card_id, reason })
            .collect();
        // Subscribed under the lock: the receiver gets every change after this version.
        let changes = self.deny_changes.subscribe();
        (
            DenyEvent::Whole {
                version: log.version,
                history: log.history,
                entries,
            },
            changes,
        )
    }

    pub(super) fn follow_deny_list(self: &std::sync::Arc<Self>) -> mpsc::Receiver<DenyEvent> {
        let (tx, rx) = mpsc::channel(CHANGE_CHANNEL);
        let directory = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some((whole, mut changes)) = directory.upgrade().map(|d| d.whole_deny_list())
                else {
                    return;
                };
                if tx.send(whole).await.is_err() {
                    return;
                }
                loop {
                    match changes.recv().await {
                        Ok(event) => {
                            if tx.send(event).await.is_err() {
                                return;
                            }
                        }
                        // Fell behind: start over from the whole list.
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        rx
    }

    pub(super) fn follow_changes(&self) -> mpsc::Receiver<ChangeEvent> {
        let mut changes = self.changes.subscribe();
        let (tx, rx) = mpsc::channel(CHANGE_CHANNEL);
        tokio::spawn(async move {
            loop {
                let event = match changes.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(_)) => ChangeEvent::Resync,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

/// Brings the card's count to the period `ride` counts in, as the Redis directory's script does.
fn in_period(card: &mut CardRecord, ride: CountedRide) {
    match card.rides_period {
        Some(counted) if counted < ride.period => {
            card.rides_left = ride.allowance;
            card.rides_period = Some(ride.period);
        }
        Some(_) => {}
        None => card.rides_period = Some(ride.period),
    }
}

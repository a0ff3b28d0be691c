//! A gate's copy of the deny list (protocol version 2, PROTOCOL.md section 4.6): the lost,
//! blocked and cancelled cards it refuses when it cannot reach a gateway, kept current from the
//! gateway's DenyChanges and DenyList frames.
//!
//! Pure: a gate's firmware feeds it the frames it reads and sends back the DenyAck it returns.

use crate::frame::{DenyAck, DenyChanges, DenyEntry, DenyList, Frame, Reason};
use std::collections::HashMap;

/// The gate's list, at a version; version 0 is the empty list a gate starts with.
#[derive(Debug, Default, Clone)]
pub struct GateDenyList {
    version: u64,
    /// The list's history as the gateway named it, echoed in every DenyAck: after a failover
    /// that lost changes, the same version can be another list, and this tells them apart.
    history: u64,
    cards: HashMap<u64, Reason>,
    /// A whole list arriving part by part, replacing `cards` when its last part comes.
    incoming: Option<Incoming>,
}

#[derive(Debug, Clone)]
struct Incoming {
    version: u64,
    history: u64,
    cards: HashMap<u64, Reason>,
}

/// A deny frame that does not follow what the gate holds. On the gateway's ordered stream this
/// means a gateway that broke the protocol; the gate keeps its list and reconnects, and its
/// next DenyAck starts the gateway over from the version it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OutOfStep {
    #[error("deny-list changes from version {first} do not follow version {held}")]
    Changes { held: u64, first: u64 },
    #[error(
        "a part of the deny list at version {version} came without its first part, or of another list"
    )]
    ListPart { version: u64 },
}

impl GateDenyList {
    pub fn version(&self) -> u64 {
        self.version
    }

    /// What the gate holds, as its DenyAck says it: the first frame of the list it sends on
    /// every version-2 connection.
    pub fn held(&self) -> DenyAck {
        DenyAck {
            version: self.version,
            history: self.history,
        }
    }

    pub fn len(&self) -> usize {
        self.cards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cards.is_empty()
    }

    /// Why the gate refuses this card on its own, or `None` when it is not on the list.
    pub fn refuses(&self, card_id: u64) -> Option<Reason> {
        self.cards.get(&card_id).copied()
    }

    /// Applies a frame read from the gateway: `None` when it is not a deny-list frame (an
    /// answer, which the caller handles), else the acknowledgement to send, if one is due.
    pub fn apply(&mut self, frame: &Frame) -> Option<Result<Option<DenyAck>, OutOfStep>> {
        match frame {
            Frame::DenyChanges(changes) => Some(self.apply_changes(changes).map(Some)),
            Frame::DenyList(part) => Some(self.apply_list(part)),
            _ => None,
        }
    }

    /// Applies changes; returns the acknowledgement to send.
    pub fn apply_changes(&mut self, changes: &DenyChanges) -> Result<DenyAck, OutOfStep> {
        if changes.first_version != self.version + 1 || self.incoming.is_some() {
            return Err(OutOfStep::Changes {
                held: self.version,
                first: changes.first_version,
            });
        }
        for entry in &changes.entries {
            set(&mut self.cards, *entry);
        }
        self.version = changes.last_version();
        self.history = changes.history;
        Ok(self.held())
    }

    /// Takes one part of a whole list; returns the acknowledgement to send once the last part
    /// has replaced the list, `None` before.
    pub fn apply_list(&mut self, part: &DenyList) -> Result<Option<DenyAck>, OutOfStep> {
        if part.first {
            self.incoming = Some(Incoming {
                version: part.version,
                history: part.history,
                cards: HashMap::new(),
            });
        }
        let Some(incoming) = self.incoming.as_mut() else {
            return Err(OutOfStep::ListPart {
                version: part.version,
            });
        };
        if (incoming.version, incoming.history) != (part.version, part.history) {
            self.incoming = None;
            return Err(OutOfStep::ListPart {
                version: part.version,
            });
        }
        for entry in &part.entries {
            set(&mut incoming.cards, *entry);
        }
        if !part.last {
            return Ok(None);
        }
        let incoming = self.incoming.take().expect("checked above");
        self.version = incoming.version;
        self.history = incoming.history;
        self.cards = incoming.cards;
        Ok(Some(self.held()))
    }
}

fn set(cards: &mut HashMap<u64, Reason>, entry: DenyEntry) {
    if entry.denies() {
        cards.insert(entry.card_id, entry.reason);
    } else {
        cards.remove(&entry.card_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(card_id: u64, reason: Reason) -> DenyEntry {
        DenyEntry { card_id, reason }
    }

    #[test]
    fn changes_apply_in_order_and_are_acknowledged() {
        let mut list = GateDenyList::default();
        let ack = list
            .apply_changes(&DenyChanges {
                first_version: 1,
                history: 0xa2,
                entries: vec![entry(7, Reason::CardLost), entry(8, Reason::CardBlocked)],
            })
            .unwrap();
        assert_eq!(
            ack,
            DenyAck {
                version: 2,
                history: 0xa2
            }
        );
        assert_eq!(list.refuses(7), Some(Reason::CardLost));
        list.apply_changes(&DenyChanges {
            first_version: 3,
            history: 0xa3,
            entries: vec![entry(7, Reason::Approved)],
        })
        .unwrap();
        assert_eq!((list.version(), list.refuses(7), list.len()), (3, None, 1));
        assert_eq!(list.held().history, 0xa3);
    }

    #[test]
    fn changes_that_skip_a_version_are_refused_and_change_nothing() {
        let mut list = GateDenyList::default();
        let skipped = DenyChanges {
            first_version: 2,
            history: 0xa2,
            entries: vec![entry(7, Reason::CardLost)],
        };
        assert_eq!(
            list.apply_changes(&skipped),
            Err(OutOfStep::Changes { held: 0, first: 2 })
        );
        assert!(list.is_empty());
        assert_eq!(list.held(), DenyAck::NEW_GATE);
    }

    #[test]
    fn a_whole_list_replaces_the_old_one_only_when_its_last_part_arrives() {
        let mut list = GateDenyList::default();
        list.apply_changes(&DenyChanges {
            first_version: 1,
            history: 0xa1,
            entries: vec![entry(1, Reason::CardLost)],
        })
        .unwrap();
        let first = DenyList {
            version: 40,
            history: 0xb40,
            first: true,
            last: false,
            entries: vec![entry(2, Reason::CardCancelled)],
        };
        assert_eq!(list.apply_list(&first), Ok(None));
        // Until the last part the old list stands.
        assert_eq!(
            (list.held().history, list.refuses(1)),
            (0xa1, Some(Reason::CardLost))
        );
        let last = DenyList {
            first: false,
            last: true,
            entries: vec![entry(3, Reason::CardBlocked)],
            ..first
        };
        assert_eq!(
            list.apply_list(&last),
            Ok(Some(DenyAck {
                version: 40,
                history: 0xb40
            }))
        );
        assert_eq!(list.refuses(1), None);
        assert_eq!(list.refuses(2), Some(Reason::CardCancelled));
        assert_eq!(list.len(), 2);
    }

    #[test]
    fn a_list_part_without_its_first_part_is_refused() {
        let mut list = GateDenyList::default();
        let part = DenyList {
            version: 5,
            history: 0xb5,
            first: false,
            last: true,
            entries: vec![],
        };
        assert_eq!(
            list.apply_list(&part),
            Err(OutOfStep::ListPart { version: 5 })
        );
        assert_eq!(list.version(), 0);
    }

    #[test]
    fn a_list_part_of_another_history_is_refused_and_the_old_list_stands() {
        let mut list = GateDenyList::default();
        let first = DenyList {
            version: 5,
            history: 0xb5,
            first: true,
            last: false,
            entries: vec![entry(2, Reason::CardLost)],
        };
        list.apply_list(&first).unwrap();
        let other = DenyList {
            history: 0xc5,
            first: false,
            last: true,
            ..first
        };
        assert_eq!(
            list.apply_list(&other),
            Err(OutOfStep::ListPart { version: 5 })
        );
        assert_eq!((list.held(), list.refuses(2)), (DenyAck::NEW_GATE, None));
    }
}

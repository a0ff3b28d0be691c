//! The deny list a node keeps and sends to its version-2 gates (PROTOCOL.md section 4.7).
//!
//! Every change to the list has a version, one counter for the whole city: the directory numbers
//! the changes where they are written (one Redis stream in one slot, or the embedded
//! directory's lock), so every node holds the same list at the same version and a gate that
//! moves between nodes goes on from the version it holds. A node keeps the whole list and its
//! last changes; a gate that is behind by more than those, ahead of the node, or new, gets the
//! whole list instead.
//!
//! A version alone does not name a list: a Redis failover can lose changes a gate was already
//! sent, and the new master numbers its next changes with the same versions. So every version
//! also has a history, a digest of every change up to it, which the gate echoes in its DenyAck;
//! a gate whose history at its version is not the book's gets the whole list.
//!
//! Pure: the node feeds the book what the directory says, and each session's [`GateFollow`]
//! turns the book into the frames its gate still needs.

use crate::card::CardState;
use bytes::BytesMut;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tapgate_protocol::{
    DenyAck, DenyChanges, DenyEntry, DenyList, Frame, MAX_DENY_ENTRIES, MacKey, Reason, seal,
};

/// The deny-list entry of a card in this state: `Approved` for a card not on the list.
pub fn deny_reason(state: CardState) -> Reason {
    match state {
        CardState::Active => Reason::Approved,
        CardState::Lost => Reason::CardLost,
        CardState::Blocked => Reason::CardBlocked,
        CardState::Cancelled => Reason::CardCancelled,
    }
}

/// What the directory says about the deny list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyEvent {
    /// The whole list at a version: where a node starts, and where it starts again when it
    /// missed changes.
    Whole {
        version: u64,
        history: u64,
        entries: Vec<DenyEntry>,
    },
    /// One change, making `version` with `history`.
    Changed {
        version: u64,
        history: u64,
        entry: DenyEntry,
    },
}

/// A change that does not follow the book's version: changes were missed, and the node must
/// load the whole list again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deny-list change {got} does not follow version {held}")]
pub struct Gap {
    pub held: u64,
    pub got: u64,
}

/// A gate's list named by a version the book has in another history: it went a way Redis lost,
/// and what it held cannot be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deny list version {version} of another history")]
pub struct OtherHistory {
    pub version: u64,
}

/// The whole list at one version, sorted by card, shared by every gate being sent it.
#[derive(Debug, Default)]
pub struct WholeList {
    pub version: u64,
    pub history: u64,
    /// The book's start it belongs to.
    epoch: u64,
    pub entries: Vec<DenyEntry>,
}

/// A change the book keeps.
#[derive(Debug)]
struct Change {
    entry: DenyEntry,
    /// The card's entry before the change, to tell what the list was at an earlier version.
    before: Option<Reason>,
    /// The list's history once the change was made.
    history: u64,
    /// When it reached this node.
    arrived: Instant,
}

/// One node's deny list.
#[derive(Debug)]
pub struct DenyBook {
    version: u64,
    cards: HashMap<u64, Reason>,
    /// The last changes, the newest at the back; the back one made `version`.
    recent: VecDeque<Change>,
    /// The history before the oldest change kept (at the oldest followable version).
    history_before_recent: u64,
    recent_bound: usize,
    whole: Arc<WholeList>,
    /// Bumped whenever the list starts over from a whole list, so gates sent changes of the
    /// old history get the whole list.
    epoch: u64,
}

impl DenyBook {
    /// `recent_bound` changes are kept for gates that are behind; a gate further behind gets
    /// the whole list.
    pub fn new(recent_bound: usize) -> Self {
        DenyBook {
            version: 0,
            cards: HashMap::new(),
            recent: VecDeque::new(),
            history_before_recent: 0,
            recent_bound: recent_bound.max(1),
            whole: Arc::default(),
            epoch: 0,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.cards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cards.is_empty()
    }

    pub fn apply(&mut self, event: DenyEvent, now: Instant) -> Result<(), Gap> {
        match event {
            DenyEvent::Whole {
                version,
                history,
                entries,
            } => {
                self.cards = entries
                    .iter()
                    .filter(|e| e.denies())
                    .map(|e| (e.card_id, e.reason))
                    .collect();
                self.version = version;
                self.recent.clear();
                self.history_before_recent = history;
                self.epoch += 1;
                self.whole = Arc::new(self.snapshot());
            }
            DenyEvent::Changed { version, .. } if version <= self.version => {}
            DenyEvent::Changed {
                version,
                history,
                entry,
            } => {
                if version != self.version + 1 {
                    return Err(Gap {
                        held: self.version,
                        got: version,
                    });
                }
                let before = if entry.denies() {
                    self.cards.insert(entry.card_id, entry.reason)
                } else {
                    self.cards.remove(&entry.card_id)
                };
                self.version = version;
                if self.recent.len() == self.recent_bound
                    && let Some(oldest) = self.recent.pop_front()
                {
                    self.history_before_recent = oldest.history;
                }
                self.recent.push_back(Change {
                    entry,
                    before,
                    history,
                    arrived: now,
                });
                // The whole list is rebuilt when gates being sent it would otherwise need
                // changes older than the book keeps: at most once per half of its changes.
                if self.version - self.whole.version > self.recent_bound as u64 / 2 {
                    self.whole = Arc::new(self.snapshot());
                }
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> WholeList {
        let mut entries: Vec<DenyEntry> = self
            .cards
            .iter()
            .map(|(&card_id, &reason)| DenyEntry { card_id, reason })
            .collect();
        entries.sort_unstable_by_key(|e| e.card_id);
        WholeList {
            version: self.version,
            history: self.history(),
            epoch: self.epoch,
            entries,
        }
    }

    /// The history of the list at the book's version.
    fn history(&self) -> u64 {
        self.recent
            .back()
            .map_or(self.history_before_recent, |change| change.history)
    }

    /// The history of the list at `version`, while the book can tell (from the oldest
    /// followable version to its own).
    fn history_at(&self, version: u64) -> Option<u64> {
        if version < self.oldest_followable() || version > self.version {
            return None;
        }
        Some(match (version - self.oldest_followable()) as usize {
            0 => self.history_before_recent,
            after => self.recent[after - 1].history,
        })
    }

    /// Whether `held` names a version the book has in another history.
    fn of_other_history(&self, held: DenyAck) -> bool {
        self.history_at(held.version)
            .is_some_and(|history| history != held.history)
    }

    /// The oldest version a gate may hold and still be sent changes.
    fn oldest_followable(&self) -> u64 {
        self.version - self.recent.len() as u64
    }

    /// Changes after `version`, at most `max`, and the history they make; `None` when there
    /// are none.
    fn changes_after(&self, version: u64, max: usize) -> Option<(Vec<DenyEntry>, u64)> {
        let skip = (version - self.oldest_followable()) as usize;
        let changes = self.recent.range(skip..(skip + max).min(self.recent.len()));
        let history = changes.clone().next_back()?.history;
        Some((changes.map(|change| change.entry).collect(), history))
    }

    /// When the change that made `version` reached this node, while the book keeps it.
    pub fn arrived(&self, version: u64) -> Option<Instant> {
        if version <= self.oldest_followable() || version > self.version {
            return None;
        }
        let index = (version - self.oldest_followable() - 1) as usize;
        self.recent.get(index).map(|change| change.arrived)
    }

    /// The card's entry on the list at `version`, `None` when it was not on it: the list now,
    /// with the changes after `version` undone. Exact while the book keeps every change after
    /// `version`; for an older version it is the list before the oldest change kept, as near as
    /// the book can tell.
    fn listed_at(&self, card_id: u64, version: u64) -> Option<Reason> {
        let kept_after = self.version.saturating_sub(version) as usize;
        self.recent
            .iter()
            .rev()
            .take(kept_after)
            .filter(|change| change.entry.card_id == card_id)
            .fold(self.cards.get(&card_id).copied(), |_, change| change.before)
    }

    /// The card's entry on the list a gate held (see `listed_at`), unless the book has that
    /// version in another history.
    pub fn listed_in(&self, card_id: u64, held: DenyAck) -> Result<Option<Reason>, OtherHistory> {
        if self.of_other_history(held) {
            return Err(OtherHistory {
                version: held.version,
            });
        }
        Ok(self.listed_at(card_id, held.version))
    }
}

/// Frames one poll writes at most, so a gate being sent a whole list still has its answers
/// interleaved and the session's buffer stays small.
pub const FRAMES_PER_POLL: usize = 8;

/// Where one gate stands with the deny list, as its session sees it.
#[derive(Debug, Default)]
pub struct GateFollow {
    /// `None` until the gate's first DenyAck says what it holds.
    sent: Option<Sent>,
    /// The version the gate last acknowledged.
    acked: Option<u64>,
}

#[derive(Debug)]
enum Sent {
    /// Changes up to this version, since the book's start `epoch`.
    Through { version: u64, epoch: u64 },
    /// Nothing yet, and the gate holds a list the book cannot go on from: at a version the book
    /// has, but of another history.
    OtherHistory,
    /// Part of a whole list: the entries from `next` on are still to go.
    Whole { list: Arc<WholeList>, next: usize },
}

/// What a poll wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub changes: usize,
    pub list_parts: usize,
    /// A whole list was started: the gate was new, too far behind, ahead of this node, or held
    /// a list of another history.
    pub resync: bool,
}

impl GateFollow {
    /// The gate said which list it holds. The first acknowledgement starts the following, and
    /// says whether the gate holds one of the book's versions in another history (changes a
    /// failover lost): it is then sent the whole list. Later ones only report progress (the
    /// stream is ordered, so what was sent arrives).
    pub fn acknowledged(&mut self, held: DenyAck, book: &DenyBook) -> bool {
        self.acked = Some(held.version);
        if self.sent.is_some() {
            return false;
        }
        let other_history = book.of_other_history(held);
        self.sent = Some(if other_history {
            Sent::OtherHistory
        } else {
            Sent::Through {
                version: held.version,
                epoch: book.epoch,
            }
        });
        other_history
    }

    pub fn acked(&self) -> Option<u64> {
        self.acked
    }

    /// Whether the gate still needs frames that the book has now.
    pub fn behind(&self, book: &DenyBook) -> bool {
        match &self.sent {
            None => false,
            Some(Sent::Whole { .. } | Sent::OtherHistory) => true,
            Some(Sent::Through { version, epoch }) => {
                *version != book.version || *epoch != book.epoch
            }
        }
    }

    /// Seals into `out` what the gate needs next, at most [`FRAMES_PER_POLL`] frames.
    pub fn poll(&mut self, book: &DenyBook, mac: &MacKey, out: &mut BytesMut) -> Written {
        let mut written = Written::default();
        while written.changes + written.list_parts < FRAMES_PER_POLL {
            match self.sent.take() {
                None => return written,
                Some(Sent::Whole { list, next }) => {
                    let end = (next + MAX_DENY_ENTRIES).min(list.entries.len());
                    let last = end == list.entries.len();
                    let part = DenyList {
                        version: list.version,
                        history: list.history,
                        first: next == 0,
                        last,
                        entries: list.entries[next..end].to_vec(),
                    };
                    seal(&Frame::DenyList(part), mac, out);
                    written.list_parts += 1;
                    self.sent = Some(if last {
                        Sent::Through {
                            version: list.version,
                            epoch: list.epoch,
                        }
                    } else {
                        Sent::Whole { list, next: end }
                    });
                }
                Some(Sent::OtherHistory) => self.start_whole_list(book, &mut written),
                Some(Sent::Through { version, epoch }) => {
                    let followable = epoch == book.epoch
                        && version <= book.version
                        && version >= book.oldest_followable();
                    if !followable {
                        self.start_whole_list(book, &mut written);
                        continue;
                    }
                    self.sent = Some(Sent::Through { version, epoch });
                    let Some((entries, history)) = book.changes_after(version, MAX_DENY_ENTRIES)
                    else {
                        return written;
                    };
                    let through = version + entries.len() as u64;
                    seal(
                        &Frame::DenyChanges(DenyChanges {
                            first_version: version + 1,
                            history,
                            entries,
                        }),
                        mac,
                        out,
                    );
                    written.changes += 1;
                    self.sent = Some(Sent::Through {
                        version: through,
                        epoch,
                    });
                }
            }
        }
        written
    }

    fn start_whole_list(&mut self, book: &DenyBook, written: &mut Written) {
        written.resync = true;
        self.sent = Some(Sent::Whole {
            list: book.whole.clone(),
            next: 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapgate_protocol::{GateDenyList, MasterKey, take_frame};

    fn mac() -> MacKey {
        MasterKey::new([3; 16]).diversify(9).mac_key()
    }

    fn lost(card_id: u64) -> DenyEntry {
        DenyEntry {
            card_id,
            reason: Reason::CardLost,
        }
    }

    /// The history a test book gives `version` in its line `line`: lines share versions,
    /// never histories.
    fn history(line: u64, version: u64) -> u64 {
        line << 32 | version
    }

    fn cleared(card_id: u64) -> DenyEntry {
        DenyEntry {
            card_id,
            reason: Reason::Approved,
        }
    }

    /// Polls until the follow has nothing more, feeding every frame to the gate's list; the
    /// frames written, and what the gate acknowledged last.
    fn deliver(follow: &mut GateFollow, book: &DenyBook, gate: &mut GateDenyList) -> Vec<Frame> {
        let mac = mac();
        let mut frames = Vec::new();
        // A follow that never settles is a bug: fail rather than loop.
        for _ in 0..1000 {
            let mut out = BytesMut::new();
            let written = follow.poll(book, &mac, &mut out);
            if written == Written::default() {
                return frames;
            }
            while let Some(sealed) = take_frame(&mut out).unwrap() {
                let frame = sealed.open(&mac).unwrap();
                let ack = match &frame {
                    Frame::DenyChanges(c) => Some(gate.apply_changes(c).unwrap()),
                    Frame::DenyList(l) => gate.apply_list(l).unwrap(),
                    other => panic!("unexpected {other:?}"),
                };
                if let Some(ack) = ack {
                    follow.acknowledged(ack, book);
                }
                frames.push(frame);
            }
        }
        panic!("the follow did not settle in 1000 polls");
    }

    #[test]
    fn the_list_at_an_earlier_version_undoes_the_changes_since() {
        let mut book = DenyBook::new(8);
        let now = Instant::now();
        let blocked = DenyEntry {
            card_id: 7,
            reason: Reason::CardBlocked,
        };
        // Card 7: lost at 2, cleared at 4, blocked at 5; card 9 lost at 1 and 3.
        for (version, entry) in [lost(9), lost(7), lost(9), cleared(7), blocked]
            .into_iter()
            .enumerate()
        {
            let version = version as u64 + 1;
            let history = history(1, version);
            book.apply(
                DenyEvent::Changed {
                    version,
                    history,
                    entry,
                },
                now,
            )
            .unwrap();
        }
        let at = |version| book.listed_at(7, version);
        assert_eq!(
            [at(0), at(1), at(2), at(3), at(4), at(5), at(6)],
            [
                None,
                None,
                Some(Reason::CardLost),
                Some(Reason::CardLost),
                None,
                Some(Reason::CardBlocked),
                Some(Reason::CardBlocked),
            ]
        );
        assert_eq!(book.listed_at(9, 0), None);
        assert_eq!(book.listed_at(9, 1), Some(Reason::CardLost));
    }

    fn book_with(changes: u64, bound: usize) -> DenyBook {
        let mut book = DenyBook::new(bound);
        let now = Instant::now();
        for version in 1..=changes {
            book.apply(
                DenyEvent::Changed {
                    version,
                    history: history(1, version),
                    entry: lost(version),
                },
                now,
            )
            .unwrap();
        }
        book
    }

    #[test]
    fn a_gate_holding_a_recent_version_gets_only_the_changes_after_it() {
        let book = book_with(60, 100);
        let mut gate = GateDenyList::default();
        // The gate held version 0 of this history and so can be sent all 60 changes.
        let mut follow = GateFollow::default();
        follow.acknowledged(DenyAck::NEW_GATE, &book);
        let frames = deliver(&mut follow, &book, &mut gate);
        assert!(frames.iter().all(|f| matches!(f, Frame::DenyChanges(_))));
        // 60 changes in frames of at most 24.
        assert_eq!(frames.len(), 3);
        assert_eq!((gate.version(), gate.len()), (60, 60));
        assert_eq!(follow.acked(), Some(60));
        assert!(!follow.behind(&book));
    }

    #[test]
    fn a_gate_further_behind_than_the_book_keeps_gets_the_whole_list() {
        let mut book = book_with(300, 100);
        book.apply(
            DenyEvent::Changed {
                version: 301,
                history: history(1, 301),
                entry: cleared(5),
            },
            Instant::now(),
        )
        .unwrap();
        let mut gate = GateDenyList::default();
        let mut follow = GateFollow::default();
        follow.acknowledged(DenyAck::NEW_GATE, &book);
        let frames = deliver(&mut follow, &book, &mut gate);
        assert!(matches!(
            frames[0],
            Frame::DenyList(DenyList { first: true, .. })
        ));
        // The whole list, then the changes made since it was built.
        assert_eq!(gate.version(), 301);
        assert_eq!(gate.len(), 299);
        assert_eq!(gate.refuses(5), None);
        assert_eq!(gate.refuses(6), Some(Reason::CardLost));
    }

    /// A gate sent the book's first 8 changes, then versions 9 to `through` of a line a
    /// failover lost, which put cards 1009 and on on the list.
    fn gate_sent_a_lost_line(through: u64) -> GateDenyList {
        let mut lost_line = book_with(8, 100);
        for version in 9..=through {
            let change = DenyEvent::Changed {
                version,
                history: history(2, version),
                entry: lost(1000 + version),
            };
            lost_line.apply(change, Instant::now()).unwrap();
        }
        let mut gate = GateDenyList::default();
        let mut follow = GateFollow::default();
        follow.acknowledged(DenyAck::NEW_GATE, &lost_line);
        deliver(&mut follow, &lost_line, &mut gate);
        gate
    }

    #[test]
    fn a_gate_holding_a_version_of_another_history_gets_the_whole_list() {
        // The book's own line numbers versions 9 and 10 too.
        let book = book_with(10, 100);
        for through in [9, 10] {
            let mut gate = gate_sent_a_lost_line(through);
            assert_eq!(gate.refuses(1009), Some(Reason::CardLost));
            let mut follow = GateFollow::default();
            assert!(follow.acknowledged(gate.held(), &book));
            let frames = deliver(&mut follow, &book, &mut gate);
            assert!(matches!(frames.first(), Some(Frame::DenyList(_))));
            let current = DenyAck {
                version: 10,
                history: history(1, 10),
            };
            assert_eq!(gate.held(), current);
            assert_eq!(
                (gate.refuses(1009), gate.refuses(9)),
                (None, Some(Reason::CardLost))
            );
        }
    }

    #[test]
    fn an_upload_decided_by_a_list_of_another_history_is_not_judged_by_the_book() {
        // The book's line lists card 9 at version 9; the gate's lost line listed card 1009.
        let book = book_with(10, 100);
        let gate = gate_sent_a_lost_line(10);
        let held_at_nine = |history| DenyAck {
            version: 9,
            history,
        };
        assert_eq!(
            book.listed_in(9, held_at_nine(history(1, 9))),
            Ok(Some(Reason::CardLost))
        );
        assert_eq!(book.listed_in(10, held_at_nine(history(1, 9))), Ok(None));
        assert_eq!(
            book.listed_in(9, gate.held()),
            Err(OtherHistory { version: 10 })
        );
    }

    #[test]
    fn a_gate_holding_a_version_of_the_same_history_is_sent_only_changes() {
        // 300 changes, of which the book keeps the last 100: versions 200 to 300 followable.
        let book = book_with(300, 100);
        for held in [200, 250, 300] {
            let mut follow = GateFollow::default();
            let ack = DenyAck {
                version: held,
                history: history(1, held),
            };
            assert!(!follow.acknowledged(ack, &book));
            let mut out = BytesMut::new();
            let written = follow.poll(&book, &mac(), &mut out);
            assert!(!written.resync, "held {held}");
            assert_eq!(
                written.changes,
                (300 - held as usize)
                    .div_ceil(MAX_DENY_ENTRIES)
                    .min(FRAMES_PER_POLL)
            );
        }
        // A version older than the book keeps cannot be told apart: the whole list, but not
        // counted as another history.
        let mut follow = GateFollow::default();
        let older = DenyAck {
            version: 199,
            history: history(2, 199),
        };
        assert!(!follow.acknowledged(older, &book));
        assert!(follow.poll(&book, &mac(), &mut BytesMut::new()).resync);
    }

    #[test]
    fn a_gate_ahead_of_the_node_gets_the_whole_list() {
        let book = book_with(10, 100);
        let mut follow = GateFollow::default();
        follow.acknowledged(
            DenyAck {
                version: 12,
                history: history(1, 12),
            },
            &book,
        );
        let mut gate = GateDenyList::default();
        let frames = deliver(&mut follow, &book, &mut gate);
        assert!(matches!(frames[0], Frame::DenyList(_)));
        assert_eq!(gate.version(), 10);
    }

    #[test]
    fn after_the_node_starts_over_every_gate_gets_the_whole_list_again() {
        let mut book = book_with(10, 100);
        let mut follow = GateFollow::default();
        follow.acknowledged(DenyAck::NEW_GATE, &book);
        let mut gate = GateDenyList::default();
        deliver(&mut follow, &book, &mut gate);
        // Redis lost the last changes and numbers new ones from 9 again: same versions, other
        // cards. Only the whole list can tell the gate.
        book.apply(
            DenyEvent::Whole {
                version: 9,
                history: history(2, 9),
                entries: vec![lost(100)],
            },
            Instant::now(),
        )
        .unwrap();
        assert!(follow.behind(&book));
        let frames = deliver(&mut follow, &book, &mut gate);
        assert!(matches!(frames[0], Frame::DenyList(_)));
        assert_eq!((gate.version(), gate.len()), (9, 1));
        // A gate that held the old line's version 9 and connects only now is told by its
        // history.
        let mut returning = GateFollow::default();
        let old_nine = DenyAck {
            version: 9,
            history: history(1, 9),
        };
        assert!(returning.acknowledged(old_nine, &book));
        assert!(returning.poll(&book, &mac(), &mut BytesMut::new()).resync);
    }

    #[test]
    fn a_change_that_skips_a_version_is_a_gap() {
        let mut book = book_with(3, 100);
        assert_eq!(
            book.apply(
                DenyEvent::Changed {
                    version: 5,
                    history: history(1, 5),
                    entry: lost(1)
                },
                Instant::now()
            ),
            Err(Gap { held: 3, got: 5 })
        );
        // A change the book already has is not a gap: a follower that reloaded reads it again.
        book.apply(
            DenyEvent::Changed {
                version: 2,
                history: history(1, 2),
                entry: lost(2),
            },
            Instant::now(),
        )
        .unwrap();
        assert_eq!(book.version(), 3);
    }

    #[test]
    fn one_poll_writes_a_bounded_number_of_frames() {
        let book = book_with(1000, 100);
        let mut follow = GateFollow::default();
        follow.acknowledged(DenyAck::NEW_GATE, &book);
        let mut out = BytesMut::new();
        let written = follow.poll(&book, &mac(), &mut out);
        assert_eq!(written.list_parts, FRAMES_PER_POLL);
        assert!(written.resync);
        assert!(out.len() <= FRAMES_PER_POLL * tapgate_protocol::MAX_FRAME_LEN);
    }
}

//! Sequence and replay rules for one terminal.
//!
//! A terminal numbers its taps 1, 2, 3, … and never reuses a number (gaps are allowed). The
//! gateway keeps the highest sequence it accepted, `H`, and the answers to the last `W`
//! sequences. A tap with sequence `s` is:
//!
//! - **fresh** when `s > H`;
//! - a **resend** when `H - W < s <= H` and the gateway has seen `s` with the same tag: it gets
//!   the first answer again (or waits for it, while still in flight) and is never recorded twice;
//! - a **conflict** when `s` was seen in the window with a different tag;
//! - a **replay** otherwise: below the window, or inside it but never seen (taps on one stream
//!   arrive in order, so an unseen lower number was not merely delayed).
//!
//! The window is a ring of `W` slots indexed by `s mod W`, so memory per terminal is fixed.

use crate::crypto::Tag;

/// Classification of an incoming sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission<A> {
    /// New; decide it, then call [`SequenceWindow::complete`].
    Fresh,
    /// Already answered: send this answer again.
    Resend(A),
    /// Seen and still being decided: answer it when the first copy's answer is ready.
    InFlight,
    /// Seen with a different body.
    Conflict,
    /// Old or out of order.
    Replay,
}

#[derive(Debug, Clone)]
struct Slot<A> {
    sequence: u64,
    tag: Tag,
    answer: Option<A>,
}

/// Replay state of one terminal: the highest accepted sequence and the last `W` answers.
#[derive(Debug, Clone)]
pub struct SequenceWindow<A> {
    highest: u64,
    slots: Box<[Option<Slot<A>>]>,
}

impl<A: Clone> SequenceWindow<A> {
    /// A window for a terminal that has sent nothing yet. `size` is `W`, at least 1.
    pub fn new(size: u16) -> Self {
        Self::starting_after(0, size)
    }

    /// A window for a terminal whose taps up to `highest` are known to have been accepted but
    /// whose answers are not at hand: all of them count as replays.
    pub fn starting_after(highest: u64, size: u16) -> Self {
        let size = usize::from(size.max(1));
        Self {
            highest,
            slots: (0..size).map(|_| None).collect(),
        }
    }

    pub fn highest(&self) -> u64 {
        self.highest
    }

    fn index(&self, sequence: u64) -> usize {
        (sequence % self.slots.len() as u64) as usize
    }

    /// Classifies `sequence` (whose frame carried `tag`) and, when fresh, records it as in flight.
    pub fn admit(&mut self, sequence: u64, tag: Tag) -> Admission<A> {
        if sequence > self.highest {
            self.highest = sequence;
            let index = self.index(sequence);
            self.slots[index] = Some(Slot {
                sequence,
                tag,
                answer: None,
            });
            return Admission::Fresh;
        }
        let window = self.slots.len() as u64;
        if sequence == 0 || self.highest - sequence >= window {
            return Admission::Replay;
        }
        match &self.slots[self.index(sequence)] {
            Some(slot) if slot.sequence == sequence => match (&slot.answer, slot.tag == tag) {
                (_, false) => Admission::Conflict,
                (Some(answer), true) => Admission::Resend(answer.clone()),
                (None, true) => Admission::InFlight,
            },
            _ => Admission::Replay,
        }
    }

    /// Stores the answer to an admitted sequence. Ignored when the sequence has already left the
    /// window (its answer can then no longer be resent, which the window size accounts for).
    pub fn complete(&mut self, sequence: u64, answer: A) {
        let index = self.index(sequence);
        if let Some(slot) = &mut self.slots[index]
            && slot.sequence == sequence
        {
            slot.answer = Some(answer);
        }
    }

    /// Restores an answer known from durable storage (a journal replay after a restart), raising
    /// `highest` when needed.
    pub fn restore(&mut self, sequence: u64, tag: Tag, answer: A) {
        if sequence == 0 {
            return;
        }
        if sequence > self.highest {
            self.highest = sequence;
        } else if self.highest - sequence >= self.slots.len() as u64 {
            return;
        }
        let index = self.index(sequence);
        self.slots[index] = Some(Slot {
            sequence,
            tag,
            answer: Some(answer),
        });
    }

    /// Restores an answer another node gave (a gate that moved here from another gateway),
    /// unless this window has seen that sequence itself or it is below the window. True when
    /// restored.
    pub fn restore_unseen(&mut self, sequence: u64, tag: Tag, answer: A) -> bool {
        let window = self.slots.len() as u64;
        if sequence == 0 || (sequence <= self.highest && self.highest - sequence >= window) {
            return false;
        }
        let seen =
            matches!(&self.slots[self.index(sequence)], Some(slot) if slot.sequence == sequence);
        if seen {
            return false;
        }
        self.restore(sequence, tag, answer);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: Tag = [1; 16];
    const T2: Tag = [2; 16];

    #[test]
    fn fresh_then_resend_returns_first_answer() {
        let mut w = SequenceWindow::new(4);
        assert_eq!(w.admit(1, T1), Admission::Fresh);
        assert_eq!(w.admit(1, T1), Admission::InFlight);
        w.complete(1, "approved");
        assert_eq!(w.admit(1, T1), Admission::Resend("approved"));
        assert_eq!(w.admit(1, T2), Admission::Conflict);
    }

    #[test]
    fn gaps_are_allowed_but_unseen_lower_numbers_are_replays() {
        let mut w = SequenceWindow::<u8>::new(8);
        assert_eq!(w.admit(5, T1), Admission::Fresh);
        assert_eq!(w.admit(3, T1), Admission::Replay);
        assert_eq!(w.admit(9, T1), Admission::Fresh);
        assert_eq!(w.highest(), 9);
    }

    #[test]
    fn sequences_below_the_window_are_replays() {
        let mut w = SequenceWindow::new(4);
        for s in 1..=10 {
            assert_eq!(w.admit(s, T1), Admission::Fresh);
            w.complete(s, s);
        }
        assert_eq!(w.admit(7, T1), Admission::Resend(7));
        assert_eq!(w.admit(6, T1), Admission::Replay);
        assert_eq!(w.admit(0, T1), Admission::Replay);
    }

    #[test]
    fn starting_after_refuses_everything_up_to_the_known_highest() {
        let mut w = SequenceWindow::<u8>::starting_after(100, 16);
        assert_eq!(w.admit(100, T1), Admission::Replay);
        assert_eq!(w.admit(90, T1), Admission::Replay);
        assert_eq!(w.admit(101, T1), Admission::Fresh);
    }

    #[test]
    fn restore_makes_journal_answers_resendable() {
        let mut w = SequenceWindow::new(4);
        w.restore(41, T1, 'a');
        w.restore(42, T2, 'b');
        w.restore(30, T1, 'z');
        assert_eq!(w.highest(), 42);
        assert_eq!(w.admit(41, T1), Admission::Resend('a'));
        assert_eq!(w.admit(42, T2), Admission::Resend('b'));
        assert_eq!(w.admit(30, T1), Admission::Replay);
        assert_eq!(w.admit(43, T1), Admission::Fresh);
    }

    #[test]
    fn answers_from_another_node_fill_only_what_this_window_has_not_seen() {
        let mut w = SequenceWindow::new(4);
        assert_eq!(w.admit(7, T1), Admission::Fresh);
        w.complete(7, 'h');
        assert!(!w.restore_unseen(7, T1, 'x'), "seen here: kept");
        assert!(w.restore_unseen(8, T2, 'y'));
        assert!(w.restore_unseen(6, T1, 'z'));
        assert!(!w.restore_unseen(2, T1, 'o'), "below the window");
        assert_eq!(w.admit(7, T1), Admission::Resend('h'));
        assert_eq!(w.admit(8, T2), Admission::Resend('y'));
        assert_eq!(w.admit(6, T1), Admission::Resend('z'));
        assert_eq!(w.highest(), 8);
    }

    #[test]
    fn late_completion_of_an_evicted_sequence_is_ignored() {
        let mut w = SequenceWindow::new(2);
        assert_eq!(w.admit(1, T1), Admission::Fresh);
        assert_eq!(w.admit(3, T1), Admission::Fresh);
        w.complete(1, 1);
        assert_eq!(w.admit(3, T1), Admission::InFlight);
        assert_eq!(w.admit(1, T1), Admission::Replay);
    }
}

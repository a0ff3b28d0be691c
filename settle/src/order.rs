//! Which of a partition's read entries a settler may price now, so that one card's taps are
//! priced in gate-time order although several gateways' forwarders feed the partition.
//!
//! A partition's stream holds each forwarder's shipments in the order they arrived. A card
//! whose entry went through one gateway and whose exit went through another can reach the
//! stream exit first when the entry's forwarder is behind. A settler therefore lets every new
//! entry wait an *order window* after it reached the stream: a tap of the same card that is
//! older by gate time and whose forwarder is behind by less than the window arrives meanwhile.
//! One gateway needs it too, on a smaller scale: its sessions stamp a tap's time and then
//! queue it for the journal writer, so its journal is not quite in time order either.
//!
//! An offline upload takes its place by the time it reached its gateway, not by the gate's
//! time of the tap: the card's taps settled before the upload arrived stay settled, and an
//! upload through one gateway is ordered against an online tap through another as any two
//! taps are.
//!
//! The settler's watermark is the last stream entry applied, so what it prices must be a
//! prefix of the stream. Inside that prefix it prices taps by gate time; the prefix stops
//! before any tap whose card has an older tap still waiting behind it. A tap later than the
//! window is still priced (in arrival order) and counted out of order; the window bounds how
//! far apart forwarders may be for the books to equal reconcile's, which prices the journals
//! in the same order (`ledger::walk_journals`).

use std::collections::HashMap;
use tapgate_journal::JournalRecord;

/// One read entry, as far as ordering needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// When the entry reached the stream (the stream id's milliseconds, bounded by when the
    /// settler read it). Never decreases along the stream.
    pub arrived_ms: u64,
    /// The card and the tap's [`pricing_order`]; `None` for corrections, which order nothing.
    pub tap: Option<(u64, PricingOrder)>,
}

/// Where a tap stands in the order settlement prices a card's taps in: its gateway time (when
/// the gateway decided it, or received its upload), then its gate and sequence, so two taps of
/// one millisecond are priced alike by every settler and by reconcile.
pub type PricingOrder = (u64, u64, u64);

pub fn pricing_order(record: &JournalRecord) -> PricingOrder {
    (
        record.reached_gateway_ms(),
        record.terminal_id,
        record.tap.sequence,
    )
}

/// Where the batches a settler may price now end, in order: the leading entries of `waiting`
/// (in stream order) that are ready at `now_ms`, cut into batches of at most `batch` where it
/// can be done without splitting a card's taps out of order.
///
/// An entry is due once it has been on the stream for `window_ms`. The due prefix is cut
/// before any entry whose card has an entry with an older gate time behind the cut. Every
/// entry is due in time, and once all are, nothing is behind the cut: so while a settler
/// reads nothing more (it stops at a bound), everything waiting is priced within the window.
pub fn batch_ends(waiting: &[Arrival], now_ms: u64, window_ms: u64, batch: usize) -> Vec<usize> {
    let inversions = inversions(waiting);
    let due = waiting.partition_point(|a| a.arrived_ms.saturating_add(window_ms) <= now_ms);
    let ready = cut_at_or_before(&inversions, due);
    let mut ends = Vec::new();
    let mut start = 0;
    while start < ready {
        let most = start.saturating_add(batch.max(1)).min(ready);
        let end = match cut_at_or_before(&inversions, most) {
            end if end > start => end,
            _ => first_clean_cut_from(&inversions, most + 1, ready),
        };
        ends.push(end);
        start = end;
    }
    ends
}

/// The first cut at or after `from` that no inverted pair straddles; `last` when none before.
fn first_clean_cut_from(inversions: &[(usize, usize)], from: usize, last: usize) -> usize {
    (from..last)
        .find(|&cut| cut_at_or_before(inversions, cut) == cut)
        .unwrap_or(last)
}

/// Spans no cut may fall in: each runs from a card's first waiting entry to a later entry of
/// that card that comes before an earlier one in pricing order. A cut inside would price the
/// later entry after the earlier one. (Starting at the card's first entry rather than at the
/// one out of order may forbid more cuts than needed, which only delays; a card seldom has
/// more than one tap within a window.)
fn inversions(waiting: &[Arrival]) -> Vec<(usize, usize)> {
    let mut inversions = Vec::new();
    // Each card's first entry, and the latest pricing order among its entries so far.
    let mut cards: HashMap<u64, (usize, PricingOrder)> = HashMap::with_capacity(waiting.len());
    for (j, arrival) in waiting.iter().enumerate() {
        let Some((card, order)) = arrival.tap else {
            continue;
        };
        let (first, latest) = cards.entry(card).or_insert((j, order));
        if *latest > order {
            inversions.push((*first, j));
        } else {
            *latest = order;
        }
    }
    inversions
}

/// The latest cut at or before `at` that no inverted pair straddles. Moving a cut back can
/// put it inside another pair, so it moves until none straddles it.
fn cut_at_or_before(inversions: &[(usize, usize)], at: usize) -> usize {
    let mut cut = at;
    while let Some(earliest) = inversions
        .iter()
        .filter(|(i, j)| *i < cut && cut <= *j)
        .map(|(i, _)| *i)
        .min()
    {
        cut = earliest;
    }
    cut
}

/// Puts a batch's taps in [`pricing_order`].
pub fn in_pricing_order(records: &mut [JournalRecord]) {
    records.sort_by_key(pricing_order);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many entries are ready, in batches of any size.
    fn ready(waiting: &[Arrival], now_ms: u64, window_ms: u64) -> usize {
        let ends = batch_ends(waiting, now_ms, window_ms, usize::MAX);
        assert!(ends.len() <= 1, "{ends:?}");
        ends.last().copied().unwrap_or(0)
    }

    fn tap(arrived_ms: u64, card: u64, at: u64) -> Arrival {
        Arrival {
            arrived_ms,
            tap: Some((card, (at, 1, 1))),
        }
    }

    #[test]
    fn entries_wait_the_window_after_they_reached_the_stream() {
        let waiting = [
            tap(1_000, 1, 900),
            tap(1_400, 2, 1_300),
            tap(2_100, 3, 2_000),
        ];
        assert_eq!(ready(&waiting, 1_999, 1_000), 0);
        assert_eq!(ready(&waiting, 2_000, 1_000), 1);
        assert_eq!(ready(&waiting, 2_400, 1_000), 2);
        assert_eq!(ready(&waiting, 9_000, 1_000), 3);
        assert_eq!(ready(&waiting, 1_000, 0), 1, "no window: due on arrival");
    }

    #[test]
    fn a_due_tap_waits_for_an_older_tap_of_its_card_behind_it() {
        // Card 7's exit (gate time 500) arrived first; its entry (gate time 400) came 300 ms
        // later from a forwarder that was behind.
        let waiting = [tap(1_000, 5, 450), tap(1_000, 7, 500), tap(1_300, 7, 400)];
        assert_eq!(
            ready(&waiting, 2_000, 1_000),
            1,
            "the exit is due but its entry is not: the cut stops before the exit"
        );
        assert_eq!(ready(&waiting, 2_300, 1_000), 3);
    }

    #[test]
    fn a_cut_moved_back_is_checked_again_against_what_it_now_leaves_behind() {
        // Cutting before card 2's second tap leaves card 1's older tap behind card 1's first.
        let waiting = [
            tap(0, 1, 300),
            tap(0, 2, 200),
            tap(0, 1, 250),
            tap(5_000, 2, 100),
        ];
        assert_eq!(ready(&waiting, 1_000, 1_000), 0);
        assert_eq!(
            ready(&waiting, 6_000, 1_000),
            4,
            "all due: nothing is behind"
        );
    }

    #[test]
    fn corrections_and_later_taps_of_a_card_order_nothing() {
        let correction = Arrival {
            arrived_ms: 0,
            tap: None,
        };
        let waiting = [tap(0, 1, 100), correction, tap(5_000, 1, 200)];
        assert_eq!(ready(&waiting, 1_000, 1_000), 2);
    }

    #[test]
    fn a_batch_ends_where_no_card_s_taps_are_split_out_of_order() {
        let waiting = [
            tap(0, 1, 10),
            tap(0, 2, 30),
            tap(0, 3, 40),
            tap(0, 2, 20),
            tap(0, 4, 50),
        ];
        let ends = |batch| batch_ends(&waiting, 1_000, 0, batch);
        assert_eq!(
            ends(1),
            [1, 4, 5],
            "cuts at 2 and 3 would split card 2: its taps go in one batch"
        );
        assert_eq!(ends(2), [1, 4, 5]);
        assert_eq!(ends(4), [4, 5]);
        assert_eq!(ends(9), [5]);
    }

    #[test]
    fn online_taps_go_by_gateway_time_and_uploads_by_when_they_reached_the_gateway() {
        let record = |card: u64, at: u64, uploaded_ms: Option<u64>| {
            let mut r = crate::fares::tests::bus(at);
            r.tap.card_id = card;
            r.uploaded_ms = uploaded_ms;
            r
        };
        // Card 1 tapped offline at 50 and the upload arrived at 200, between its online taps
        // at 100 and 300; card 2's upload of a tap at 60 arrived at 90.
        let mut records = [
            record(1, 300, None),
            record(1, 50, Some(200)),
            record(2, 60, Some(90)),
            record(1, 100, None),
        ];
        in_pricing_order(&mut records);
        let order: Vec<(u64, u64)> = records
            .iter()
            .map(|r| (r.tap.card_id, r.server_time_ms))
            .collect();
        assert_eq!(order, [(2, 60), (1, 100), (1, 50), (1, 300)]);
    }
}

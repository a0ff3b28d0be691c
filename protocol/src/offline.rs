//! A gate's side of offline riding (PROTOCOL.md section 4.7): the rules it was sent, the taps it
//! approved while it had no link, kept in order until the gateway has them.
//!
//! Pure: gate firmware (or a test gate) tells it when a frame arrived and what the clock says.

use crate::deny::GateDenyList;
use crate::frame::{OfflineRules, OfflineTap, Reason, Tap};
use std::collections::VecDeque;

/// Why a gate refused a tap it could not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineRefusal {
    /// No gateway has sent the gate rules yet.
    NoRules,
    /// The card is on the gate's deny list, for this reason.
    Listed(Reason),
    IssuerNotAllowed,
    FareOverLimit,
    /// Longer since the gate last heard from a gateway than the rules allow.
    TooLong,
    /// The gate keeps no more taps than this; a full store refuses rather than forgets.
    StoreFull,
}

impl OfflineRefusal {
    pub fn label(self) -> &'static str {
        match self {
            OfflineRefusal::NoRules => "no_rules",
            OfflineRefusal::Listed(_) => "deny_list",
            OfflineRefusal::IssuerNotAllowed => "issuer",
            OfflineRefusal::FareOverLimit => "fare",
            OfflineRefusal::TooLong => "too_long",
            OfflineRefusal::StoreFull => "store_full",
        }
    }
}

/// What a gate keeps for riding offline, across its connections.
#[derive(Debug)]
pub struct GateOffline {
    rules: Option<OfflineRules>,
    /// Gate clock when a frame from a gateway last arrived.
    heard_ms: u64,
    kept: VecDeque<OfflineTap>,
    bound: usize,
}

impl GateOffline {
    /// A gate that keeps up to `bound` offline taps.
    pub fn new(bound: usize) -> Self {
        GateOffline {
            rules: None,
            heard_ms: 0,
            kept: VecDeque::new(),
            bound,
        }
    }

    /// The gateway's OfflineRules, kept until the next.
    pub fn set_rules(&mut self, rules: OfflineRules) {
        self.rules = Some(rules);
    }

    /// A frame from a gateway arrived at `now_ms`: the gate is not offline then.
    pub fn heard(&mut self, now_ms: u64) {
        self.heard_ms = self.heard_ms.max(now_ms);
    }

    /// Decides `tap` (its sequence the gate's next) with no link: approved and kept, or
    /// refused. `full_fare_fen` is the full fare of the gate's mode.
    pub fn decide(
        &mut self,
        tap: Tap,
        full_fare_fen: u32,
        list: &GateDenyList,
    ) -> Result<(), OfflineRefusal> {
        let rules = self.rules.ok_or(OfflineRefusal::NoRules)?;
        if let Some(reason) = list.refuses(tap.card_id) {
            return Err(OfflineRefusal::Listed(reason));
        }
        if !rules.issuers.contains(tap.issuer) {
            return Err(OfflineRefusal::IssuerNotAllowed);
        }
        if full_fare_fen > rules.max_fare_fen {
            return Err(OfflineRefusal::FareOverLimit);
        }
        if tap.gate_time_ms.saturating_sub(self.heard_ms) > u64::from(rules.max_offline_s) * 1000 {
            return Err(OfflineRefusal::TooLong);
        }
        if self.kept.len() >= self.bound {
            return Err(OfflineRefusal::StoreFull);
        }
        let held = list.held();
        self.kept.push_back(OfflineTap {
            tap,
            deny_version: held.version,
            deny_history: held.history,
            offline_since_ms: self.heard_ms,
        });
        Ok(())
    }

    /// Taps kept and not yet handed out for upload.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// The next kept tap to upload, oldest first. The caller holds it until its receipt.
    pub fn next_upload(&mut self) -> Option<OfflineTap> {
        self.kept.pop_front()
    }

    /// Keeps an upload the gateway answered `busy` again, under `sequence` (the gate's next),
    /// to be uploaded after the ones kept.
    pub fn requeue(&mut self, upload: OfflineTap, sequence: u64) {
        self.kept.push_back(OfflineTap {
            tap: Tap {
                sequence,
                ..upload.tap
            },
            ..upload
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{DenyChanges, DenyEntry, IssuerSet, TapKind};
    use crate::registry::Issuer;

    const HEARD: u64 = 1_000_000;

    fn tap(sequence: u64, card_id: u64, issuer: Issuer, seconds_offline: u64) -> Tap {
        Tap {
            sequence,
            card_id,
            issuer,
            kind: TapKind::Flat,
            line: 1,
            stop: 0,
            gate_time_ms: HEARD + seconds_offline * 1000,
        }
    }

    #[test]
    fn a_gate_approves_offline_only_within_its_rules_and_keeps_what_it_approved() {
        let mut gate = GateOffline::new(2);
        let mut list = GateDenyList::default();
        list.apply_changes(&DenyChanges {
            first_version: 1,
            history: 1,
            entries: vec![DenyEntry {
                card_id: 9,
                reason: Reason::CardLost,
            }],
        })
        .unwrap();
        let ssc = Issuer::ChongqingSsc;
        assert_eq!(
            gate.decide(tap(1, 1, ssc, 1), 200, &list),
            Err(OfflineRefusal::NoRules)
        );
        gate.set_rules(OfflineRules {
            issuers: IssuerSet::of(&[ssc]),
            max_fare_fen: 700,
            max_offline_s: 60,
        });
        gate.heard(HEARD);
        let refused = [
            (
                tap(1, 9, ssc, 1),
                200,
                OfflineRefusal::Listed(Reason::CardLost),
            ),
            (
                tap(1, 1, Issuer::TUnion, 1),
                200,
                OfflineRefusal::IssuerNotAllowed,
            ),
            (tap(1, 1, ssc, 1), 2000, OfflineRefusal::FareOverLimit),
            (tap(1, 1, ssc, 61), 200, OfflineRefusal::TooLong),
        ];
        for (t, fare, why) in refused {
            assert_eq!(gate.decide(t, fare, &list), Err(why));
        }
        assert_eq!(gate.decide(tap(1, 1, ssc, 5), 200, &list), Ok(()));
        assert_eq!(gate.decide(tap(2, 2, ssc, 6), 200, &list), Ok(()));
        assert_eq!(
            gate.decide(tap(3, 3, ssc, 7), 200, &list),
            Err(OfflineRefusal::StoreFull)
        );
        let first = gate.next_upload().unwrap();
        assert_eq!(
            (
                first.tap.sequence,
                first.deny_version,
                first.deny_history,
                first.offline_since_ms
            ),
            (1, 1, 1, HEARD)
        );
        gate.requeue(first, 3);
        let order: Vec<u64> = std::iter::from_fn(|| gate.next_upload())
            .map(|u| u.tap.sequence)
            .collect();
        assert_eq!(order, [2, 3]);
    }
}

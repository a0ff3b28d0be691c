//! Taps a gate approved while it had no link, uploaded later (PROTOCOL.md section 4.7): what
//! each is recorded as, which offline rule it broke, and the receipt the gate is sent.
//!
//! Pure: the server brings the online decision for the tap, the deny list's answer for the
//! version the gate held, and the policy.

use crate::decide::Decision;
use crate::policy::Policy;
use tapgate_protocol::{
    Concession, Mode, OfflineReceipt, OfflineRules, OfflineStatus, OfflineTap, Outcome,
    RIDES_LEFT_NOT_APPLICABLE, Reason, TapResult,
};

/// What an uploaded tap is recorded as. The rider has ridden, so it is an approval whatever
/// the online decision says: at that decision's fare and concession when it approves, and at
/// the mode's full fare without a concession when it would have refused. Its reason is the
/// flag: the first offline rule the tap broke, or why it cannot be charged as usual.
///
/// `listed` is the card's entry on the deny list at the version the gate held (`None` when it
/// was not on it).
pub fn recorded_as(
    upload: &OfflineTap,
    decision: Decision,
    mode: Mode,
    listed: Option<Reason>,
    policy: &Policy,
) -> Decision {
    let reason = flag(upload, decision.reason, mode, listed, policy);
    if decision.outcome == Outcome::Approve {
        return Decision { reason, ..decision };
    }
    Decision {
        outcome: Outcome::Approve,
        reason,
        concession: Concession::None,
        pay_percent: 100,
        fare_fen: policy.fares.flat_or_min(mode),
        rides_left: RIDES_LEFT_NOT_APPLICABLE,
        counted_ride: None,
        repeat_boarding: false,
        activity: decision.activity,
    }
}

/// The rule an uploaded tap broke, in the order PROTOCOL.md section 4.7 lists them, then a card
/// that cannot be charged as usual; `Approved` for none. A card listed after the version the
/// gate held is no broken rule: the gate could not have known.
pub fn flag(
    upload: &OfflineTap,
    online_reason: Reason,
    mode: Mode,
    listed: Option<Reason>,
    policy: &Policy,
) -> Reason {
    let rules: &OfflineRules = &policy.offline;
    let offline_ms = upload
        .tap
        .gate_time_ms
        .saturating_sub(upload.offline_since_ms);
    if let Some(reason) = listed {
        reason
    } else if !rules.issuers.contains(upload.tap.issuer) {
        Reason::IssuerNotAccepted
    } else if offline_ms > u64::from(rules.max_offline_s) * 1000 {
        Reason::OfflineTooLong
    } else if policy.fares.flat_or_min(mode) > rules.max_fare_fen {
        Reason::OfflineFareOverLimit
    } else if matches!(
        online_reason,
        Reason::UnknownCard | Reason::DirectoryUnavailable
    ) {
        online_reason
    } else {
        Reason::Approved
    }
}

/// The receipt for an upload whose answer is `answer`; `already` when the upload was a resend.
pub fn receipt(answer: TapResult, already: bool) -> OfflineReceipt {
    if answer.outcome == Outcome::Busy {
        return OfflineReceipt {
            sequence: answer.sequence,
            status: OfflineStatus::Busy,
            flag: Reason::Approved,
            fare_fen: 0,
        };
    }
    OfflineReceipt {
        sequence: answer.sequence,
        status: if already {
            OfflineStatus::Already
        } else {
            OfflineStatus::Recorded
        },
        flag: answer.reason,
        fare_fen: answer.fare_fen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::CardActivity;
    use tapgate_protocol::{Issuer, Tap, TapKind};

    const TAPPED: u64 = 1_795_939_200_000;

    fn upload(issuer: Issuer, offline_for_s: u64) -> OfflineTap {
        OfflineTap {
            tap: Tap {
                sequence: 7,
                card_id: 42,
                issuer,
                kind: TapKind::Flat,
                line: 3,
                stop: 0,
                gate_time_ms: TAPPED,
            },
            deny_version: 10,
            deny_history: 10,
            offline_since_ms: TAPPED - offline_for_s * 1000,
        }
    }

    fn decision(outcome: Outcome, reason: Reason) -> Decision {
        Decision {
            outcome,
            reason,
            concession: Concession::Elder,
            pay_percent: 0,
            fare_fen: 0,
            rides_left: 1_199,
            counted_ride: None,
            repeat_boarding: false,
            activity: CardActivity::default(),
        }
    }

    fn policy() -> Policy {
        Policy::embedded_default()
    }

    #[test]
    fn a_tap_within_the_rules_keeps_its_online_terms_unflagged() {
        let recorded = recorded_as(
            &upload(Issuer::ChongqingSsc, 60),
            decision(Outcome::Approve, Reason::Approved),
            Mode::Bus,
            None,
            &policy(),
        );
        assert_eq!(
            recorded,
            decision(Outcome::Approve, Reason::Approved),
            "an elder's free ride stays free"
        );
    }

    #[test]
    fn a_card_the_gate_held_as_listed_is_flagged_and_charged_the_full_fare() {
        let p = policy();
        let recorded = recorded_as(
            &upload(Issuer::ChongqingSsc, 60),
            decision(Outcome::Deny, Reason::CardLost),
            Mode::Bus,
            Some(Reason::CardLost),
            &p,
        );
        assert_eq!(
            (recorded.outcome, recorded.reason, recorded.concession),
            (Outcome::Approve, Reason::CardLost, Concession::None)
        );
        assert_eq!(
            (recorded.fare_fen, recorded.pay_percent),
            (p.fares.bus, 100)
        );
    }

    #[test]
    fn a_card_listed_after_the_gates_version_is_charged_but_not_flagged() {
        let recorded = recorded_as(
            &upload(Issuer::ChongqingSsc, 60),
            decision(Outcome::Deny, Reason::CardLost),
            Mode::Bus,
            None,
            &policy(),
        );
        assert_eq!(
            (recorded.outcome, recorded.reason),
            (Outcome::Approve, Reason::Approved)
        );
    }

    #[test]
    fn each_rule_is_flagged_in_the_documented_order() {
        let p = policy();
        let rules = p.offline;
        let outside = Issuer::ALL
            .iter()
            .copied()
            .find(|i| !rules.issuers.contains(*i))
            .expect("the shipped rules leave an issuer out");
        let too_long = u64::from(rules.max_offline_s) + 1;
        let ok = Reason::Approved;
        let cases = [
            (
                outside,
                too_long,
                Mode::Cableway,
                Some(Reason::CardBlocked),
                Reason::CardBlocked,
            ),
            (
                outside,
                too_long,
                Mode::Cableway,
                None,
                Reason::IssuerNotAccepted,
            ),
            (
                Issuer::ChongqingSsc,
                too_long,
                Mode::Cableway,
                None,
                Reason::OfflineTooLong,
            ),
            (
                Issuer::ChongqingSsc,
                60,
                Mode::Cableway,
                None,
                Reason::OfflineFareOverLimit,
            ),
            (Issuer::ChongqingSsc, 60, Mode::Bus, None, ok),
        ];
        for (issuer, offline_for, mode, listed, expected) in cases {
            let got = flag(&upload(issuer, offline_for), ok, mode, listed, &p);
            assert_eq!(
                got, expected,
                "{issuer:?}, {offline_for} s, {mode:?}, {listed:?}"
            );
        }
        assert_eq!(
            flag(
                &upload(Issuer::ChongqingSsc, 60),
                Reason::UnknownCard,
                Mode::Bus,
                None,
                &p
            ),
            Reason::UnknownCard
        );
        assert_eq!(
            flag(
                &upload(Issuer::ChongqingSsc, 60),
                Reason::PassBack,
                Mode::Metro,
                None,
                &p
            ),
            ok,
            "a refusal the gate could not foresee is no broken rule"
        );
    }

    #[test]
    fn receipts_say_recorded_already_or_busy() {
        let answer = TapResult {
            sequence: 7,
            outcome: Outcome::Approve,
            reason: Reason::CardLost,
            concession: Concession::None,
            fare_fen: 200,
            rides_left: RIDES_LEFT_NOT_APPLICABLE,
        };
        assert_eq!(receipt(answer, false).status, OfflineStatus::Recorded);
        assert_eq!(
            receipt(answer, true),
            OfflineReceipt {
                sequence: 7,
                status: OfflineStatus::Already,
                flag: Reason::CardLost,
                fare_fen: 200
            }
        );
        let busy = crate::session::busy(7);
        assert_eq!(receipt(busy, true).status, OfflineStatus::Busy);
    }
}

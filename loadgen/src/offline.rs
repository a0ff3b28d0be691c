//! Gates that lose their link for a while in a load run (`--offline`), as a bus validator does
//! in a tunnel or a rural dead zone: they go on deciding taps by the gateway's offline rules,
//! keep what they approved, and once the link is back upload it before any new tap
//! (PROTOCOL.md section 4.7).

use crate::report::OfflineRidden;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tapgate_protocol::{
    GateDenyList, GateOffline, Mode, OfflineReceipt, OfflineRefusal, OfflineStatus, OfflineTap,
    Reason, Tap,
};

/// Offline taps a load gate keeps at most: far more than a gate of the load taps in a spell.
const KEPT_BOUND: usize = 100_000;

/// The full fare each mode's gates are set up with, as a vendor sets up a gate: the shipped
/// policy's estimates. Offline, the rules refuse modes whose fare is above their limit.
fn full_fare(mode: Mode) -> u32 {
    match mode {
        Mode::Bus | Mode::Ferry | Mode::Metro => 200,
        Mode::Cableway => 2_000,
        Mode::IntercityRail => 1_000,
    }
}

/// Where a gate's link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Up, and lost at this instant.
    UpUntil(Instant),
    /// Lost, and back at this instant.
    DownUntil(Instant),
    /// Back for the rest of the run.
    Back,
}

/// What a receipt did.
pub(crate) enum Receipted {
    /// The gateway holds the tap.
    Held,
    /// Busy: the tap is kept again and has taken the gate's next sequence.
    KeptAgain,
    /// No upload of this gate has that sequence.
    NoSuchUpload,
}

/// One gate's offline riding.
pub(crate) struct OfflineGate {
    link: Link,
    down_for: Duration,
    /// Times the link is still to be lost after the one under way or coming.
    spells_after: u32,
    store: GateOffline,
    /// Uploads sent and not yet given a receipt, by sequence.
    uploading: HashMap<u64, OfflineTap>,
    pub(crate) ridden: OfflineRidden,
    /// Times the link has been lost so far.
    spells_lost: usize,
    /// By spell: the first upload sent after it and the last receipt.
    pub(crate) upload_windows: UploadWindows,
}

/// By spell offline: when the first upload of what it kept was sent and the last receipt came.
pub(crate) type UploadWindows = Vec<Option<(Instant, Instant)>>;

/// Joins two gates' upload windows, spell by spell.
pub(crate) fn merge_windows(into: &mut UploadWindows, other: &UploadWindows) {
    if into.len() < other.len() {
        into.resize(other.len(), None);
    }
    for (mine, theirs) in into.iter_mut().zip(other) {
        *mine = match (*mine, *theirs) {
            (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
            (a, b) => a.or(b),
        };
    }
}

/// How long uploading took in all: the windows of the spells added up, so the time online
/// between spells is not counted.
pub(crate) fn upload_seconds(windows: &UploadWindows) -> Option<f64> {
    windows
        .iter()
        .flatten()
        .map(|(first, last)| (*last - *first).as_secs_f64())
        .reduce(|a, b| a + b)
}

impl OfflineGate {
    /// A gate whose link goes at `goes`, for `down_for`, `spells` times: each time after it
    /// came back, once it has been up as long.
    pub(crate) fn new(goes: Instant, down_for: Duration, spells: u32) -> Self {
        OfflineGate {
            link: Link::UpUntil(goes),
            down_for,
            spells_after: spells.saturating_sub(1),
            store: GateOffline::new(KEPT_BOUND),
            uploading: HashMap::new(),
            ridden: OfflineRidden {
                gates: 1,
                ..OfflineRidden::default()
            },
            spells_lost: 0,
            upload_windows: Vec::new(),
        }
    }

    /// The upload window of the spell whose taps go up now.
    fn window(&mut self, now: Instant) -> &mut (Instant, Instant) {
        let spell = self.spells_lost.saturating_sub(1);
        if self.upload_windows.len() <= spell {
            self.upload_windows.resize(spell + 1, None);
        }
        self.upload_windows[spell].get_or_insert((now, now))
    }

    /// Whether the link has just been lost: the caller closes its connection.
    pub(crate) fn loses_link(&mut self, now: Instant) -> bool {
        match self.link {
            Link::UpUntil(goes) if now >= goes => {
                self.link = Link::DownUntil(now + self.down_for);
                self.spells_lost += 1;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn is_down(&self) -> bool {
        matches!(self.link, Link::DownUntil(_))
    }

    /// When the lost link comes back.
    pub(crate) fn back_at(&self) -> Option<Instant> {
        match self.link {
            Link::DownUntil(back) => Some(back),
            _ => None,
        }
    }

    /// The link is back (the caller has reconnected) at `now`.
    pub(crate) fn link_back(&mut self, now: Instant) {
        self.link = if self.spells_after > 0 {
            self.spells_after -= 1;
            Link::UpUntil(now + self.down_for)
        } else {
            Link::Back
        };
    }

    /// A frame from the gateway arrived.
    pub(crate) fn heard(&mut self, now_ms: u64) {
        self.store.heard(now_ms);
    }

    pub(crate) fn set_rules(&mut self, rules: tapgate_protocol::OfflineRules) {
        self.store.set_rules(rules);
    }

    /// Decides a tap offline; whether it was approved (and so took its sequence).
    pub(crate) fn decide(&mut self, tap: Tap, mode: Mode, list: &GateDenyList) -> bool {
        match self.store.decide(tap, full_fare(mode), list) {
            Ok(()) => {
                self.ridden.approved += 1;
                true
            }
            Err(refusal) => {
                let why = match refusal {
                    OfflineRefusal::Listed(reason) => reason.label(),
                    other => other.label(),
                };
                *self.ridden.refused.entry(why.to_owned()).or_default() += 1;
                false
            }
        }
    }

    /// Whether kept taps wait to be uploaded: until they have gone, new taps wait.
    pub(crate) fn has_kept(&self) -> bool {
        !self.is_down() && self.store.kept() > 0
    }

    /// The next kept tap to upload, counted as in flight until its receipt.
    pub(crate) fn next_upload(&mut self, now: Instant) -> Option<OfflineTap> {
        let upload = self.store.next_upload()?;
        self.uploading.insert(upload.tap.sequence, upload);
        self.window(now).1 = now;
        Some(upload)
    }

    /// Takes a receipt. A `busy` one's tap is kept again under `next_sequence`.
    pub(crate) fn receipt(
        &mut self,
        receipt: &OfflineReceipt,
        next_sequence: u64,
        now: Instant,
    ) -> Receipted {
        let Some(upload) = self.uploading.remove(&receipt.sequence) else {
            return Receipted::NoSuchUpload;
        };
        self.window(now).1 = now;
        let r = &mut self.ridden;
        match receipt.status {
            OfflineStatus::Recorded => r.recorded += 1,
            OfflineStatus::Already => r.already += 1,
            OfflineStatus::Busy => {
                r.busy += 1;
                self.store.requeue(upload, next_sequence);
                return Receipted::KeptAgain;
            }
        }
        if receipt.flag != Reason::Approved {
            *r.flagged
                .entry(receipt.flag.label().to_owned())
                .or_default() += 1;
        }
        Receipted::Held
    }

    /// The run is over: what was never uploaded is counted.
    pub(crate) fn finish(&mut self) {
        self.ridden.not_uploaded = (self.store.kept() + self.uploading.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_of_two_spells_loses_its_link_again_once_back_as_long_and_then_keeps_it() {
        let start = Instant::now();
        let spell = Duration::from_secs(2);
        let mut gate = OfflineGate::new(start + spell, spell, 2);
        assert!(!gate.loses_link(start));
        assert!(gate.loses_link(start + spell));
        assert_eq!(gate.back_at(), Some(start + spell * 2));
        gate.link_back(start + spell * 2);
        assert!(!gate.loses_link(start + spell * 3 - Duration::from_millis(1)));
        assert!(gate.loses_link(start + spell * 3));
        gate.link_back(start + spell * 4);
        assert!(!gate.is_down());
        assert!(!gate.loses_link(start + spell * 100));
    }

    #[test]
    fn uploading_time_adds_up_each_spells_window_across_gates_and_not_the_time_between() {
        let start = Instant::now();
        let span = |from: u64, to: u64| {
            Some((
                start + Duration::from_millis(from),
                start + Duration::from_millis(to),
            ))
        };
        // Gate A uploaded after both spells, gate B only after the second.
        let mut windows = vec![span(1_000, 1_100), span(5_000, 5_050)];
        merge_windows(&mut windows, &vec![None, span(5_020, 5_200)]);
        assert_eq!(windows, vec![span(1_000, 1_100), span(5_000, 5_200)]);
        let seconds = upload_seconds(&windows).unwrap();
        assert!((seconds - 0.3).abs() < 1e-9, "{seconds}");
        assert_eq!(upload_seconds(&Vec::new()), None);
    }
}

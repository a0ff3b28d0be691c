//! The referee's version 2 (PROTOCOL.md sections 4.6 and 4.7): it keeps a deny list of its own
//! that gains a change on every version-2 connection, sends each gate the rules, the list and
//! its changes, and checks what the gate acknowledges and what it uploads from riding offline.
//!
//! On every version-2 connection, once the gate's first DenyAck has come: the OfflineRules,
//! then what the gate lacks (the whole list, in small parts, for a new gate and on every third
//! connection; the changes since its version otherwise), then one new change. On the connection of the `OutOfStep` stage the
//! new change is numbered one past the next version instead, and the gate must close. The first
//! upload a gate makes is answered `busy`, and it must come again under a new sequence.
//!
//! Rule 3 (the fare limit) is checked last, as a gate can only be seen breaking it: once the
//! gate has shown everything else here, it is sent rules that allow no fare offline, and a
//! gate keeping them approves nothing offline from then on. When it comes back from a spell
//! away, it must have nothing decided under them to upload.

use super::{Action, Answer, ConnectionId, Plan, Referee, Rule};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeSet, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use tapgate_protocol::{
    DenyAck, DenyChanges, DenyEntry, DenyList, ErrorCode, Frame, MAX_DENY_ENTRIES, OfflineReceipt,
    OfflineRules, OfflineStatus, OfflineTap, OpenError, Reason, SealedFrame, Tap, seal,
};

/// Cards in one part of a whole list: small, so a gate is made to join parts.
const LIST_PART: usize = 3;
/// Changes the referee's list takes at most; beyond, connections add none.
const MAX_CHANGES: usize = 10_000;
/// Uploads remembered per gate, to tell one uploaded again under a new sequence.
const REMEMBERED_UPLOADS: usize = 4096;
/// Every this many version-2 connections of a gate, the whole list is sent whatever it holds.
const WHOLE_LIST_EVERY: u64 = 3;
/// Every this many changes, one takes a card off the list rather than putting one on.
const TAKE_OFF_EVERY: usize = 4;
/// Where the referee's own cards are numbered from, when a gate has tapped none to list.
const LISTED_CARDS: u64 = 6_299_000_000_000_000;
/// How long a gate holding rules that allow no fare must have been away for its return to
/// show rule 3 kept: a gate tapping riders through that long decided some of them offline.
const AWAY_TO_JUDGE_MS: u64 = 1_000;

/// Where a gate stands with the rules that allow no fare offline.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum NoFareRules {
    #[default]
    NotSent,
    /// Sent on this connection ahead of the deny-list step ending at `version`.
    Sent {
        connection: ConnectionId,
        version: u64,
    },
    /// The gate acknowledged that step on this connection, so it has read the rules.
    Read { connection: ConnectionId },
    /// A new Tap followed on that connection: every tap kept from before was uploaded ahead
    /// of it, so any later upload was approved under these rules.
    Held,
}

/// The referee's deny list: every change since version 0, entry `i` making version `i + 1`,
/// and the history each makes, which gates must echo.
#[derive(Debug, Default)]
pub(super) struct ListHistory {
    changes: Vec<DenyEntry>,
    histories: Vec<u64>,
}

impl ListHistory {
    fn version(&self) -> u64 {
        self.changes.len() as u64
    }

    /// The history at `version` (0 for the empty list, as a new gate holds it); `None` past
    /// the newest version.
    fn history(&self, version: u64) -> Option<u64> {
        match version {
            0 => Some(0),
            _ => self.histories.get(version as usize - 1).copied(),
        }
    }

    /// Whether a gate holding `held` holds one of this list's versions as it was sent.
    fn holds(&self, held: DenyAck) -> bool {
        self.history(held.version) == Some(held.history)
    }

    /// The card's entry on the list at `version`.
    fn listed_at(&self, card_id: u64, version: u64) -> Option<Reason> {
        self.changes
            .iter()
            .take(version as usize)
            .rev()
            .find(|e| e.card_id == card_id)
            .filter(|e| e.denies())
            .map(|e| e.reason)
    }

    /// The cards on the list now, by card.
    fn whole(&self) -> Vec<DenyEntry> {
        let mut cards = std::collections::BTreeMap::new();
        for entry in &self.changes {
            if entry.denies() {
                cards.insert(entry.card_id, entry.reason);
            } else {
                cards.remove(&entry.card_id);
            }
        }
        cards
            .into_iter()
            .map(|(card_id, reason)| DenyEntry { card_id, reason })
            .collect()
    }

    /// One change more: `card` listed, or, every few changes, the oldest card listed taken off.
    fn change(&mut self, card: u64) -> Option<DenyEntry> {
        if self.changes.len() >= MAX_CHANGES {
            return None;
        }
        let entry = if (self.changes.len() + 1).is_multiple_of(TAKE_OFF_EVERY)
            && let Some(oldest) = self.whole().first().copied()
        {
            DenyEntry {
                card_id: oldest.card_id,
                reason: Reason::Approved,
            }
        } else {
            const REASONS: [Reason; 3] =
                [Reason::CardLost, Reason::CardBlocked, Reason::CardCancelled];
            DenyEntry {
                card_id: card,
                reason: REASONS[self.changes.len() % REASONS.len()],
            }
        };
        let history = chain(self.history(self.version()).unwrap_or(0), entry);
        self.changes.push(entry);
        self.histories.push(history);
        Some(entry)
    }
}

/// The history after `entry`, following `previous`.
fn chain(previous: u64, entry: DenyEntry) -> u64 {
    let mut digest = DefaultHasher::new();
    (previous, entry).hash(&mut digest);
    digest.finish()
}

/// What a gate's uploads are checked against, across its connections.
#[derive(Debug, Default)]
pub(super) struct GateFollowing {
    /// The version the gate last acknowledged: what its next DenyAck must name, or a later
    /// version it was sent.
    acked: u64,
    /// Versions a step sent to the gate ended at, above `acked`: what it may hold.
    sent: BTreeSet<u64>,
    /// The last card the gate tapped online, to put on the list.
    last_card: Option<u64>,
    /// A whole step was acknowledged at least once.
    caught_up: bool,
    /// The out-of-step stage was kept (the gate closed).
    refused_out_of_step: bool,
    /// The upload answered busy (the gate's first), by what must come again; `None` again
    /// once it has.
    busy: Option<UploadBody>,
    /// Uploads recorded, to tell one uploaded again under a new sequence.
    recorded: HashSet<UploadBody>,
    uploads: u64,
    /// Version-2 connections that got as far as their DenyAck.
    connections: u64,
    no_fare: NoFareRules,
    /// The gate came back from a spell away under rules allowing no fare with nothing to
    /// upload.
    kept_fare_limit: bool,
    /// When the referee last received a frame from the gate, after a Hello.
    last_heard_ms: Option<u64>,
}

impl GateFollowing {
    /// An online tap of `card_id`: the card the next change puts on the list.
    pub(super) fn tapped(&mut self, card_id: u64) {
        self.last_card = Some(card_id);
    }

    /// Everything version 2 asks a gate to show before it has completed the script.
    pub(super) fn done(&self) -> bool {
        self.showed_all_but_fare_limit() && self.kept_fare_limit
    }

    fn showed_all_but_fare_limit(&self) -> bool {
        self.caught_up && self.refused_out_of_step && self.uploads > 0 && self.busy.is_none()
    }

    /// What a gate that has not completed the script never showed, for the report.
    pub(super) fn missing(&self) -> Vec<(Rule, &'static str)> {
        let mut missing = Vec::new();
        if self.busy.is_some() {
            missing.push((
                Rule::BusyUploadAgain,
                "never uploaded again the tap answered busy",
            ));
        }
        missing
    }
}

/// An upload without its sequence: what stays the same when it is uploaded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct UploadBody(OfflineTap);

impl From<&OfflineTap> for UploadBody {
    fn from(upload: &OfflineTap) -> Self {
        UploadBody(OfflineTap {
            tap: Tap {
                sequence: 0,
                ..upload.tap
            },
            ..*upload
        })
    }
}

/// Where one version-2 connection stands with the list.
#[derive(Debug, Default)]
pub(super) struct ConnectionFollowing {
    /// The gate's first DenyAck has come.
    started: bool,
    /// Versions the steps sent on this connection end at.
    points: BTreeSet<u64>,
    /// The gate's last acknowledgement on this connection.
    acked: u64,
    /// The version a change numbered out of step would make, once sent.
    out_of_step: Option<u64>,
    /// A new Tap came: uploads after it are out of order.
    tapped_new: bool,
    /// How long the gate had been silent when its first frame after the Hello came.
    away_ms: Option<u64>,
    /// An upload came that was approved under rules allowing no fare.
    broke_fare_limit: bool,
}

impl Referee {
    fn gate_following(&mut self, terminal_id: u64) -> &mut GateFollowing {
        &mut self
            .terminals
            .get_mut(&terminal_id)
            .expect("known")
            .following
    }

    /// Any frame after the Hello on a version-2 connection, at `now_ms`: for how long the gate
    /// was away before this connection.
    pub(super) fn heard(&mut self, id: ConnectionId, terminal_id: u64, now_ms: u64) {
        let gate = self.gate_following(terminal_id);
        let away = gate
            .last_heard_ms
            .map_or(0, |last| now_ms.saturating_sub(last));
        gate.last_heard_ms = Some(now_ms);
        let connection = self.connections.get_mut(&id).expect("open");
        let following = connection.following.as_mut().expect("version 2");
        following.away_ms.get_or_insert(away);
    }

    /// A new Tap on a version-2 connection. The first on a connection after a spell away under
    /// rules allowing no fare, with no upload approved under them, shows rule 3 kept. A gate
    /// that has shown the rest of version 2 is sent those rules now.
    pub(super) fn tapped_new(
        &mut self,
        id: ConnectionId,
        terminal_id: u64,
        actions: &mut Vec<Action>,
    ) {
        let connection = self.connections.get_mut(&id).expect("open");
        let following = connection.following.as_mut().expect("version 2");
        let first = !std::mem::replace(&mut following.tapped_new, true);
        let came_back_clean =
            !following.broke_fare_limit && following.away_ms.unwrap_or(0) >= AWAY_TO_JUDGE_MS;
        let gate = self.gate_following(terminal_id);
        match gate.no_fare {
            NoFareRules::Held if first && came_back_clean => {
                gate.kept_fare_limit = true;
                self.pass(Rule::FareLimitKept);
            }
            NoFareRules::Read { connection } if connection == id => {
                gate.no_fare = NoFareRules::Held;
            }
            NoFareRules::NotSent if gate.showed_all_but_fare_limit() => {
                // `sent` names the step the rules go ahead of.
                gate.no_fare = NoFareRules::Sent {
                    connection: id,
                    version: u64::MAX,
                };
                let mut frames = vec![Frame::OfflineRules(self.rules_for(terminal_id))];
                let mut points = Vec::new();
                self.new_change(terminal_id, &mut frames, &mut points);
                self.sent(id, terminal_id, frames, points, actions);
                self.notices.push(format!(
                    "terminal {terminal_id} was sent rules with max_fare_fen 0 (rule 3): take its link away again for {} s or more while riders tap",
                    AWAY_TO_JUDGE_MS / 1000
                ));
            }
            _ => {}
        }
    }

    /// The rules a gate is sent: the configured ones, or, once it has been sent rules allowing
    /// no fare, those.
    fn rules_for(&self, terminal_id: u64) -> OfflineRules {
        let rules = self.settings.offline_rules;
        match self.terminals[&terminal_id].following.no_fare {
            NoFareRules::NotSent => rules,
            _ => OfflineRules {
                max_fare_fen: 0,
                ..rules
            },
        }
    }

    /// A DenyAck on a version-2 connection.
    pub(super) fn deny_ack(
        &mut self,
        id: ConnectionId,
        terminal_id: u64,
        frame: &SealedFrame,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let key = self.terminals[&terminal_id].key.clone();
        let Ok(Frame::DenyAck(held)) = frame.open(&key) else {
            self.fail(
                Rule::TapAuthentic,
                format!("terminal {terminal_id}: a DenyAck that does not open"),
            );
            self.refuse_keyed(id, &key, ErrorCode::BadMac, 0, actions);
            return;
        };
        let connection = self.connections.get_mut(&id).expect("open");
        let following = connection
            .following
            .as_mut()
            .expect("a version-2 connection");
        if following.started {
            self.later_ack(id, terminal_id, held);
            return;
        }
        following.started = true;
        let gate = &self.terminals[&terminal_id].following;
        let acked = gate.acked;
        let version = held.version;
        if !(version == acked || gate.sent.contains(&version)) {
            self.fail(
                Rule::DenyAckHolds,
                format!(
                    "terminal {terminal_id} said it holds version {version}; it last acknowledged {acked}"
                ),
            );
        } else if !self.list.holds(held) {
            self.fail(
                Rule::DenyAckHolds,
                format!(
                    "terminal {terminal_id} said it holds version {version} with history {:016x}; it was sent {:016x}",
                    held.history,
                    self.list.history(version).unwrap_or(0)
                ),
            );
        } else {
            self.pass(Rule::DenyAckHolds);
        }
        self.send_list(id, terminal_id, version, now_ms, actions);
    }

    fn later_ack(&mut self, id: ConnectionId, terminal_id: u64, held: DenyAck) {
        let version = held.version;
        let connection = self.connections.get_mut(&id).expect("open");
        let following = connection
            .following
            .as_mut()
            .expect("a version-2 connection");
        if following.out_of_step == Some(version) {
            // Taken: the stage is failed, not passed when the connection closes.
            following.out_of_step = None;
            self.fail(
                Rule::RefusesOutOfStep,
                format!(
                    "terminal {terminal_id} acknowledged version {version}, from changes that did not follow its own"
                ),
            );
            return;
        }
        if !following.points.contains(&version) || version < following.acked {
            let before = following.acked;
            self.fail(
                Rule::AcksEachStep,
                format!(
                    "terminal {terminal_id} acknowledged version {version}, after {before}; no step it was sent ends there"
                ),
            );
            return;
        }
        if !self.list.holds(held) {
            self.fail(
                Rule::AcksEachStep,
                format!(
                    "terminal {terminal_id} acknowledged version {version} with history {:016x}, not the {:016x} it was sent",
                    held.history,
                    self.list.history(version).unwrap_or(0)
                ),
            );
            return;
        }
        following.acked = version;
        let caught_up = following.points.last() == Some(&version);
        let gate = self.gate_following(terminal_id);
        gate.acked = version;
        gate.sent.retain(|v| *v > version);
        if let NoFareRules::Sent {
            connection,
            version: ahead_of,
        } = gate.no_fare
            && connection == id
            && version >= ahead_of
        {
            gate.no_fare = NoFareRules::Read { connection };
        }
        if caught_up {
            gate.caught_up = true;
            self.pass(Rule::AcksEachStep);
        }
    }

    /// The rules, what the gate holding `held` lacks, and one change more (out of step on
    /// the connection of that stage).
    fn send_list(
        &mut self,
        id: ConnectionId,
        terminal_id: u64,
        held: u64,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let mut frames = vec![Frame::OfflineRules(self.rules_for(terminal_id))];
        let mut points = Vec::new();
        let version = self.list.version();
        let gate = self.gate_following(terminal_id);
        gate.connections += 1;
        // Every third connection gets the whole list all the same, as from a gateway that
        // loaded it again: the gate must take a list in parts while it holds one.
        let reload = gate.connections.is_multiple_of(WHOLE_LIST_EVERY);
        if held == 0 || held > version || reload {
            let whole = self.list.whole();
            let parts: Vec<&[DenyEntry]> = if whole.is_empty() {
                vec![&[]]
            } else {
                whole.chunks(LIST_PART).collect()
            };
            for (i, part) in parts.iter().enumerate() {
                frames.push(Frame::DenyList(DenyList {
                    version,
                    history: self.list.history(version).unwrap_or(0),
                    first: i == 0,
                    last: i + 1 == parts.len(),
                    entries: part.to_vec(),
                }));
            }
            points.push(version);
        } else {
            self.changes_after(held, &mut frames, &mut points);
        }
        let plan = self.connections[&id].plan;
        let terminal = self.terminals.get_mut(&terminal_id).expect("known");
        let card = terminal
            .following
            .last_card
            .unwrap_or(LISTED_CARDS + terminal_id);
        if plan == Plan::OutOfStep {
            terminal.stage = Plan::OutOfStep.next();
            let skipped = self.list.version() + 2;
            let entry = DenyEntry {
                card_id: card,
                reason: Reason::CardLost,
            };
            frames.push(Frame::DenyChanges(DenyChanges {
                first_version: skipped,
                history: chain(0, entry),
                entries: vec![entry],
            }));
            let connection = self.connections.get_mut(&id).expect("open");
            connection
                .following
                .as_mut()
                .expect("version 2")
                .out_of_step = Some(skipped);
            connection.deadline = Some(now_ms + self.settings.grace_ms);
        } else {
            self.new_change(terminal_id, &mut frames, &mut points);
        }
        self.sent(id, terminal_id, frames, points, actions);
    }

    /// One change more to the list, putting on the card the gate last tapped.
    fn new_change(&mut self, terminal_id: u64, frames: &mut Vec<Frame>, points: &mut Vec<u64>) {
        let following = &self.terminals[&terminal_id].following;
        let card = following.last_card.unwrap_or(LISTED_CARDS + terminal_id);
        if let Some(entry) = self.list.change(card) {
            frames.push(Frame::DenyChanges(DenyChanges {
                first_version: self.list.version(),
                history: self.list.history(self.list.version()).unwrap_or(0),
                entries: vec![entry],
            }));
            points.push(self.list.version());
        }
    }

    /// Writes `frames`, the first of them the rules, whose deny-list steps end at `points`.
    /// Rules allowing no fare that the gate has not shown it read are read once it
    /// acknowledges the last of these steps.
    fn sent(
        &mut self,
        id: ConnectionId,
        terminal_id: u64,
        frames: Vec<Frame>,
        points: Vec<u64>,
        actions: &mut Vec<Action>,
    ) {
        let terminal = self.terminals.get_mut(&terminal_id).expect("known");
        let following = &mut terminal.following;
        following.sent.extend(&points);
        if matches!(
            following.no_fare,
            NoFareRules::Sent { .. } | NoFareRules::Read { .. }
        ) {
            following.no_fare = NoFareRules::Sent {
                connection: id,
                version: points.last().copied().unwrap_or(u64::MAX),
            };
        }
        let key = terminal.key.clone();
        let connection = self.connections.get_mut(&id).expect("open");
        connection
            .following
            .as_mut()
            .expect("version 2")
            .points
            .extend(points);
        for frame in frames {
            let mut out = BytesMut::new();
            seal(&frame, &key, &mut out);
            actions.push(Action::Write(out.freeze()));
        }
    }

    /// The changes after `held`, in frames of at most [`MAX_DENY_ENTRIES`].
    fn changes_after(&self, held: u64, frames: &mut Vec<Frame>, points: &mut Vec<u64>) {
        let after = &self.list.changes[held as usize..];
        for (i, chunk) in after.chunks(MAX_DENY_ENTRIES).enumerate() {
            let first_version = held + 1 + (i * MAX_DENY_ENTRIES) as u64;
            let last_version = first_version + chunk.len() as u64 - 1;
            let changes = DenyChanges {
                first_version,
                history: self.list.history(last_version).unwrap_or(0),
                entries: chunk.to_vec(),
            };
            points.push(changes.last_version());
            frames.push(Frame::DenyChanges(changes));
        }
    }

    /// An OfflineTap on a version-2 connection: checked against the order, the rules and the
    /// list the gate held, and answered with a receipt at once, in the order uploads come.
    pub(super) fn offline_tap(
        &mut self,
        id: ConnectionId,
        terminal_id: u64,
        frame: &SealedFrame,
        actions: &mut Vec<Action>,
    ) {
        let key = self.terminals[&terminal_id].key.clone();
        let upload = match frame.open(&key) {
            Ok(Frame::OfflineTap(upload)) => upload,
            Ok(_) => unreachable!("an OfflineTap frame opens as one"),
            Err(e) => {
                let code = match e {
                    OpenError::BadMac(_) => ErrorCode::BadMac,
                    OpenError::Decode(_) => ErrorCode::MalformedFrame,
                };
                self.fail(
                    Rule::TapAuthentic,
                    format!("terminal {terminal_id}: an OfflineTap: {e}"),
                );
                self.refuse_keyed(id, &key, code, 0, actions);
                return;
            }
        };
        self.pass(Rule::TapAuthentic);
        let sequence = upload.tap.sequence;
        let bytes = super::frame_bytes(frame);
        if self.terminals[&terminal_id].seen.contains_key(&sequence) {
            self.upload_resent(id, terminal_id, sequence, &bytes, actions);
            return;
        }
        if !self.admit_new(id, terminal_id, sequence, bytes, actions) {
            return;
        }
        self.check_upload_order(id, terminal_id, sequence);
        self.check_offline_rules(terminal_id, &upload);
        self.check_fare_limit(id, terminal_id, &upload);
        let status = self.upload_status(terminal_id, &upload);
        let receipt = self.receipt(terminal_id, sequence, status);
        self.settle_answer(
            terminal_id,
            sequence,
            &receipt,
            status == OfflineStatus::Busy,
        );
        actions.push(Action::Write(receipt));
    }

    fn upload_resent(
        &mut self,
        id: ConnectionId,
        terminal_id: u64,
        sequence: u64,
        bytes: &Bytes,
        actions: &mut Vec<Action>,
    ) {
        let Some(previous) = self.resend_of(id, terminal_id, sequence, bytes, actions) else {
            return;
        };
        let busy = matches!(previous, Answer::Sent { busy: true, .. });
        if busy {
            self.fail(
                Rule::BusyUploadAgain,
                format!(
                    "terminal {terminal_id} uploaded {sequence} again under the same sequence after busy"
                ),
            );
        }
        let receipt = self.receipt(
            terminal_id,
            sequence,
            if busy {
                OfflineStatus::Busy
            } else {
                OfflineStatus::Already
            },
        );
        actions.push(Action::Write(receipt));
    }

    fn check_upload_order(&mut self, id: ConnectionId, terminal_id: u64, sequence: u64) {
        let following = self.connections[&id]
            .following
            .as_ref()
            .expect("a version-2 connection");
        if !following.started {
            self.fail(
                Rule::UploadsFirst,
                format!("terminal {terminal_id} uploaded {sequence} before its DenyAck"),
            );
        } else if following.tapped_new {
            self.fail(
                Rule::UploadsFirst,
                format!("terminal {terminal_id} uploaded {sequence} after a new Tap"),
            );
        } else {
            self.pass(Rule::UploadsFirst);
        }
    }

    fn check_offline_rules(&mut self, terminal_id: u64, upload: &OfflineTap) {
        let rules = self.settings.offline_rules;
        let (tap, held) = (upload.tap, upload.deny_version);
        let offline_ms = tap.gate_time_ms.checked_sub(upload.offline_since_ms);
        let broken = if held > self.list.version() {
            Some(format!(
                "names version {held}; the list is at {}",
                self.list.version()
            ))
        } else if !self.list.holds(upload.deny_held()) {
            Some(format!(
                "names version {held} with history {:016x}, which the list never had there",
                upload.deny_history
            ))
        } else if let Some(reason) = self.list.listed_at(tap.card_id, held) {
            Some(format!(
                "approved card {} though its list (version {held}) held it as {reason}",
                tap.card_id
            ))
        } else if !rules.issuers.contains(tap.issuer) {
            Some(format!("approved a card of {} offline", tap.issuer))
        } else if offline_ms.is_none_or(|ms| ms > u64::from(rules.max_offline_s) * 1000) {
            Some(format!(
                "approved a tap {} ms after it last heard from a gateway; the rules allow {} s",
                offline_ms.map_or_else(|| "before".into(), |ms| ms.to_string()),
                rules.max_offline_s
            ))
        } else {
            None
        };
        match broken {
            Some(detail) => self.fail(
                Rule::OfflineKeepsRules,
                format!("terminal {terminal_id} tap {}: {detail}", tap.sequence),
            ),
            None => self.pass(Rule::OfflineKeepsRules),
        }
    }

    /// Rule 3 with rules allowing no fare: a new upload approved while the gate held them
    /// breaks it. One it uploads again (after `busy`) was approved before.
    fn check_fare_limit(&mut self, id: ConnectionId, terminal_id: u64, upload: &OfflineTap) {
        let body = UploadBody::from(upload);
        let gate = &self.terminals[&terminal_id].following;
        if gate.no_fare != NoFareRules::Held
            || gate.busy == Some(body)
            || gate.recorded.contains(&body)
        {
            return;
        }
        let connection = self.connections.get_mut(&id).expect("open");
        connection
            .following
            .as_mut()
            .expect("version 2")
            .broke_fare_limit = true;
        self.fail(
            Rule::FareLimitKept,
            format!(
                "terminal {terminal_id} approved tap {} offline under rules with max_fare_fen 0",
                upload.tap.sequence
            ),
        );
    }

    /// `busy` for the gate's first upload; a tap answered busy coming again under a new
    /// sequence passes, one recorded coming again fails.
    fn upload_status(&mut self, terminal_id: u64, upload: &OfflineTap) -> OfflineStatus {
        let body = UploadBody::from(upload);
        let gate = self.gate_following(terminal_id);
        gate.uploads += 1;
        if gate.uploads == 1 {
            gate.busy = Some(body);
            return OfflineStatus::Busy;
        }
        let again = gate.busy == Some(body);
        let recorded_before = gate.recorded.contains(&body);
        if again {
            gate.busy = None;
        }
        if gate.recorded.len() < REMEMBERED_UPLOADS {
            gate.recorded.insert(body);
        }
        if again {
            self.pass(Rule::BusyUploadAgain);
        } else if recorded_before {
            self.fail(
                Rule::BusyUploadAgain,
                format!(
                    "terminal {terminal_id} uploaded again, as {}, a tap already recorded",
                    upload.tap.sequence
                ),
            );
        }
        OfflineStatus::Recorded
    }

    fn receipt(&self, terminal_id: u64, sequence: u64, status: OfflineStatus) -> Bytes {
        let receipt = OfflineReceipt {
            sequence,
            status,
            flag: Reason::Approved,
            fare_fen: if status == OfflineStatus::Busy {
                0
            } else {
                200
            },
        };
        let mut out = BytesMut::new();
        seal(
            &Frame::OfflineReceipt(receipt),
            &self.terminals[&terminal_id].key,
            &mut out,
        );
        out.freeze()
    }

    /// The out-of-step stage's verdict when its connection closes: kept when the gate closed
    /// it without taking the change.
    pub(super) fn out_of_step_closed(
        &mut self,
        terminal_id: u64,
        following: &ConnectionFollowing,
        ended_by_referee: bool,
    ) {
        if following.out_of_step.is_none() || ended_by_referee {
            return;
        }
        if let Some(terminal) = self.terminals.get_mut(&terminal_id) {
            terminal.following.refused_out_of_step = true;
        }
        self.pass(Rule::RefusesOutOfStep);
    }
}

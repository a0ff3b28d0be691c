//! The strict gateway of `tapgate conformance gate`, as a state machine without I/O: it is fed
//! what a gate sends (bytes, the end of its stream, the end of its connection) and the time,
//! and returns what to send back. It answers by a script that takes every gate it meets
//! through the situations PROTOCOL.md gives rules for, and records, per rule, whether the gate
//! kept it.
//!
//! The script, by the gate's connection count (Hellos it has said):
//! 0. normal: its fresh taps get approve, each deny reason 1–8 and busy, in turn; the eleventh
//!    gets an answer with a corrupted tag, which the gate must not take (it resends the tap);
//!    on version 2 only, the next connection is sent deny-list changes that skip a version,
//!    and the gate must close it ([`version_2`] has the rest of version 2);
//! 1. a HelloAck echoing the wrong nonce: the gate must close without tapping;
//! 2. a HelloAck with a corrupted tag: the same;
//! 3. an unkeyed Error `internal` for the Hello (refused): the gate must come back later;
//! 4. a HelloAck announcing `last_sequence` 1000 above anything the gate has used: its fresh taps
//!    must continue above it; the fourth fresh tap is left unanswered and the connection closed
//!    with Error `shutting_down`;
//! 5. one connection per Error code the gateway sends as a frame (17): each closes with that
//!    code, its first fresh tap left unanswered, which the gate must resend on the next;
//! 6. normal: the gate must resend what was left unanswered, byte for byte; after two fresh
//!    taps and no tap still owed, the gate has completed the script.
//!
//! Answers are held for a configured delay and written newest first, so a gate that pipelines
//! gets them out of order, as section 1 allows.

mod version_2;

use super::{Check, Verdict};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use tapgate_protocol::{
    Concession, ErrorCode, ErrorFrame, Frame, FrameType, Hello, HelloAck, MacKey, MasterKey, Mode,
    OfflineRules, OpenError, Outcome, Reason, TapKind, TapResult, Version, seal,
    seal_unkeyed_error, take_frame,
};
use version_2::{ConnectionFollowing, GateFollowing, ListHistory};

/// The rules the referee checks, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    HelloFirst,
    NonceFresh,
    RefusesWrongNonce,
    RefusesBadAckTag,
    TapAuthentic,
    TapKindFitsMode,
    SequencesIncrease,
    ContinuesAboveLastSequence,
    WithinMaxInFlight,
    ResendIdentical,
    ResendsAfterError,
    BadTagAnswerNotTaken,
    BusyNotResent,
    EveryOutcomeHandled,
    ReconnectsAfterRefusal,
    EveryErrorHandled,
    DenyAckHolds,
    AcksEachStep,
    RefusesOutOfStep,
    UploadsFirst,
    OfflineKeepsRules,
    BusyUploadAgain,
    FareLimitKept,
}

pub const RULES: [Rule; 16] = [
    Rule::HelloFirst,
    Rule::NonceFresh,
    Rule::RefusesWrongNonce,
    Rule::RefusesBadAckTag,
    Rule::TapAuthentic,
    Rule::TapKindFitsMode,
    Rule::SequencesIncrease,
    Rule::ContinuesAboveLastSequence,
    Rule::WithinMaxInFlight,
    Rule::ResendIdentical,
    Rule::ResendsAfterError,
    Rule::BadTagAnswerNotTaken,
    Rule::BusyNotResent,
    Rule::EveryOutcomeHandled,
    Rule::ReconnectsAfterRefusal,
    Rule::EveryErrorHandled,
];

/// The rules of version 2, checked when the gate under test claims it.
pub const RULES_V2: [Rule; 7] = [
    Rule::DenyAckHolds,
    Rule::AcksEachStep,
    Rule::RefusesOutOfStep,
    Rule::UploadsFirst,
    Rule::OfflineKeepsRules,
    Rule::FareLimitKept,
    Rule::BusyUploadAgain,
];

impl Rule {
    pub fn text(self) -> &'static str {
        match self {
            Rule::HelloFirst => {
                "4.1 Hello is the first frame, exactly once, well formed, tagged with the terminal's key"
            }
            Rule::NonceFresh => "4.1 client_nonce is new for every connection",
            Rule::RefusesWrongNonce => {
                "4.2 a HelloAck echoing another nonce is refused: no tap, the connection closed"
            }
            Rule::RefusesBadAckTag => {
                "5.2 a HelloAck whose tag does not verify is refused: no tap, the connection closed"
            }
            Rule::TapAuthentic => {
                "4.3/5.2 every Tap is well formed and tagged with the terminal's key"
            }
            Rule::TapKindFitsMode => {
                "3 tap_kind fits the gate's mode (flat on bus, ferry, cableway; entry/exit on metro, rail)"
            }
            Rule::SequencesIncrease => "6 a new tap's sequence is above every sequence used before",
            Rule::ContinuesAboveLastSequence => {
                "4.2 after a HelloAck with a higher last_sequence, new taps continue above it"
            }
            Rule::WithinMaxInFlight => "4.2 no more than max_in_flight taps are unanswered at once",
            Rule::ResendIdentical => "6 a resend is the same frame, byte for byte",
            Rule::ResendsAfterError => {
                "4.5 taps left unanswered when an Error closed the connection are resent on the next"
            }
            Rule::BadTagAnswerNotTaken => {
                "5.2 a TapResult whose tag does not verify is not taken as the answer (the tap is resent)"
            }
            Rule::BusyNotResent => {
                "4.4 a tap answered busy is not resent (a retry takes a new sequence)"
            }
            Rule::EveryOutcomeHandled => {
                "4.4 after approve, every deny reason (1-8) and busy, the gate goes on tapping"
            }
            Rule::ReconnectsAfterRefusal => {
                "4.5/5.2 after an unkeyed Error refusing the Hello, the gate connects again"
            }
            Rule::EveryErrorHandled => {
                "4.5 after an Error of every code sent as a frame, the gate connects again and resends"
            }
            Rule::DenyAckHolds => {
                "4.6 on version 2, the DenyAck after the HelloAck names the version and history the gate holds (both 0 when new), kept across connections"
            }
            Rule::AcksEachStep => {
                "4.6 each DenyChanges and each whole list (in parts) is acknowledged with the version and history it makes"
            }
            Rule::RefusesOutOfStep => {
                "4.6 DenyChanges that do not follow the gate's version are not applied: the gate closes the connection"
            }
            Rule::UploadsFirst => {
                "4.7 taps kept offline are uploaded after the DenyAck, in sequence order, before any new Tap"
            }
            Rule::OfflineKeepsRules => {
                "4.7 a tap approved offline keeps rules 1, 2 and 4: not on the list the gate held, an issuer allowed, within max_offline_s"
            }
            Rule::FareLimitKept => {
                "4.7 rule 3: sent rules with max_fare_fen 0, a gate approves nothing offline (back after a spell away, it uploads nothing approved under them)"
            }
            Rule::BusyUploadAgain => {
                "4.7 an upload answered busy comes again under a new sequence, unchanged otherwise; a recorded one does not"
            }
        }
    }
}

/// What the referee announces and how patient it is.
#[derive(Debug, Clone)]
pub struct RefereeSettings {
    /// Key version 1; the referee derives every terminal's key from it.
    pub master_key: MasterKey,
    pub max_in_flight: u16,
    pub resend_window: u16,
    /// How long each answer is held before it is written, so taps can pile up to the bound.
    pub answer_delay_ms: u64,
    /// How long a gate has to close a connection it must refuse, or to resend a tap whose
    /// answer it must not take, before the referee closes the connection itself.
    pub grace_ms: u64,
    /// The version the gate under test claims: with 2, the rules of sections 4.6 and 4.7 are
    /// checked too, and a connection in version 1 fails.
    pub protocol: Version,
    /// Sent to every version-2 gate.
    pub offline_rules: OfflineRules,
}

/// What the I/O around the referee must do for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Write(Bytes),
    /// End the gateway's side of the stream, wait until the gate has the data, then close the
    /// connection with this code and reason.
    Close {
        code: u32,
        reason: &'static str,
    },
}

pub type ConnectionId = u64;

/// The outcomes the first connection walks through, one per fresh tap.
const OUTCOME_CYCLE: [(Outcome, Reason); 10] = [
    (Outcome::Approve, Reason::Approved),
    (Outcome::Deny, Reason::UnknownCard),
    (Outcome::Deny, Reason::CardLost),
    (Outcome::Deny, Reason::CardCancelled),
    (Outcome::Deny, Reason::CardBlocked),
    (Outcome::Deny, Reason::CardExpired),
    (Outcome::Deny, Reason::IssuerNotAccepted),
    (Outcome::Deny, Reason::PassBack),
    (Outcome::Deny, Reason::DirectoryUnavailable),
    (Outcome::Busy, Reason::Overloaded),
];
/// The Error codes the gateway sends as frames (13, `too_many_connections`, is a close code
/// before any stream), each closing one connection of the `EveryError` stage.
const ERROR_CYCLE: [ErrorCode; 17] = [
    ErrorCode::MalformedFrame,
    ErrorCode::FrameTooLarge,
    ErrorCode::UnsupportedVersion,
    ErrorCode::UnknownFrameType,
    ErrorCode::BadMac,
    ErrorCode::HelloRequired,
    ErrorCode::DuplicateHello,
    ErrorCode::UnknownTerminal,
    ErrorCode::UnknownKeyVersion,
    ErrorCode::UnknownArea,
    ErrorCode::Replay,
    ErrorCode::SequenceConflict,
    ErrorCode::ShuttingDown,
    ErrorCode::UnexpectedFrame,
    ErrorCode::HelloTimeout,
    ErrorCode::Internal,
    ErrorCode::IdleTimeout,
];
/// How far above the gate's highest sequence the jumped HelloAck puts `last_sequence`.
const SEQUENCE_JUMP: u64 = 1000;
/// Fresh taps answered on the jump connection before one is left unanswered.
const ANSWERED_BEFORE_DROP: u64 = 3;
/// Fresh taps on the last scripted connection before the gate has completed the script.
const TAPS_TO_COMPLETE: u64 = 2;
/// Taps remembered per terminal, to tell resends from new taps: far more than any window.
const REMEMBERED_TAPS: u64 = 4096;
/// Failure details kept per rule.
const DETAILS_KEPT: usize = 3;
/// Terminals and connections the referee keeps state for; beyond, Hellos are refused.
const MAX_TERMINALS: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Outcomes,
    /// Version 2 only: a deny-list change that skips a version.
    OutOfStep,
    WrongNonce,
    BadAckTag,
    Refuse,
    JumpThenDrop,
    EveryError,
    Completing,
    Normal,
}

impl Plan {
    /// The stage after this one is done.
    fn next(self) -> Plan {
        match self {
            Plan::Outcomes => Plan::OutOfStep,
            Plan::OutOfStep => Plan::WrongNonce,
            Plan::WrongNonce => Plan::BadAckTag,
            Plan::BadAckTag => Plan::Refuse,
            Plan::Refuse => Plan::JumpThenDrop,
            Plan::JumpThenDrop => Plan::EveryError,
            Plan::EveryError => Plan::Completing,
            Plan::Completing | Plan::Normal => Plan::Normal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Answered (or about to be) with these bytes.
    Sent { frame: Bytes, busy: bool },
    /// Left without a valid answer: the gate owes a resend.
    Owed,
}

struct SeenTap {
    frame: Bytes,
    answer: Answer,
}

struct Terminal {
    key: MacKey,
    mode: Mode,
    /// Where the gate stands in the script: a stage is repeated on the next connection until
    /// its goal is reached, so a gate that loses a connection early is not let off a rule.
    stage: Plan,
    /// The next outcome of the cycle to answer with.
    next_outcome: usize,
    /// The next Error code of the cycle to close a connection with.
    next_error: usize,
    /// A Hello was refused; the next Hello shows the gate came back.
    refused: bool,
    /// The gate has been answered busy at least once.
    answered_busy: bool,
    nonces: HashSet<u64>,
    highest: u64,
    seen: BTreeMap<u64, SeenTap>,
    /// Taps the gate must send again, and the rule that resend proves.
    owed: BTreeMap<u64, Rule>,
    completed: bool,
    following: GateFollowing,
}

struct Connection {
    buf: BytesMut,
    terminal: Option<u64>,
    plan: Plan,
    /// `last_sequence` announced in this connection's HelloAck.
    announced: u64,
    fresh: u64,
    /// Answers held for the delay: (due, sequence, bytes).
    held: Vec<(u64, u64, Bytes)>,
    /// An answer with a corrupted tag, written only once every answer held before it is out:
    /// a gate drops the connection over it, and a busy answer still behind it in the stream
    /// would be lost unread and resent with the right to do so.
    bad_tag_answer: Option<Bytes>,
    /// Taps on this connection that will get no valid answer here.
    withheld: BTreeSet<u64>,
    /// The gate must close (or resend) by then, or the referee closes.
    deadline: Option<u64>,
    tapped: bool,
    /// The gate finished its side of the stream.
    finished: bool,
    /// Close once the held answers are written.
    close_after_answers: Option<ErrorCode>,
    /// The referee closed it; nothing more is read.
    ended: bool,
    /// On a version-2 connection, where it stands with the deny list.
    following: Option<ConnectionFollowing>,
}

#[derive(Default)]
struct Tally {
    passed: u64,
    failures: Vec<String>,
    failed: u64,
}

pub struct Referee {
    settings: RefereeSettings,
    terminals: HashMap<u64, Terminal>,
    connections: HashMap<ConnectionId, Connection>,
    tallies: BTreeMap<Rule, Tally>,
    most_in_flight: u64,
    list: ListHistory,
    /// What the person running the gate under test needs to know as it happens.
    notices: Vec<String>,
}

impl Referee {
    pub fn new(settings: RefereeSettings) -> Referee {
        Referee {
            settings,
            terminals: HashMap::new(),
            connections: HashMap::new(),
            tallies: BTreeMap::new(),
            most_in_flight: 0,
            list: ListHistory::default(),
            notices: Vec::new(),
        }
    }

    /// Notices since the last call, oldest first: a step of the script that needs the person
    /// running the gate under test, or a gate that completed it.
    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    fn pass(&mut self, rule: Rule) {
        self.tallies.entry(rule).or_default().passed += 1;
    }

    fn fail(&mut self, rule: Rule, detail: String) {
        let tally = self.tallies.entry(rule).or_default();
        tally.failed += 1;
        if tally.failures.len() < DETAILS_KEPT {
            tally.failures.push(detail);
        }
    }

    /// A connection whose handshake agreed on `version`.
    pub fn opened(&mut self, id: ConnectionId, version: Version) {
        self.connections.insert(
            id,
            Connection {
                buf: BytesMut::new(),
                terminal: None,
                plan: Plan::Normal,
                announced: 0,
                fresh: 0,
                held: Vec::new(),
                bad_tag_answer: None,
                withheld: BTreeSet::new(),
                deadline: None,
                tapped: false,
                finished: false,
                close_after_answers: None,
                ended: false,
                following: (version >= Version::V2).then(ConnectionFollowing::default),
            },
        );
    }

    /// Bytes the gate sent on its stream.
    pub fn received(&mut self, id: ConnectionId, bytes: &[u8], now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(connection) = self.connections.get_mut(&id) else {
            return actions;
        };
        if connection.ended {
            return actions;
        }
        connection.buf.extend_from_slice(bytes);
        while let Some(connection) = self.connections.get_mut(&id) {
            if connection.ended {
                break;
            }
            if connection.close_after_answers.is_some() {
                // Closing: what arrives now is not decided, as a gateway stopping does not
                // decide it; a gate resends it on its next connection.
                connection.buf.clear();
                break;
            }
            match take_frame(&mut connection.buf) {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    if connection.terminal.is_none() {
                        self.hello(id, frame, now_ms, &mut actions);
                    } else {
                        self.frame(id, frame, now_ms, &mut actions);
                    }
                }
                Err(e) => {
                    let rule = if connection.terminal.is_some() {
                        Rule::TapAuthentic
                    } else {
                        Rule::HelloFirst
                    };
                    self.fail(rule, format!("undecodable frame: {e}"));
                    self.refuse(id, e.error_code(), 0, &mut actions);
                }
            }
        }
        self.flush(id, now_ms, &mut actions);
        actions
    }

    /// The gate finished its side of the stream: it gets its answers, then the close.
    pub fn gate_finished(&mut self, id: ConnectionId, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(connection) = self.connections.get_mut(&id) {
            connection.finished = true;
            self.flush(id, now_ms, &mut actions);
        }
        actions
    }

    /// Time passed: held answers come due, deadlines expire.
    pub fn tick(&mut self, id: ConnectionId, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(connection) = self.connections.get(&id) else {
            return actions;
        };
        if let Some(deadline) = connection.deadline
            && now_ms >= deadline
            && !connection.ended
        {
            match connection.plan {
                Plan::WrongNonce => self.fail(
                    Rule::RefusesWrongNonce,
                    "the gate kept the connection open".into(),
                ),
                Plan::BadAckTag => self.fail(
                    Rule::RefusesBadAckTag,
                    "the gate kept the connection open".into(),
                ),
                Plan::OutOfStep => self.fail(
                    Rule::RefusesOutOfStep,
                    "the gate kept the connection open".into(),
                ),
                // A gate that neither closed nor resent after a bad answer: close, so the
                // resend can still come on its next connection.
                _ => {}
            }
            self.refuse(id, ErrorCode::Internal, 0, &mut actions);
            return actions;
        }
        self.flush(id, now_ms, &mut actions);
        actions
    }

    /// The connection is gone, by either side.
    pub fn closed(&mut self, id: ConnectionId) {
        let Some(connection) = self.connections.remove(&id) else {
            return;
        };
        if !connection.tapped && !connection.ended {
            match connection.plan {
                Plan::WrongNonce => self.pass(Rule::RefusesWrongNonce),
                Plan::BadAckTag => self.pass(Rule::RefusesBadAckTag),
                _ => {}
            }
        }
        if let (Plan::OutOfStep, Some(terminal_id), Some(following)) =
            (connection.plan, connection.terminal, &connection.following)
        {
            self.out_of_step_closed(terminal_id, following, connection.ended);
        }
    }

    /// Gates that have been through the whole script.
    pub fn completed(&self) -> usize {
        self.terminals.values().filter(|t| t.completed).count()
    }

    /// Every rule with its verdict; a tap still owed is a failure of the rule that asked for it.
    pub fn checks(&self) -> Vec<Check> {
        let mut owed: BTreeMap<Rule, Vec<String>> = BTreeMap::new();
        for (terminal_id, terminal) in &self.terminals {
            for (sequence, rule) in &terminal.owed {
                owed.entry(*rule).or_default().push(format!(
                    "terminal {terminal_id} never resent tap {sequence}"
                ));
            }
            for (rule, what) in terminal.following.missing() {
                owed.entry(rule)
                    .or_default()
                    .push(format!("terminal {terminal_id} {what}"));
            }
        }
        let version_2 = if self.settings.protocol >= Version::V2 {
            &RULES_V2[..]
        } else {
            &[]
        };
        RULES
            .iter()
            .chain(version_2)
            .map(|rule| {
                let tally = self.tallies.get(rule);
                let mut failures: Vec<String> =
                    tally.map(|t| t.failures.clone()).unwrap_or_default();
                let never_resent = owed.remove(rule).unwrap_or_default();
                failures.extend(never_resent.iter().take(DETAILS_KEPT).cloned());
                let failed = tally.map_or(0, |t| t.failed) + never_resent.len() as u64;
                let passed = tally.map_or(0, |t| t.passed);
                let (verdict, mut detail) = if failed > 0 {
                    (
                        Verdict::Fail,
                        format!("{failed} times: {}", failures.join("; ")),
                    )
                } else if passed > 0 {
                    (Verdict::Pass, String::new())
                } else {
                    (Verdict::NotExercised, String::new())
                };
                if *rule == Rule::WithinMaxInFlight && verdict == Verdict::Pass {
                    detail = format!(
                        "at most {} of {} outstanding",
                        self.most_in_flight, self.settings.max_in_flight
                    );
                }
                Check {
                    rule: rule.text(),
                    verdict,
                    detail,
                }
            })
            .collect()
    }

    /// A first frame that is a well-formed Hello, tagged with its terminal's key, from a
    /// registered place; anything else is refused (and `None`).
    fn open_hello(
        &mut self,
        id: ConnectionId,
        frame: tapgate_protocol::SealedFrame,
        actions: &mut Vec<Action>,
    ) -> Option<(u64, MacKey, Hello)> {
        if frame.frame_type() != FrameType::Hello {
            self.fail(
                Rule::HelloFirst,
                format!("the first frame was {}", frame.frame_type()),
            );
            let code = if frame.frame_type() == FrameType::Tap {
                ErrorCode::HelloRequired
            } else {
                ErrorCode::UnexpectedFrame
            };
            self.refuse(id, code, 0, actions);
            return None;
        }
        let Some((terminal_id, key_version)) = frame.hello_identity() else {
            self.refuse(id, ErrorCode::MalformedFrame, 0, actions);
            return None;
        };
        if key_version != 1 {
            self.fail(
                Rule::HelloFirst,
                format!("key version {key_version}; the referee has version 1"),
            );
            self.refuse(id, ErrorCode::UnknownKeyVersion, 0, actions);
            return None;
        }
        if !self.terminals.contains_key(&terminal_id) && self.terminals.len() >= MAX_TERMINALS {
            self.refuse(id, ErrorCode::Internal, 0, actions);
            return None;
        }
        let key = self.settings.master_key.diversify(terminal_id).mac_key();
        let hello = match frame.open(&key) {
            Ok(Frame::Hello(hello)) => hello,
            Ok(_) => unreachable!("a Hello frame opens as a Hello"),
            Err(OpenError::BadMac(_)) => {
                self.fail(
                    Rule::HelloFirst,
                    format!("terminal {terminal_id}: the Hello's tag does not verify"),
                );
                self.refuse(id, ErrorCode::BadMac, 0, actions);
                return None;
            }
            Err(OpenError::Decode(e)) => {
                self.fail(Rule::HelloFirst, format!("terminal {terminal_id}: {e}"));
                self.refuse_keyed(id, &key, ErrorCode::MalformedFrame, 0, actions);
                return None;
            }
        };
        if hello.area.area().is_none()
            || tapgate_protocol::registry::operator(hello.operator).is_none()
        {
            self.fail(
                Rule::HelloFirst,
                format!(
                    "terminal {terminal_id}: area {} or operator {} is not in the registry",
                    hello.area.0, hello.operator
                ),
            );
            self.refuse_keyed(id, &key, ErrorCode::MalformedFrame, 0, actions);
            return None;
        }
        self.pass(Rule::HelloFirst);
        Some((terminal_id, key, hello))
    }

    fn hello(
        &mut self,
        id: ConnectionId,
        frame: tapgate_protocol::SealedFrame,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let Some((terminal_id, key, hello)) = self.open_hello(id, frame, actions) else {
            return;
        };
        let terminal = self
            .terminals
            .entry(terminal_id)
            .or_insert_with(|| Terminal {
                key: key.clone(),
                mode: hello.mode,
                stage: Plan::Outcomes,
                next_outcome: 0,
                next_error: 0,
                refused: false,
                answered_busy: false,
                nonces: HashSet::new(),
                highest: 0,
                seen: BTreeMap::new(),
                owed: BTreeMap::new(),
                completed: false,
                following: GateFollowing::default(),
            });
        terminal.mode = hello.mode;
        let version_2 = self.connections[&id].following.is_some();
        if terminal.stage == Plan::OutOfStep && !version_2 {
            // A stage of version 2 only.
            terminal.stage = Plan::OutOfStep.next();
        }
        let fresh_nonce = terminal.nonces.insert(hello.client_nonce);
        let plan = terminal.stage;
        if matches!(plan, Plan::WrongNonce | Plan::BadAckTag | Plan::Refuse) {
            // One connection is all these stages take.
            terminal.stage = plan.next();
        }
        let came_back = std::mem::replace(&mut terminal.refused, plan == Plan::Refuse);
        let highest = terminal.highest;
        if fresh_nonce {
            self.pass(Rule::NonceFresh);
        } else {
            self.fail(
                Rule::NonceFresh,
                format!(
                    "terminal {terminal_id} used nonce {:#x} again",
                    hello.client_nonce
                ),
            );
        }
        if came_back {
            self.pass(Rule::ReconnectsAfterRefusal);
        }
        if self.settings.protocol >= Version::V2 && !version_2 {
            self.fail(
                Rule::DenyAckHolds,
                format!("terminal {terminal_id} connected in version 1 (ALPN tapgate/1)"),
            );
        }
        let connection = self
            .connections
            .get_mut(&id)
            .expect("a connection being read");
        connection.terminal = Some(terminal_id);
        connection.plan = plan;
        let mut ack = HelloAck {
            terminal_id,
            client_nonce: hello.client_nonce,
            server_time_ms: now_ms,
            last_sequence: highest,
            resend_window: self.settings.resend_window,
            max_in_flight: self.settings.max_in_flight,
        };
        match plan {
            Plan::Refuse => {
                // As a gateway that cannot reach its terminal register: no key.
                self.refuse_unkeyed(id, ErrorCode::Internal, 0, actions);
                return;
            }
            Plan::WrongNonce => {
                ack.client_nonce = ack.client_nonce.wrapping_add(1);
                connection.deadline = Some(now_ms + self.settings.grace_ms);
            }
            Plan::BadAckTag => connection.deadline = Some(now_ms + self.settings.grace_ms),
            Plan::JumpThenDrop => ack.last_sequence = highest + SEQUENCE_JUMP,
            Plan::Outcomes
            | Plan::OutOfStep
            | Plan::EveryError
            | Plan::Completing
            | Plan::Normal => {}
        }
        connection.announced = ack.last_sequence;
        let mut out = BytesMut::new();
        seal(&Frame::HelloAck(ack), &key, &mut out);
        if plan == Plan::BadAckTag {
            let last = out.len() - 1;
            out[last] ^= 0x01;
        }
        actions.push(Action::Write(out.freeze()));
    }

    fn frame(
        &mut self,
        id: ConnectionId,
        frame: tapgate_protocol::SealedFrame,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let connection = &self.connections[&id];
        let terminal_id = connection.terminal.expect("a frame after the Hello");
        let plan = connection.plan;
        let key = self.terminals[&terminal_id].key.clone();
        let version_2 = connection.following.is_some();
        if version_2 {
            self.heard(id, terminal_id, now_ms);
        }
        match frame.frame_type() {
            FrameType::Tap => {}
            FrameType::DenyAck if version_2 => {
                self.deny_ack(id, terminal_id, &frame, now_ms, actions);
                return;
            }
            FrameType::OfflineTap if version_2 => {
                self.offline_tap(id, terminal_id, &frame, actions);
                self.check_completion(id, terminal_id);
                return;
            }
            FrameType::Hello => {
                self.fail(
                    Rule::HelloFirst,
                    format!("terminal {terminal_id} sent a second Hello"),
                );
                self.refuse_keyed(id, &key, ErrorCode::DuplicateHello, 0, actions);
                return;
            }
            other => {
                self.fail(
                    Rule::TapAuthentic,
                    format!("terminal {terminal_id} sent a {other} frame"),
                );
                self.refuse_keyed(id, &key, ErrorCode::UnexpectedFrame, 0, actions);
                return;
            }
        }
        let tap = match frame.open(&key) {
            Ok(Frame::Tap(tap)) => tap,
            Ok(_) => unreachable!("a Tap frame opens as a Tap"),
            Err(OpenError::BadMac(_)) => {
                self.fail(
                    Rule::TapAuthentic,
                    format!("terminal {terminal_id}: a Tap's tag does not verify"),
                );
                self.refuse_keyed(id, &key, ErrorCode::BadMac, 0, actions);
                return;
            }
            Err(OpenError::Decode(e)) => {
                self.fail(Rule::TapAuthentic, format!("terminal {terminal_id}: {e}"));
                let sequence = frame.sequence().unwrap_or(0);
                self.refuse_keyed(id, &key, ErrorCode::MalformedFrame, sequence, actions);
                return;
            }
        };
        if matches!(plan, Plan::WrongNonce | Plan::BadAckTag) {
            let rule = if plan == Plan::WrongNonce {
                Rule::RefusesWrongNonce
            } else {
                Rule::RefusesBadAckTag
            };
            self.fail(
                rule,
                format!(
                    "terminal {terminal_id} sent tap {} after the HelloAck it had to refuse",
                    tap.sequence
                ),
            );
            self.connections.get_mut(&id).expect("open").tapped = true;
            self.refuse_keyed(id, &key, ErrorCode::Internal, 0, actions);
            return;
        }
        self.pass(Rule::TapAuthentic);
        let terminal = self.terminals.get_mut(&terminal_id).expect("known");
        terminal.following.tapped(tap.card_id);
        let (mode, resend) = (terminal.mode, terminal.seen.contains_key(&tap.sequence));
        let kind_fits = if mode.needs_exit_tap() {
            matches!(tap.kind, TapKind::Entry | TapKind::Exit)
        } else {
            tap.kind == TapKind::Flat
        };
        if kind_fits {
            self.pass(Rule::TapKindFitsMode);
        } else {
            self.fail(
                Rule::TapKindFitsMode,
                format!("terminal {terminal_id} ({mode}) sent a {} tap", tap.kind),
            );
        }
        self.connections.get_mut(&id).expect("open").tapped = true;
        let bytes = frame_bytes(&frame);
        if resend {
            self.resent(id, terminal_id, tap.sequence, bytes, now_ms, actions);
        } else {
            self.fresh(id, terminal_id, tap.sequence, bytes, now_ms, actions);
        }
    }

    fn resent(
        &mut self,
        id: ConnectionId,
        terminal_id: u64,
        sequence: u64,
        bytes: Bytes,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let Some(previous) = self.resend_of(id, terminal_id, sequence, &bytes, actions) else {
            return;
        };
        let terminal = self.terminals.get_mut(&terminal_id).expect("known");
        if let Some(rule) = terminal.owed.remove(&sequence) {
            self.pass(rule);
        }
        match previous {
            Answer::Sent { frame, busy } => {
                if busy {
                    self.fail(
                        Rule::BusyNotResent,
                        format!("terminal {terminal_id} resent tap {sequence}, answered busy"),
                    );
                }
                self.hold(id, sequence, frame, now_ms);
            }
            Answer::Owed => {
                let answer = self.answer(terminal_id, sequence, Outcome::Approve, Reason::Approved);
                self.settle_answer(terminal_id, sequence, &answer, false);
                self.hold(id, sequence, answer, now_ms);
                let connection = self.connections.get_mut(&id).expect("open");
                connection.withheld.remove(&sequence);
                // The gate resent on the same connection: it has done what the deadline
                // waited for.
                if connection.plan != Plan::WrongNonce && connection.plan != Plan::BadAckTag {
                    connection.deadline = None;
                }
            }
        }
        self.check_in_flight(id, terminal_id);
        self.check_completion(id, terminal_id);
    }

    /// A sequence the gate used before, sent again: the same bytes get what the first copy
    /// got (returned); other bytes fail and are refused as a conflict (`None`).
    fn resend_of(
        &mut self,
        id: ConnectionId,
        terminal_id: u64,
        sequence: u64,
        bytes: &Bytes,
        actions: &mut Vec<Action>,
    ) -> Option<Answer> {
        let terminal = &self.terminals[&terminal_id];
        let seen = terminal.seen.get(&sequence).expect("seen");
        if seen.frame != *bytes {
            let key = terminal.key.clone();
            self.fail(
                Rule::ResendIdentical,
                format!("terminal {terminal_id} sent sequence {sequence} again with other bytes"),
            );
            self.refuse_keyed(id, &key, ErrorCode::SequenceConflict, sequence, actions);
            return None;
        }
        let previous = seen.answer.clone();
        self.pass(Rule::ResendIdentical);
        Some(previous)
    }

    fn fresh(
        &mut self,
        id: ConnectionId,
        terminal_id: u64,
        sequence: u64,
        bytes: Bytes,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        if !self.admit_new(id, terminal_id, sequence, bytes, actions) {
            return;
        }
        let connection = self.connections.get_mut(&id).expect("open");
        let fresh_here = connection.fresh;
        connection.fresh += 1;
        let (plan, announced) = (connection.plan, connection.announced);
        if connection.following.is_some() {
            self.tapped_new(id, terminal_id, actions);
        }
        if plan == Plan::JumpThenDrop {
            if sequence > announced {
                self.pass(Rule::ContinuesAboveLastSequence);
            } else {
                self.fail(
                    Rule::ContinuesAboveLastSequence,
                    format!(
                        "terminal {terminal_id} sent new tap {sequence}; the HelloAck said {announced}"
                    ),
                );
            }
        }
        let terminal = self.terminals.get_mut(&terminal_id).expect("known");
        let in_cycle = plan == Plan::Outcomes && terminal.stage == Plan::Outcomes;
        let outcome_index = terminal.next_outcome;
        if in_cycle && outcome_index < OUTCOME_CYCLE.len() {
            terminal.next_outcome += 1;
            let (outcome, reason) = OUTCOME_CYCLE[outcome_index];
            let busy = outcome == Outcome::Busy;
            terminal.answered_busy |= busy;
            let answer = self.answer(terminal_id, sequence, outcome, reason);
            self.settle_answer(terminal_id, sequence, &answer, busy);
            self.hold(id, sequence, answer, now_ms);
        } else if in_cycle {
            // Still tapping after the whole cycle, busy last. This one is answered with a tag
            // that does not verify.
            terminal.stage = Plan::Outcomes.next();
            terminal.owed.insert(sequence, Rule::BadTagAnswerNotTaken);
            self.pass(Rule::EveryOutcomeHandled);
            let mut answer = BytesMut::from(
                &self.answer(terminal_id, sequence, Outcome::Approve, Reason::Approved)[..],
            );
            let last = answer.len() - 1;
            answer[last] ^= 0x01;
            let connection = self.connections.get_mut(&id).expect("open");
            connection.withheld.insert(sequence);
            connection.deadline = Some(now_ms + self.settings.grace_ms);
            connection.bad_tag_answer = Some(answer.freeze());
        } else if plan == Plan::JumpThenDrop && fresh_here == ANSWERED_BEFORE_DROP {
            terminal.stage = Plan::JumpThenDrop.next();
            terminal.owed.insert(sequence, Rule::ResendsAfterError);
            let connection = self.connections.get_mut(&id).expect("open");
            connection.withheld.insert(sequence);
            connection.close_after_answers = Some(ErrorCode::ShuttingDown);
        } else if plan == Plan::EveryError && fresh_here == 0 {
            // Each connection of this stage ends with the next code, a tap left unanswered.
            let code = ERROR_CYCLE[terminal.next_error.min(ERROR_CYCLE.len() - 1)];
            terminal.next_error += 1;
            let cycle_done = terminal.next_error >= ERROR_CYCLE.len();
            if cycle_done {
                terminal.stage = Plan::EveryError.next();
            }
            terminal.owed.insert(sequence, Rule::ResendsAfterError);
            let connection = self.connections.get_mut(&id).expect("open");
            connection.withheld.insert(sequence);
            connection.close_after_answers = Some(code);
        } else {
            let answer = self.answer(terminal_id, sequence, Outcome::Approve, Reason::Approved);
            self.settle_answer(terminal_id, sequence, &answer, false);
            self.hold(id, sequence, answer, now_ms);
        }
        self.check_in_flight(id, terminal_id);
        self.check_completion(id, terminal_id);
    }

    /// A frame with a sequence the gate has not used (a tap, or an upload): it must be above
    /// every sequence used before, or the connection is refused as a replay. Kept, owed an
    /// answer, among the last [`REMEMBERED_TAPS`]; false when refused.
    fn admit_new(
        &mut self,
        id: ConnectionId,
        terminal_id: u64,
        sequence: u64,
        bytes: Bytes,
        actions: &mut Vec<Action>,
    ) -> bool {
        let terminal = self.terminals.get_mut(&terminal_id).expect("known");
        if sequence == 0 || sequence <= terminal.highest {
            let (highest, key) = (terminal.highest, terminal.key.clone());
            self.fail(
                Rule::SequencesIncrease,
                format!("terminal {terminal_id} sent new sequence {sequence} after {highest}"),
            );
            self.refuse_keyed(id, &key, ErrorCode::Replay, sequence, actions);
            return false;
        }
        terminal.highest = sequence;
        terminal.seen.insert(
            sequence,
            SeenTap {
                frame: bytes,
                answer: Answer::Owed,
            },
        );
        let forget_below = sequence.saturating_sub(REMEMBERED_TAPS);
        while let Some((&oldest, _)) = terminal.seen.first_key_value() {
            if oldest >= forget_below {
                break;
            }
            terminal.seen.remove(&oldest);
        }
        self.pass(Rule::SequencesIncrease);
        true
    }

    fn check_in_flight(&mut self, id: ConnectionId, terminal_id: u64) {
        let connection = &self.connections[&id];
        // Distinct taps: a withheld tap may also have an answer held (one with a bad tag).
        let mut unanswered = connection.withheld.clone();
        unanswered.extend(connection.held.iter().map(|(_, sequence, _)| *sequence));
        let outstanding = unanswered.len() as u64;
        self.most_in_flight = self.most_in_flight.max(outstanding);
        let bound = u64::from(self.settings.max_in_flight);
        if outstanding > bound {
            self.fail(
                Rule::WithinMaxInFlight,
                format!("terminal {terminal_id} had {outstanding} taps outstanding"),
            );
        } else {
            self.pass(Rule::WithinMaxInFlight);
        }
    }

    fn check_completion(&mut self, id: ConnectionId, terminal_id: u64) {
        let connection = &self.connections[&id];
        let terminal = self.terminals.get_mut(&terminal_id).expect("known");
        if connection.plan == Plan::Completing
            && connection.fresh >= TAPS_TO_COMPLETE
            && terminal.owed.is_empty()
            && (self.settings.protocol < Version::V2 || terminal.following.done())
            && !terminal.completed
        {
            terminal.completed = true;
            terminal.stage = Plan::Normal;
            self.notices
                .push(format!("terminal {terminal_id} completed the script"));
            let every_error = terminal.next_error >= ERROR_CYCLE.len();
            if terminal.answered_busy {
                // Its busy answer was never resent, or this would be a failure too.
                self.pass(Rule::BusyNotResent);
            }
            if every_error {
                // It came back after each code, and what the last one left owed is resent.
                self.pass(Rule::EveryErrorHandled);
            }
        }
    }

    fn answer(&self, terminal_id: u64, sequence: u64, outcome: Outcome, reason: Reason) -> Bytes {
        let result = TapResult {
            sequence,
            outcome,
            reason,
            concession: Concession::None,
            fare_fen: if outcome == Outcome::Approve { 200 } else { 0 },
            rides_left: tapgate_protocol::RIDES_LEFT_NOT_APPLICABLE,
        };
        let mut out = BytesMut::new();
        seal(
            &Frame::TapResult(result),
            &self.terminals[&terminal_id].key,
            &mut out,
        );
        out.freeze()
    }

    fn settle_answer(&mut self, terminal_id: u64, sequence: u64, frame: &Bytes, busy: bool) {
        if let Some(seen) = self
            .terminals
            .get_mut(&terminal_id)
            .and_then(|t| t.seen.get_mut(&sequence))
        {
            seen.answer = Answer::Sent {
                frame: frame.clone(),
                busy,
            };
        }
    }

    fn hold(&mut self, id: ConnectionId, sequence: u64, frame: Bytes, now_ms: u64) {
        let due = now_ms + self.settings.answer_delay_ms;
        if let Some(connection) = self.connections.get_mut(&id) {
            connection.held.push((due, sequence, frame));
        }
    }

    /// Writes the answers that are due, newest first; then a close that waited for them.
    fn flush(&mut self, id: ConnectionId, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(connection) = self.connections.get_mut(&id) else {
            return;
        };
        if connection.ended {
            return;
        }
        let (due, later): (Vec<_>, Vec<_>) = connection
            .held
            .drain(..)
            .partition(|(due, _, _)| *due <= now_ms);
        connection.held = later;
        for (_, _, frame) in due.into_iter().rev() {
            actions.push(Action::Write(frame));
        }
        if !connection.held.is_empty() {
            return;
        }
        if let Some(frame) = connection.bad_tag_answer.take() {
            actions.push(Action::Write(frame));
        }
        if let Some(code) = connection.close_after_answers {
            self.refuse(id, code, 0, actions);
        } else if connection.finished {
            connection.ended = true;
            actions.push(Action::Close {
                code: 0,
                reason: "done",
            });
        }
    }

    /// Sends an Error (tagged when the terminal is known) and ends the connection.
    fn refuse(
        &mut self,
        id: ConnectionId,
        code: ErrorCode,
        sequence: u64,
        actions: &mut Vec<Action>,
    ) {
        let key = self
            .connections
            .get(&id)
            .and_then(|c| c.terminal)
            .and_then(|t| self.terminals.get(&t))
            .map(|t| t.key.clone());
        match key {
            Some(key) => self.refuse_keyed(id, &key, code, sequence, actions),
            None => self.refuse_unkeyed(id, code, sequence, actions),
        }
    }

    /// An Error with the zero tag: the gateway has no key for the peer, or answers as one that
    /// cannot reach its terminal register.
    fn refuse_unkeyed(
        &mut self,
        id: ConnectionId,
        code: ErrorCode,
        sequence: u64,
        actions: &mut Vec<Action>,
    ) {
        let mut out = BytesMut::new();
        seal_unkeyed_error(ErrorFrame { code, sequence }, &mut out);
        self.end(id, out.freeze(), code, actions);
    }

    fn refuse_keyed(
        &mut self,
        id: ConnectionId,
        key: &MacKey,
        code: ErrorCode,
        sequence: u64,
        actions: &mut Vec<Action>,
    ) {
        let mut out = BytesMut::new();
        seal(&Frame::Error(ErrorFrame { code, sequence }), key, &mut out);
        self.end(id, out.freeze(), code, actions);
    }

    fn end(&mut self, id: ConnectionId, error: Bytes, code: ErrorCode, actions: &mut Vec<Action>) {
        let Some(connection) = self.connections.get_mut(&id) else {
            return;
        };
        // Whatever was decided is answered before the Error (section 4.5).
        for (_, _, frame) in connection.held.drain(..).rev() {
            actions.push(Action::Write(frame));
        }
        connection.ended = true;
        actions.push(Action::Write(error));
        actions.push(Action::Close {
            code: u32::from(code.code()),
            reason: code.label(),
        });
    }
}

fn frame_bytes(frame: &tapgate_protocol::SealedFrame) -> Bytes {
    let mut bytes = BytesMut::from(frame.mac_input());
    bytes.extend_from_slice(&frame.tag());
    bytes.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapgate_protocol::{AreaCode, Issuer, OfflineStatus, Tap};

    const MASTER: &str = "00112233445566778899aabbccddeeff";
    const TERMINAL: u64 = 100_000_007;

    fn referee(max_in_flight: u16) -> Referee {
        Referee::new(RefereeSettings {
            master_key: MasterKey::from_hex(MASTER).unwrap(),
            max_in_flight,
            resend_window: 32,
            answer_delay_ms: 0,
            grace_ms: 1000,
            protocol: Version::V1,
            offline_rules: OfflineRules {
                issuers: tapgate_protocol::IssuerSet::of(&[Issuer::ChongqingSsc]),
                max_fare_fen: 700,
                max_offline_s: 60,
            },
        })
    }

    fn referee_v2() -> Referee {
        Referee::new(RefereeSettings {
            protocol: Version::V2,
            ..referee(4).settings
        })
    }

    /// A gate as the tests drive it: it seals what it is told to send and reads what the
    /// referee answers, as a well-behaved gate would.
    struct TestGate {
        key: MacKey,
        nonce: u64,
        next: u64,
        /// The history of every deny-list version the referee sent, to echo.
        histories: std::collections::HashMap<u64, u64>,
    }

    impl TestGate {
        fn new() -> TestGate {
            TestGate {
                key: MasterKey::from_hex(MASTER)
                    .unwrap()
                    .diversify(TERMINAL)
                    .mac_key(),
                nonce: 0,
                next: 1,
                histories: std::collections::HashMap::from([(0, 0)]),
            }
        }

        fn seal(&self, frame: &Frame) -> Vec<u8> {
            let mut out = BytesMut::new();
            seal(frame, &self.key, &mut out);
            out.to_vec()
        }

        fn hello(&mut self) -> Vec<u8> {
            self.nonce += 1;
            self.seal(&Frame::Hello(Hello {
                terminal_id: TERMINAL,
                key_version: 1,
                mode: Mode::Bus,
                area: AreaCode(500_103),
                operator: 1,
                client_nonce: self.nonce,
                gate_time_ms: 0,
            }))
        }

        /// A tap of card 42 at gate time `gate_time_ms`.
        fn card_tap(sequence: u64, gate_time_ms: u64) -> Tap {
            Tap {
                sequence,
                card_id: 42,
                issuer: Issuer::ChongqingSsc,
                kind: TapKind::Flat,
                line: 1,
                stop: 1,
                gate_time_ms,
            }
        }

        fn tap(&self, sequence: u64) -> Vec<u8> {
            self.seal(&Frame::Tap(Self::card_tap(sequence, 0)))
        }

        /// The history the referee sent with `version` (0 if never).
        fn history_of(&self, version: u64) -> u64 {
            self.histories.get(&version).copied().unwrap_or(0)
        }

        /// A DenyAck of `version`, with the history it was sent at.
        fn deny_ack(&self, version: u64) -> Vec<u8> {
            self.deny_ack_of_history(version, self.history_of(version))
        }

        fn deny_ack_of_history(&self, version: u64, history: u64) -> Vec<u8> {
            self.seal(&Frame::DenyAck(tapgate_protocol::DenyAck {
                version,
                history,
            }))
        }

        /// An upload of card 42, approved offline 1 s after the gate last heard from the
        /// referee, holding list `deny_version`.
        fn upload(&self, sequence: u64, deny_version: u64) -> Vec<u8> {
            self.seal(&Frame::OfflineTap(tapgate_protocol::OfflineTap {
                tap: Self::card_tap(sequence, 1_000),
                deny_version,
                deny_history: self.history_of(deny_version),
                offline_since_ms: 0,
            }))
        }

        /// What the referee's writes mean to the gate: frames that verify, and whether any
        /// frame failed verification; and whether the connection was closed.
        fn read(&mut self, actions: &[Action]) -> (Vec<Frame>, bool, bool) {
            let mut buf = BytesMut::new();
            let mut closed = false;
            for action in actions {
                match action {
                    Action::Write(bytes) => buf.extend_from_slice(bytes),
                    Action::Close { .. } => closed = true,
                }
            }
            let (mut frames, mut bad) = (Vec::new(), false);
            while let Some(frame) = take_frame(&mut buf).unwrap() {
                match frame.open(&self.key) {
                    Ok(f) => {
                        match &f {
                            Frame::DenyChanges(c) => {
                                self.histories.insert(c.last_version(), c.history);
                            }
                            Frame::DenyList(l) => {
                                self.histories.insert(l.version, l.history);
                            }
                            _ => {}
                        }
                        frames.push(f);
                    }
                    Err(_) => bad = true,
                }
            }
            (frames, bad, closed)
        }
    }

    fn verdict(referee: &Referee, rule: Rule) -> Verdict {
        referee
            .checks()
            .into_iter()
            .find(|c| c.rule == rule.text())
            .unwrap()
            .verdict
    }

    /// Opens connection `id` and says Hello on it.
    fn say_hello(r: &mut Referee, gate: &mut TestGate, id: ConnectionId) -> Vec<Action> {
        r.opened(id, Version::V1);
        let hello = gate.hello();
        r.received(id, &hello, 0)
    }

    /// The first stage: the outcome cycle, then the answer with a bad tag.
    fn first_stage(r: &mut Referee, gate: &TestGate) {
        for sequence in 1..=11 {
            r.received(0, &gate.tap(sequence), 0);
        }
    }

    /// Walks a well-behaved gate through the whole script: every rule passes.
    #[test]
    fn a_gate_that_keeps_the_rules_completes_the_script_with_every_rule_passed() {
        let mut r = referee(4);
        let mut gate = TestGate::new();
        let mut id = 0;
        let mut owed: Vec<Vec<u8>> = Vec::new();
        while r.completed() == 0 {
            assert!(id < 40, "the script did not complete");
            r.opened(id, Version::V1);
            let hello = gate.hello();
            let (frames, bad, closed) = gate.read(&r.received(id, &hello, 0));
            let ack = match frames.first() {
                Some(Frame::HelloAck(ack)) if !bad && ack.client_nonce == gate.nonce => *ack,
                _ => {
                    // Refused (unkeyed Error, wrong nonce or bad tag): close and come back.
                    let _ = closed;
                    r.closed(id);
                    id += 1;
                    continue;
                }
            };
            gate.next = gate.next.max(ack.last_sequence + 1);
            for frame in std::mem::take(&mut owed) {
                let (frames, _, _) = gate.read(&r.received(id, &frame, 0));
                assert!(matches!(frames[0], Frame::TapResult(_)));
            }
            loop {
                let tap = gate.tap(gate.next);
                gate.next += 1;
                let actions = r.received(id, &tap, 0);
                let (frames, bad, closed) = gate.read(&actions);
                let answered = frames.iter().any(|f| matches!(f, Frame::TapResult(_)));
                if bad || !answered {
                    owed.push(tap);
                }
                if bad || closed || frames.iter().any(|f| matches!(f, Frame::Error(_))) {
                    break;
                }
                if r.completed() == 1 {
                    break;
                }
            }
            r.closed(id);
            id += 1;
        }
        for check in r.checks() {
            assert_eq!(check.verdict, Verdict::Pass, "{check:?}");
        }
        assert_eq!(
            r.take_notices(),
            [format!("terminal {TERMINAL} completed the script")]
        );
    }

    #[test]
    fn a_tap_before_the_hello_fails_and_is_refused() {
        let mut r = referee(4);
        let gate = TestGate::new();
        r.opened(0, Version::V1);
        let actions = r.received(0, &gate.tap(1), 0);
        assert!(matches!(
            actions.last(),
            Some(Action::Close { code: 6, .. })
        ));
        assert_eq!(verdict(&r, Rule::HelloFirst), Verdict::Fail);
    }

    #[test]
    fn a_nonce_used_twice_fails() {
        let mut r = referee(4);
        let mut gate = TestGate::new();
        for id in 0..2 {
            r.opened(id, Version::V1);
            let hello = gate.hello();
            r.received(id, &hello, 0);
            gate.nonce -= 1;
            r.closed(id);
        }
        assert_eq!(verdict(&r, Rule::NonceFresh), Verdict::Fail);
    }

    #[test]
    fn a_sequence_sent_again_with_another_body_fails_and_is_a_conflict() {
        let mut r = referee(4);
        let mut gate = TestGate::new();
        say_hello(&mut r, &mut gate, 0);
        r.received(0, &gate.tap(1), 0);
        let mut other = gate.tap(1);
        other[25] ^= 1; // the stop number
        let tag_input = other.len() - 16;
        let tag = gate.key.tag(&other[..tag_input]);
        other[tag_input..].copy_from_slice(&tag);
        let actions = r.received(0, &other, 0);
        assert!(matches!(
            actions.last(),
            Some(Action::Close { code: 12, .. })
        ));
        assert_eq!(verdict(&r, Rule::ResendIdentical), Verdict::Fail);
    }

    #[test]
    fn more_taps_outstanding_than_announced_fails() {
        let mut r = Referee::new(RefereeSettings {
            answer_delay_ms: 50,
            ..referee(2).settings
        });
        let mut gate = TestGate::new();
        say_hello(&mut r, &mut gate, 0);
        r.received(0, &gate.tap(1), 0);
        r.received(0, &gate.tap(2), 1);
        assert_eq!(verdict(&r, Rule::WithinMaxInFlight), Verdict::Pass);
        r.received(0, &gate.tap(3), 2);
        assert_eq!(verdict(&r, Rule::WithinMaxInFlight), Verdict::Fail);
    }

    #[test]
    fn a_tap_after_a_helloack_with_the_wrong_nonce_fails() {
        let mut r = referee(4);
        let mut gate = TestGate::new();
        say_hello(&mut r, &mut gate, 0);
        first_stage(&mut r, &gate);
        r.closed(0);
        let actions = say_hello(&mut r, &mut gate, 1);
        let (frames, _, _) = gate.read(&actions);
        assert!(matches!(frames[0], Frame::HelloAck(ack) if ack.client_nonce != gate.nonce));
        r.received(1, &gate.tap(11), 0);
        assert_eq!(verdict(&r, Rule::RefusesWrongNonce), Verdict::Fail);
    }

    #[test]
    fn a_tap_left_owed_and_never_resent_fails_at_the_end() {
        let mut r = referee(16);
        let mut gate = TestGate::new();
        say_hello(&mut r, &mut gate, 0);
        first_stage(&mut r, &gate);
        r.closed(0);
        assert_eq!(verdict(&r, Rule::BadTagAnswerNotTaken), Verdict::Fail);
        assert_eq!(verdict(&r, Rule::EveryOutcomeHandled), Verdict::Pass);
    }

    /// Opens version-2 connection `id`, says Hello and DenyAck `held`; the frames sent back.
    fn follow(r: &mut Referee, gate: &mut TestGate, id: ConnectionId, held: u64) -> Vec<Frame> {
        follow_at(r, gate, id, held, 0)
    }

    /// Connection `id` in version 2, its Hello and DenyAck (of `held`) sent at `now_ms`: what
    /// the referee sends after the HelloAck.
    fn follow_at(
        r: &mut Referee,
        gate: &mut TestGate,
        id: ConnectionId,
        held: u64,
        now_ms: u64,
    ) -> Vec<Frame> {
        r.opened(id, Version::V2);
        let hello = gate.hello();
        let (frames, _, _) = gate.read(&r.received(id, &hello, now_ms));
        assert!(matches!(frames[..], [Frame::HelloAck(_)]), "{frames:?}");
        gate.read(&r.received(id, &gate.deny_ack(held), now_ms)).0
    }

    /// Takes a version-2 gate through all of version 2 but rule 3, and on to holding rules
    /// that allow no fare: returns its next sequence; it holds list version 2.
    fn holding_rules_allowing_no_fare(r: &mut Referee, gate: &mut TestGate) -> u64 {
        say_hello(r, gate, 0);
        first_stage(r, gate);
        r.closed(0);
        // The out-of-step connection: an upload (busy, then again), the list acknowledged,
        // and the connection closed on the change that skips a version.
        follow(r, gate, 1, 0);
        r.received(1, &gate.upload(12, 0), 0);
        r.received(1, &gate.upload(13, 0), 0);
        r.received(1, &gate.deny_ack(0), 0);
        r.closed(1);
        // Refused by the gate or the referee at the Hello.
        for id in 2..=4 {
            r.opened(id, Version::V2);
            let hello = gate.hello();
            r.received(id, &hello, 0);
            r.closed(id);
        }
        assert_eq!(verdict(r, Rule::BusyUploadAgain), Verdict::Pass);
        follow(r, gate, 5, 0);
        let (frames, _, _) = gate.read(&r.received(5, &gate.tap(14), 0));
        let rules = frames.iter().find_map(|f| match f {
            Frame::OfflineRules(rules) => Some(rules.max_fare_fen),
            _ => None,
        });
        assert_eq!(rules, Some(0), "{frames:?}");
        r.received(5, &gate.deny_ack(2), 0);
        r.received(5, &gate.tap(15), 0);
        r.closed(5);
        16
    }

    #[test]
    fn a_gate_that_approves_offline_under_rules_allowing_no_fare_fails_rule_3() {
        // Back after 2 s away with nothing to upload: kept.
        let mut r = referee_v2();
        let mut gate = TestGate::new();
        let next = holding_rules_allowing_no_fare(&mut r, &mut gate);
        assert_eq!(verdict(&r, Rule::FareLimitKept), Verdict::NotExercised);
        let notices = r.take_notices();
        assert!(
            notices
                .iter()
                .any(|n| n.contains("max_fare_fen 0") && n.contains("take its link away")),
            "{notices:?}"
        );
        let frames = follow_at(&mut r, &mut gate, 6, 2, 2_000);
        assert!(
            matches!(frames.first(), Some(Frame::OfflineRules(rules)) if rules.max_fare_fen == 0),
            "{frames:?}"
        );
        r.received(6, &gate.tap(next), 2_000);
        assert_eq!(verdict(&r, Rule::FareLimitKept), Verdict::Pass);

        // Back with a tap approved under them.
        let mut r = referee_v2();
        let mut gate = TestGate::new();
        let next = holding_rules_allowing_no_fare(&mut r, &mut gate);
        follow_at(&mut r, &mut gate, 6, 2, 2_000);
        r.received(6, &gate.upload(next, 2), 2_000);
        r.received(6, &gate.tap(next + 1), 2_000);
        assert_eq!(verdict(&r, Rule::FareLimitKept), Verdict::Fail);

        // Back too soon to have decided anything offline: not judged.
        let mut r = referee_v2();
        let mut gate = TestGate::new();
        let next = holding_rules_allowing_no_fare(&mut r, &mut gate);
        follow_at(&mut r, &mut gate, 6, 2, 200);
        r.received(6, &gate.tap(next), 200);
        assert_eq!(verdict(&r, Rule::FareLimitKept), Verdict::NotExercised);
    }

    #[test]
    fn a_version_2_gate_gets_the_rules_and_the_list_and_must_come_back_with_the_version_it_held() {
        let mut r = referee_v2();
        let mut gate = TestGate::new();
        let frames = follow(&mut r, &mut gate, 0, 0);
        assert!(
            matches!(
                &frames[..],
                [Frame::OfflineRules(_), Frame::DenyList(l), Frame::DenyChanges(c)]
                    if l.version == 0 && l.first && l.last && c.first_version == 1
            ),
            "{frames:?}"
        );
        assert_eq!(verdict(&r, Rule::DenyAckHolds), Verdict::Pass);
        r.received(0, &gate.deny_ack(1), 0);
        assert_eq!(verdict(&r, Rule::AcksEachStep), Verdict::Pass);
        r.closed(0);
        // Back holding version 1: the change since, and one more.
        let frames = follow(&mut r, &mut gate, 1, 1);
        assert!(
            matches!(&frames[..], [Frame::OfflineRules(_), Frame::DenyChanges(c)] if c.first_version == 2),
            "{frames:?}"
        );
        r.received(1, &gate.deny_ack(5), 0);
        assert_eq!(verdict(&r, Rule::AcksEachStep), Verdict::Fail);
        r.closed(1);
        // Back having forgotten its list.
        follow(&mut r, &mut gate, 2, 0);
        assert_eq!(verdict(&r, Rule::DenyAckHolds), Verdict::Fail);
    }

    #[test]
    fn a_gate_that_does_not_echo_the_history_it_was_sent_fails() {
        let mut r = referee_v2();
        let mut gate = TestGate::new();
        follow(&mut r, &mut gate, 0, 0);
        let sent = gate.histories[&1];
        r.received(0, &gate.deny_ack_of_history(1, !sent), 0);
        assert_eq!(verdict(&r, Rule::AcksEachStep), Verdict::Fail);

        let mut r = referee_v2();
        let mut gate = TestGate::new();
        follow(&mut r, &mut gate, 0, 0);
        r.received(0, &gate.deny_ack(1), 0);
        r.closed(0);
        assert_eq!(verdict(&r, Rule::AcksEachStep), Verdict::Pass);
        r.opened(1, Version::V2);
        let hello = gate.hello();
        r.received(1, &hello, 0);
        r.received(1, &gate.deny_ack_of_history(1, !sent), 0);
        assert_eq!(verdict(&r, Rule::DenyAckHolds), Verdict::Fail);
    }

    #[test]
    fn uploads_of_a_listed_card_after_a_new_tap_or_again_after_busy_fail() {
        let mut r = referee_v2();
        let mut gate = TestGate::new();
        r.opened(0, Version::V2);
        let hello = gate.hello();
        r.received(0, &hello, 0);
        // The referee lists the card the gate last tapped: card 42 at version 1.
        r.received(0, &gate.tap(1), 0);
        gate.read(&r.received(0, &gate.deny_ack(0), 0));
        r.received(0, &gate.deny_ack(1), 0);
        r.closed(0);
        follow(&mut r, &mut gate, 1, 1);
        let (frames, _, _) = gate.read(&r.received(1, &gate.upload(2, 1), 0));
        assert!(
            matches!(frames[..], [Frame::OfflineReceipt(ref receipt)] if receipt.status == OfflineStatus::Busy),
            "{frames:?}"
        );
        assert_eq!(verdict(&r, Rule::OfflineKeepsRules), Verdict::Fail);
        assert_eq!(verdict(&r, Rule::UploadsFirst), Verdict::Pass);
        // Again under the same sequence, not a new one.
        r.received(1, &gate.upload(2, 1), 0);
        assert_eq!(verdict(&r, Rule::BusyUploadAgain), Verdict::Fail);
        // A new tap, then an upload.
        r.received(1, &gate.tap(3), 0);
        r.received(1, &gate.upload(4, 0), 0);
        assert_eq!(verdict(&r, Rule::UploadsFirst), Verdict::Fail);
    }

    #[test]
    fn an_upload_naming_a_history_the_list_never_had_fails() {
        for history_known in [true, false] {
            let mut r = referee_v2();
            let mut gate = TestGate::new();
            follow(&mut r, &mut gate, 0, 0);
            r.received(0, &gate.deny_ack(1), 0);
            r.closed(0);
            if !history_known {
                gate.histories.insert(1, !gate.histories[&1]);
            }
            follow(&mut r, &mut gate, 1, 1);
            // The gate's first upload is answered busy; its rules are checked all the same.
            r.received(1, &gate.upload(2, 1), 0);
            let expected = if history_known {
                Verdict::Pass
            } else {
                Verdict::Fail
            };
            assert_eq!(verdict(&r, Rule::OfflineKeepsRules), expected);
        }
    }

    #[test]
    fn a_gate_must_close_on_deny_list_changes_out_of_step() {
        for closes in [true, false] {
            let mut r = referee_v2();
            let mut gate = TestGate::new();
            say_hello(&mut r, &mut gate, 0);
            first_stage(&mut r, &gate);
            r.closed(0);
            let frames = follow(&mut r, &mut gate, 1, 0);
            let Some(Frame::DenyChanges(skipping)) = frames.last() else {
                panic!("{frames:?}");
            };
            assert_eq!(skipping.first_version, 2, "version 1 is skipped");
            if closes {
                r.closed(1);
                assert_eq!(verdict(&r, Rule::RefusesOutOfStep), Verdict::Pass);
            } else {
                let (_, _, closed) = gate.read(&r.tick(1, 1000));
                assert!(closed);
                r.closed(1);
                assert_eq!(verdict(&r, Rule::RefusesOutOfStep), Verdict::Fail);
            }
        }
    }
}

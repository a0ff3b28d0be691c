//! The session after its Hello: taps read in order, answered in the same order as their
//! answers become ready, an Error and a close when the session ends.
//!
//! The server decides taps and records approvals (I/O); this machine keeps each answer's place,
//! says which tap to decide, holds an answer back until its recording is done, and turns
//! refusals, silence, shutdown and revocation into the Error the gate is told.

use bytes::BytesMut;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tapgate_protocol::{
    Admission, Concession, DenyAck, ErrorCode, ErrorFrame, Frame, FrameType, MacKey, OfflineTap,
    OpenError, Outcome, RIDES_LEFT_NOT_APPLICABLE, Reason, SealedFrame, SequenceWindow, Tag, Tap,
    TapResult, Version, seal,
};

/// Where an answer's recording stands: its journal record synced (an approval) and its copy
/// shared with the other gateways (when there are any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Pending,
    Done,
    /// The journal could not record it: the approval is withdrawn and the tap answered Busy.
    Failed,
}

/// What an answer waits for before it may go out, asked without waiting. The server's
/// implementation holds the journal's and the sharing queue's completions.
pub trait Recording {
    fn poll_recorded(&mut self) -> Recorded;
}

/// The Busy answer: the tap changed nothing and may be sent again under a new sequence.
pub fn busy(sequence: u64) -> TapResult {
    TapResult {
        sequence,
        outcome: Outcome::Busy,
        reason: Reason::Overloaded,
        concession: Concession::None,
        fare_fen: 0,
        rides_left: RIDES_LEFT_NOT_APPLICABLE,
    }
}

/// What the server is to do for a frame; it reports back with [`TapSession::decided`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Decide this new tap. Capacity for it is the server's to claim first (a journal slot):
    /// without it the answer is Busy and nothing has changed.
    Decide { tap: Tap, tag: Tag },
    /// Record this new offline tap (version 2), on the same terms as `Decide`.
    Upload { upload: OfflineTap, tag: Tag },
    /// A resend of an answered tap: this answer again, journaled first when it is an approval
    /// another gateway decided and this one has not recorded.
    Resend(TapResult),
    /// The deny list the gate holds (version 2): where its list goes on from. No answer is owed
    /// for it.
    DenyHeld(DenyAck),
}

/// A tap whose first copy is still being decided, by this connection or another one of the
/// same gate: its answer is the first copy's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirstCopy {
    pub sequence: u64,
    pub tag: Tag,
}

/// What the answer at the head of the queue waits for, for the server to wait on.
pub enum HeadWait<'a, W> {
    Recording(&'a mut W),
    /// Report the first copy's answer with [`TapSession::first_copy_answered`].
    FirstCopy(FirstCopy),
}

/// What [`TapSession::poll_transmit`] put in the buffer, and what follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmit {
    /// Answers (maybe none); the session goes on.
    Open,
    /// The last answers and then this Error: send them, finish the stream, close the
    /// connection with the Error's code.
    Close(ErrorFrame),
    /// The last answers; nothing more is read or owed. Close with code 0 (`done`) once the gate
    /// has them.
    Done,
}

enum Answer<W> {
    /// Handed to the server as [`Work`]; its place in the order is kept.
    Deciding {
        sequence: u64,
    },
    Ready(TapResult),
    Recording {
        result: TapResult,
        recording: W,
    },
    FirstCopy(FirstCopy),
    Fatal(ErrorFrame),
}

/// How an answer goes out: as the TapResult a Tap is owed, or as the OfflineReceipt an
/// OfflineTap is owed. The window holds both as TapResults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    TapResult,
    Receipt { already: bool },
}

impl Form {
    /// The form of the answer to a Tap, or to an OfflineTap (`upload`) that is a copy of one
    /// already seen (`already`).
    fn of(upload: bool, already: bool) -> Form {
        if upload {
            Form::Receipt { already }
        } else {
            Form::TapResult
        }
    }
}

struct Queued<W> {
    /// When the frame it answers was read, for the answer latency.
    read_at: Instant,
    form: Form,
    answer: Answer<W>,
}

/// One admitted gate's tap session. `W` is how the server tracks an answer's recording.
pub struct TapSession<W> {
    mac: MacKey,
    /// The protocol version the connection negotiated; frames of later versions are unknown.
    version: Version,
    max_in_flight: u16,
    idle_timeout: Duration,
    queue: VecDeque<Queued<W>>,
    reading: bool,
    last_frame: Instant,
}

impl<W: Recording> TapSession<W> {
    pub fn new(
        mac: MacKey,
        version: Version,
        max_in_flight: u16,
        idle_timeout: Duration,
        now: Instant,
    ) -> Self {
        TapSession {
            mac,
            version,
            max_in_flight,
            idle_timeout,
            // Grows to what the gate keeps in flight; an idle gate holds none.
            queue: VecDeque::new(),
            reading: true,
            last_frame: now,
        }
    }

    /// Whether frames are still read; after a fatal error, shutdown or the end of the stream
    /// only the answers already owed go out.
    pub fn is_reading(&self) -> bool {
        self.reading
    }

    /// Whether the server should read the next frame now. Not while the answers owed fill
    /// the queue's bound: the gate then waits on QUIC flow control instead of growing it.
    pub fn wants_frame(&self) -> bool {
        self.reading && self.queue.len() < self.queue_bound()
    }

    /// Answers owed at most: `max_in_flight` decisions, as many Busy answers or resends.
    fn queue_bound(&self) -> usize {
        2 * usize::from(self.max_in_flight)
    }

    /// A frame read from the gate. `window` is the gate's resend window, shared by all its
    /// connections.
    pub fn handle_frame(
        &mut self,
        frame: &SealedFrame,
        window: &mut SequenceWindow<TapResult>,
        now: Instant,
    ) -> Option<Work> {
        if !self.reading {
            return None;
        }
        self.last_frame = now;
        let answer = match frame.frame_type() {
            // What this connection's version does not have is as unknown as a type no version has.
            ty if ty.since() > self.version => fatal(ErrorCode::UnknownFrameType, 0),
            FrameType::Tap | FrameType::OfflineTap => match self.classify_tap(frame, window) {
                (form, Step::Work(sequence, work)) => {
                    self.push(now, form, Answer::Deciding { sequence });
                    return Some(work);
                }
                (form, Step::Answer(answer)) => {
                    self.push(now, form, answer);
                    return None;
                }
            },
            FrameType::DenyAck => match frame.open(&self.mac) {
                Ok(Frame::DenyAck(ack)) => return Some(Work::DenyHeld(ack)),
                Ok(_) => unreachable!("a frame of type DenyAck parses as a DenyAck"),
                Err(e) => fatal(e.error_code(), 0),
            },
            FrameType::Hello => fatal(ErrorCode::DuplicateHello, 0),
            _ => fatal(ErrorCode::UnexpectedFrame, 0),
        };
        self.push(now, Form::TapResult, answer);
        None
    }

    /// Bytes that are no frame (PROTOCOL.md section 2): the Error, then close.
    pub fn handle_undecodable(&mut self, code: ErrorCode, now: Instant) {
        self.last_frame = now;
        self.stop(code, now);
    }

    /// The gate finished its stream (or it broke): what is owed still goes out.
    pub fn handle_end(&mut self) {
        self.reading = false;
    }

    pub fn handle_shutdown(&mut self, now: Instant) {
        self.stop(ErrorCode::ShuttingDown, now);
    }

    /// The gate was revoked in the directory while connected.
    pub fn handle_revoked(&mut self, now: Instant) {
        self.stop(ErrorCode::UnknownTerminal, now);
    }

    /// When the gate's silence becomes an idle timeout: only while reading with nothing owed
    /// to it (QUIC keep-alives keep the connection itself from idling).
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.reading && self.queue.is_empty()).then(|| self.last_frame + self.idle_timeout)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|deadline| now >= deadline) {
            self.stop(ErrorCode::IdleTimeout, now);
        }
    }

    /// The server's report on [`Work`] for tap `sequence`: its answer, and what the answer
    /// waits for before it may go out (`None` when nothing).
    pub fn decided(&mut self, sequence: u64, result: TapResult, recording: Option<W>) {
        let Some(queued) = self.queue.iter_mut().rev().find(
            |queued| matches!(queued.answer, Answer::Deciding { sequence: s } if s == sequence),
        ) else {
            debug_assert!(false, "decided tap {sequence} was not handed out as work");
            return;
        };
        queued.answer = match recording {
            Some(recording) => Answer::Recording { result, recording },
            None => Answer::Ready(result),
        };
    }

    /// What the head of the queue waits for, when it cannot go out now.
    pub fn head_wait(&mut self) -> Option<HeadWait<'_, W>> {
        match &mut self.queue.front_mut()?.answer {
            Answer::Recording { recording, .. } => Some(HeadWait::Recording(recording)),
            Answer::FirstCopy(first) => Some(HeadWait::FirstCopy(*first)),
            _ => None,
        }
    }

    /// The first copy's answer for the [`FirstCopy`] at the head, or `None` when it did not
    /// come in time: that resend is then left unanswered (the gate sends it again).
    pub fn first_copy_answered(&mut self, answer: Option<TapResult>) {
        let Some(head) = self.queue.front_mut() else {
            return;
        };
        if !matches!(head.answer, Answer::FirstCopy(_)) {
            return;
        }
        match answer {
            Some(answer) => head.answer = Answer::Ready(answer),
            None => {
                self.queue.pop_front();
            }
        }
    }

    /// Seals into `out` every answer at the head of the queue that may go out, in tap order,
    /// calling `answered` with each as it goes (the server puts it in the gate's window then,
    /// so a resend is never answered with an approval that is not yet durable).
    pub fn poll_transmit(
        &mut self,
        out: &mut BytesMut,
        mut answered: impl FnMut(TapResult, Instant),
    ) -> Transmit {
        while let Some(head) = self.queue.front_mut() {
            let result = match &mut head.answer {
                Answer::Deciding { .. } | Answer::FirstCopy(_) => break,
                Answer::Fatal(error) => {
                    let error = *error;
                    self.queue.clear();
                    seal(&Frame::Error(error), &self.mac, out);
                    return Transmit::Close(error);
                }
                Answer::Ready(result) => *result,
                Answer::Recording { result, recording } => match recording.poll_recorded() {
                    Recorded::Pending => break,
                    Recorded::Done => *result,
                    Recorded::Failed => busy(result.sequence),
                },
            };
            let (read_at, form) = (head.read_at, head.form);
            self.queue.pop_front();
            answered(result, read_at);
            let frame = match form {
                Form::TapResult => Frame::TapResult(result),
                Form::Receipt { already } => {
                    Frame::OfflineReceipt(crate::offline::receipt(result, already))
                }
            };
            seal(&frame, &self.mac, out);
        }
        if !self.reading && self.queue.is_empty() {
            Transmit::Done
        } else {
            Transmit::Open
        }
    }

    fn push(&mut self, read_at: Instant, form: Form, answer: Answer<W>) {
        if matches!(answer, Answer::Fatal(_)) {
            self.reading = false;
        }
        self.queue.push_back(Queued {
            read_at,
            form,
            answer,
        });
        // Frames are read only below the bound; the one Error that ends reading may pass it.
        debug_assert!(self.queue.len() <= self.queue_bound() + 1);
    }

    /// Ends reading with this Error, sent after every answer owed before it.
    fn stop(&mut self, code: ErrorCode, now: Instant) {
        if self.reading {
            self.push(now, Form::TapResult, fatal(code, 0));
        }
    }

    /// Classifies a Tap or OfflineTap frame against the gate's window, with the form its
    /// answer takes.
    fn classify_tap(
        &self,
        frame: &SealedFrame,
        window: &mut SequenceWindow<TapResult>,
    ) -> (Form, Step<W>) {
        let upload = frame.frame_type() == FrameType::OfflineTap;
        let fail = |answer| (Form::of(upload, false), Step::Answer(answer));
        let (tap, offline) = match frame.open(&self.mac) {
            Ok(Frame::Tap(tap)) => (tap, None),
            Ok(Frame::OfflineTap(offline)) => (offline.tap, Some(offline)),
            Ok(_) => unreachable!("a frame of type Tap or OfflineTap parses as one"),
            // Authentic but not a tap we can read (an unknown issuer or kind): the Error names
            // the tap it is about, as PROTOCOL.md section 4.5 says.
            Err(e @ OpenError::Decode(_)) => {
                return fail(fatal(e.error_code(), frame.sequence().unwrap_or(0)));
            }
            // Not authentic: nothing in it is believed, its sequence included.
            Err(e) => return fail(fatal(e.error_code(), 0)),
        };
        let tag = frame.tag();
        let fresh = match offline {
            Some(upload) => Work::Upload { upload, tag },
            None => Work::Decide { tap, tag },
        };
        let already = Form::of(upload, true);
        match window.admit(tap.sequence, tag) {
            // Up to `max_in_flight` unanswered taps, as the HelloAck announces; beyond that,
            // Busy before anything is decided.
            Admission::Fresh if self.queue.len() >= usize::from(self.max_in_flight) => {
                fail(Answer::Ready(busy(tap.sequence)))
            }
            Admission::Fresh => (Form::of(upload, false), Step::Work(tap.sequence, fresh)),
            Admission::Resend(answer) => (already, Step::Work(tap.sequence, Work::Resend(answer))),
            Admission::InFlight => (
                already,
                Step::Answer(Answer::FirstCopy(FirstCopy {
                    sequence: tap.sequence,
                    tag,
                })),
            ),
            Admission::Conflict => fail(fatal(ErrorCode::SequenceConflict, tap.sequence)),
            Admission::Replay => fail(fatal(ErrorCode::Replay, tap.sequence)),
        }
    }
}

enum Step<W> {
    /// Work for the tap with this sequence.
    Work(u64, Work),
    Answer(Answer<W>),
}

fn fatal<W>(code: ErrorCode, sequence: u64) -> Answer<W> {
    Answer::Fatal(ErrorFrame { code, sequence })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{approval, mac, sealed, tap};
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use tapgate_protocol::{ErrorFrame, Hello, Mode, OfflineTap};

    const IDLE: Duration = Duration::from_secs(60);

    /// A recording the test completes by hand.
    #[derive(Clone, Default)]
    struct Flag(Rc<Cell<Option<Recorded>>>);

    impl Flag {
        fn set(&self, recorded: Recorded) {
            self.0.set(Some(recorded));
        }
    }

    impl Recording for Flag {
        fn poll_recorded(&mut self) -> Recorded {
            self.0.get().unwrap_or(Recorded::Pending)
        }
    }

    /// The session and the gate's window, driven as the server drives them.
    struct Gate {
        session: TapSession<Flag>,
        window: SequenceWindow<TapResult>,
        now: Instant,
    }

    impl Gate {
        fn new(max_in_flight: u16, window: u16) -> Gate {
            let now = Instant::now();
            Gate {
                session: TapSession::new(mac(), Version::V2, max_in_flight, IDLE, now),
                window: SequenceWindow::new(window),
                now,
            }
        }

        fn send(&mut self, frame: &SealedFrame) -> Option<Work> {
            self.session.handle_frame(frame, &mut self.window, self.now)
        }

        /// Sends a new tap and reports it decided with `recording` (ready when `None`).
        fn decide(&mut self, sequence: u64, recording: Option<Flag>) {
            let work = self.send(&tap(sequence, 1));
            assert!(
                matches!(work, Some(Work::Decide { tap, .. }) if tap.sequence == sequence),
                "{work:?}"
            );
            self.session
                .decided(sequence, approval(sequence), recording);
        }

        /// What went out, as the gate reads it; each answer enters the window as it goes.
        fn transmit(&mut self) -> (Vec<Frame>, Transmit) {
            let mut out = BytesMut::new();
            let window = &mut self.window;
            let transmit = self.session.poll_transmit(&mut out, |result, _| {
                window.complete(result.sequence, result);
            });
            let mut frames = Vec::new();
            while let Some(frame) = tapgate_protocol::take_frame(&mut out).unwrap() {
                frames.push(frame.open(&mac()).unwrap());
            }
            (frames, transmit)
        }
    }

    fn answered(sequences: &[u64]) -> Vec<Frame> {
        sequences
            .iter()
            .map(|&s| Frame::TapResult(approval(s)))
            .collect()
    }

    fn error(code: ErrorCode, sequence: u64) -> Frame {
        Frame::Error(ErrorFrame { code, sequence })
    }

    #[test]
    fn answers_go_out_in_tap_order_whatever_order_they_are_recorded_in() {
        let mut gate = Gate::new(8, 32);
        let (first, third) = (Flag::default(), Flag::default());
        gate.decide(1, Some(first.clone()));
        gate.decide(2, None);
        gate.decide(3, Some(third.clone()));
        third.set(Recorded::Done);
        assert_eq!(gate.transmit(), (vec![], Transmit::Open));
        assert!(matches!(
            gate.session.head_wait(),
            Some(HeadWait::Recording(_))
        ));
        first.set(Recorded::Done);
        assert_eq!(gate.transmit(), (answered(&[1, 2, 3]), Transmit::Open));
        assert!(gate.session.head_wait().is_none());
    }

    /// An upload is answered with receipts, a copy of it with `already`; a Tap under its
    /// sequence is a different frame, so a conflict; a version-1 session does not know it.
    #[test]
    fn offline_taps_get_receipts_and_share_the_taps_sequence() {
        let upload = OfflineTap {
            tap: Tap {
                sequence: 1,
                card_id: 6_222_000_000_000_001,
                issuer: tapgate_protocol::Issuer::ChongqingSsc,
                kind: tapgate_protocol::TapKind::Flat,
                line: 3,
                stop: 0,
                gate_time_ms: 1_000,
            },
            deny_version: 0,
            deny_history: 0,
            offline_since_ms: 0,
        };
        let frame = sealed(&Frame::OfflineTap(upload));
        let mut gate = Gate::new(8, 32);
        let work = gate.send(&frame);
        assert!(
            matches!(work, Some(Work::Upload { upload: u, .. }) if u == upload),
            "{work:?}"
        );
        gate.session.decided(1, approval(1), None);
        let receipt = |status| {
            Frame::OfflineReceipt(tapgate_protocol::OfflineReceipt {
                sequence: 1,
                status,
                flag: Reason::Approved,
                fare_fen: 200,
            })
        };
        use tapgate_protocol::OfflineStatus;
        assert_eq!(gate.transmit().0, vec![receipt(OfflineStatus::Recorded)]);
        let work = gate.send(&frame);
        let Some(Work::Resend(answer)) = work else {
            panic!("{work:?}");
        };
        gate.session.decided(1, answer, None);
        assert_eq!(gate.transmit().0, vec![receipt(OfflineStatus::Already)]);
        assert_eq!(gate.send(&tap(1, 1)), None);
        assert_eq!(
            gate.transmit().0,
            vec![error(ErrorCode::SequenceConflict, 1)]
        );

        let mut old = Gate::new(8, 32);
        old.session = TapSession::new(mac(), Version::V1, 8, IDLE, old.now);
        assert_eq!(old.send(&frame), None);
        assert_eq!(
            old.transmit().0,
            vec![error(ErrorCode::UnknownFrameType, 0)]
        );
    }

    #[test]
    fn an_approval_the_journal_could_not_record_is_answered_busy() {
        let mut gate = Gate::new(8, 32);
        let recording = Flag::default();
        gate.decide(1, Some(recording.clone()));
        recording.set(Recorded::Failed);
        assert_eq!(gate.transmit().0, vec![Frame::TapResult(busy(1))]);
    }

    #[test]
    fn a_tap_beyond_max_in_flight_is_busy_before_anything_is_decided() {
        let mut gate = Gate::new(2, 32);
        let recording = Flag::default();
        gate.decide(1, Some(recording.clone()));
        gate.decide(2, Some(recording.clone()));
        assert_eq!(gate.send(&tap(3, 1)), None, "no work for the server");
        // Still not out: it waits behind the first two, in order.
        assert_eq!(gate.transmit(), (vec![], Transmit::Open));
        recording.set(Recorded::Done);
        let mut expected = answered(&[1, 2]);
        expected.push(Frame::TapResult(busy(3)));
        assert_eq!(gate.transmit().0, expected);
        let mut gate = Gate::new(2, 32);
        gate.decide(1, Some(Flag::default()));
        assert!(gate.send(&tap(2, 1)).is_some());
    }

    #[test]
    fn frames_are_not_read_while_the_answers_owed_fill_the_bound() {
        let mut gate = Gate::new(2, 32);
        let recording = Flag::default();
        gate.decide(1, Some(recording.clone()));
        gate.decide(2, None);
        for sequence in 3..=4 {
            assert!(gate.session.wants_frame());
            assert_eq!(gate.send(&tap(sequence, 1)), None, "busy");
        }
        assert!(!gate.session.wants_frame());
        recording.set(Recorded::Done);
        let (frames, _) = gate.transmit();
        assert_eq!(frames.len(), 4);
        assert!(gate.session.wants_frame());
    }

    #[test]
    fn a_resend_while_its_first_copy_is_decided_gets_the_first_copys_answer() {
        let mut gate = Gate::new(8, 32);
        assert!(gate.send(&tap(1, 1)).is_some());
        assert_eq!(gate.send(&tap(1, 1)), None);
        gate.session.decided(1, approval(1), None);
        assert_eq!(gate.transmit(), (answered(&[1]), Transmit::Open));
        let Some(HeadWait::FirstCopy(first)) = gate.session.head_wait() else {
            panic!("the resend waits for its first copy");
        };
        assert_eq!(first.sequence, 1);
        gate.session.first_copy_answered(Some(approval(1)));
        gate.decide(2, None);
        assert_eq!(gate.transmit(), (answered(&[1, 2]), Transmit::Open));
    }

    #[test]
    fn a_resend_whose_first_copy_never_answers_is_dropped_and_the_rest_go_on() {
        let mut gate = Gate::new(8, 32);
        assert!(gate.send(&tap(1, 1)).is_some());
        assert_eq!(gate.send(&tap(1, 1)), None);
        gate.decide(2, None);
        gate.session.decided(1, approval(1), None);
        assert_eq!(gate.transmit().0, answered(&[1]));
        gate.session.first_copy_answered(None);
        assert_eq!(gate.transmit().0, answered(&[2]));
    }

    #[test]
    fn a_resend_of_an_answered_tap_is_handed_back_with_its_answer() {
        let mut gate = Gate::new(8, 32);
        gate.decide(1, None);
        gate.transmit();
        assert_eq!(gate.send(&tap(1, 1)), Some(Work::Resend(approval(1))));
        gate.session.decided(1, approval(1), None);
        assert_eq!(gate.transmit().0, answered(&[1]));
    }

    #[test]
    fn a_conflict_or_replay_is_told_after_the_answers_owed_and_ends_reading() {
        for (window, (resent, stop), code) in [
            (32, (1, 2), ErrorCode::SequenceConflict),
            (2, (1, 1), ErrorCode::Replay),
        ] {
            let mut gate = Gate::new(8, window);
            for sequence in 1..=3 {
                gate.decide(sequence, None);
            }
            assert_eq!(gate.send(&tap(resent, stop)), None);
            assert!(!gate.session.wants_frame());
            assert_eq!(gate.send(&tap(4, 1)), None, "nothing is read after it");
            let (frames, transmit) = gate.transmit();
            let mut expected = answered(&[1, 2, 3]);
            expected.push(error(code, resent));
            assert_eq!(frames, expected);
            assert_eq!(
                transmit,
                Transmit::Close(ErrorFrame {
                    code,
                    sequence: resent
                })
            );
        }
    }

    #[test]
    fn a_tap_that_does_not_verify_or_parse_ends_the_session() {
        let mut gate = Gate::new(8, 32);
        let mut bytes = BytesMut::new();
        bytes.extend_from_slice(tap(9, 1).mac_input());
        bytes.extend_from_slice(&[0; 16]);
        let forged = tapgate_protocol::decode_one(&bytes).unwrap();
        assert_eq!(gate.send(&forged), None);
        assert_eq!(gate.transmit().0, vec![error(ErrorCode::BadMac, 0)]);
        assert_eq!(gate.window.highest(), 0, "the window is untouched");

        // Issuer 5 is not in the registry; the tag is right for those bytes, so the Error
        // names the tap's sequence.
        let mut gate = Gate::new(8, 32);
        let mut bytes = BytesMut::from(tap(9, 1).mac_input());
        bytes[4 + 16] = 5;
        let tag = mac().tag(&bytes);
        bytes.extend_from_slice(&tag);
        let unreadable = tapgate_protocol::decode_one(&bytes).unwrap();
        gate.send(&unreadable);
        assert_eq!(gate.transmit().0, vec![error(ErrorCode::MalformedFrame, 9)]);
        assert_eq!(gate.window.highest(), 0);
    }

    #[test]
    fn a_second_hello_a_gateway_frame_or_undecodable_bytes_end_the_session() {
        let hello = sealed(&Frame::Hello(Hello {
            terminal_id: 1,
            key_version: 1,
            mode: Mode::Bus,
            area: tapgate_protocol::AreaCode(500_101),
            operator: 1,
            client_nonce: 0,
            gate_time_ms: 0,
        }));
        let ack = sealed(&Frame::TapResult(approval(1)));
        for (frame, code) in [
            (Some(hello), ErrorCode::DuplicateHello),
            (Some(ack), ErrorCode::UnexpectedFrame),
            (None, ErrorCode::FrameTooLarge),
        ] {
            let mut gate = Gate::new(8, 32);
            gate.decide(1, None);
            match frame {
                Some(frame) => assert_eq!(gate.send(&frame), None),
                None => gate.session.handle_undecodable(code, gate.now),
            }
            let (frames, transmit) = gate.transmit();
            assert_eq!(frames, vec![Frame::TapResult(approval(1)), error(code, 0)]);
            assert!(matches!(transmit, Transmit::Close(e) if e.code == code));
        }
    }

    #[test]
    fn shutdown_and_revocation_send_what_was_decided_first() {
        for (code, stop) in [
            (
                ErrorCode::ShuttingDown,
                TapSession::handle_shutdown as fn(&mut TapSession<Flag>, Instant),
            ),
            (ErrorCode::UnknownTerminal, TapSession::handle_revoked),
        ] {
            let mut gate = Gate::new(8, 32);
            let recording = Flag::default();
            gate.decide(1, Some(recording.clone()));
            stop(&mut gate.session, gate.now);
            assert!(!gate.session.wants_frame());
            assert_eq!(gate.transmit(), (vec![], Transmit::Open));
            recording.set(Recorded::Done);
            let (frames, transmit) = gate.transmit();
            assert_eq!(frames, vec![Frame::TapResult(approval(1)), error(code, 0)]);
            assert!(matches!(transmit, Transmit::Close(e) if e.code == code));
        }
    }

    #[test]
    fn silence_is_an_idle_timeout_only_when_nothing_is_owed() {
        let mut gate = Gate::new(8, 32);
        let recording = Flag::default();
        gate.decide(1, Some(recording.clone()));
        assert_eq!(gate.session.poll_timeout(), None);
        gate.session.handle_timeout(gate.now + 2 * IDLE);
        recording.set(Recorded::Done);
        assert_eq!(gate.transmit(), (answered(&[1]), Transmit::Open));
        let deadline = gate.session.poll_timeout().expect("idle deadline");
        assert_eq!(deadline, gate.now + IDLE);
        gate.session
            .handle_timeout(deadline - Duration::from_millis(1));
        assert!(gate.session.wants_frame());
        gate.session.handle_timeout(deadline);
        assert_eq!(gate.transmit().0, vec![error(ErrorCode::IdleTimeout, 0)]);
    }

    #[test]
    fn the_end_of_the_gates_stream_closes_once_everything_owed_is_out() {
        let mut gate = Gate::new(8, 32);
        let recording = Flag::default();
        gate.decide(1, Some(recording.clone()));
        gate.session.handle_end();
        assert_eq!(gate.transmit(), (vec![], Transmit::Open));
        recording.set(Recorded::Done);
        assert_eq!(gate.transmit(), (answered(&[1]), Transmit::Done));
    }

    #[test]
    fn taps_outside_the_window_are_replays_and_inside_it_resends() {
        let mut gate = Gate::new(8, 4);
        for sequence in 1..=6 {
            gate.decide(sequence, None);
        }
        gate.transmit();
        assert_eq!(gate.send(&tap(3, 1)), Some(Work::Resend(approval(3))));
        gate.session.decided(3, approval(3), None);
        gate.transmit();
        assert_eq!(gate.send(&tap(2, 1)), None);
        assert_eq!(gate.transmit().0, vec![error(ErrorCode::Replay, 2)]);
    }
}

//! `tapgate conformance gateway`: drives a gateway, as a gate would, through the rules of
//! PROTOCOL.md that a gate can observe, and reports each as PASS or FAIL. It links no gateway
//! code: a vendor can point it at any implementation of the protocol.

use super::Check;
use crate::client::{ClientError, EarlyHello, GateClient, GateIdentity, hello};
use std::net::SocketAddr;
use tapgate_protocol::{
    DenyAck, DenyList, ErrorCode, Frame, GateDenyList, OfflineReceipt, OfflineStatus, OfflineTap,
    Outcome, Tap, TapKind,
};

/// What the driver needs to know of the gateway under test.
pub struct Target {
    pub endpoint: quinn::Endpoint,
    pub addr: SocketAddr,
    /// A gate the gateway has provisioned, with its key.
    pub gate: GateIdentity,
    /// A card the gateway approves at that gate.
    pub card_id: u64,
    pub issuer: tapgate_protocol::Issuer,
    /// The gate's clock, Unix milliseconds.
    pub now_ms: fn() -> u64,
    /// TLS for a gate that offers protocol version 2 (`tapgate/2`) first.
    pub version_2: quinn::ClientConfig,
}

impl Target {
    fn tap(&self, sequence: u64) -> Tap {
        Tap {
            sequence,
            card_id: self.card_id,
            issuer: self.issuer,
            kind: match self.gate.mode {
                tapgate_protocol::Mode::Metro | tapgate_protocol::Mode::IntercityRail => {
                    TapKind::Entry
                }
                _ => TapKind::Flat,
            },
            line: 1,
            stop: 1,
            gate_time_ms: (self.now_ms)(),
        }
    }

    async fn connect(&self) -> Result<GateClient, ClientError> {
        GateClient::connect(
            &self.endpoint,
            self.addr,
            &self.gate,
            rand::random(),
            (self.now_ms)(),
        )
        .await
    }

    /// A fresh connection that has said Hello and knows where the gate's sequence stands.
    async fn session(&self) -> Result<(GateClient, u64), String> {
        let gate = self.connect().await.map_err(|e| e.to_string())?;
        let next = gate.ack.last_sequence + 1;
        Ok((gate, next))
    }

    /// Sends raw bytes as the first thing on a new stream (before any Hello) or after one,
    /// and expects the connection to end with this Error.
    async fn expect_error(
        &self,
        after_hello: bool,
        bytes: impl FnOnce(&GateClient, u64) -> Vec<u8>,
        expected: ErrorCode,
    ) -> Result<(), String> {
        let (mut gate, next) = if after_hello {
            self.session().await?
        } else {
            let gate = GateClient::open(&self.endpoint, self.addr, &self.gate)
                .await
                .map_err(|e| e.to_string())?;
            (gate, 1)
        };
        let raw = bytes(&gate, next);
        gate.send_raw(&raw).await.map_err(|e| e.to_string())?;
        match gate.recv().await {
            Err(ClientError::Refused(e)) if e.code == expected => Ok(()),
            Err(ClientError::Refused(e)) => {
                Err(format!("got Error {}, expected {expected}", e.code))
            }
            other => Err(format!("got {other:?}, expected Error {expected}")),
        }
    }
}

/// Runs every check against the target, one connection or more each.
pub async fn run(target: &Target) -> Vec<Check> {
    let mut checks = Vec::new();
    answers(target, &mut checks).await;
    refusals(target, &mut checks).await;
    sequences(target, &mut checks).await;
    streams_and_timers(target, &mut checks).await;
    reconnection(target, &mut checks).await;
    version_2(target, &mut checks).await;
    checks
}

/// The next frame that is not a deny-list change, which a version-2 gateway may send at any
/// time (PROTOCOL.md section 4.6).
async fn next_besides_changes(gate: &mut GateClient) -> Result<Frame, String> {
    loop {
        match gate.recv().await.map_err(|e| e.to_string())? {
            Frame::DenyChanges(_) => {}
            frame => return Ok(frame),
        }
    }
}

/// How long a gateway has to connect a version-2 gate and send it the rules and a whole list:
/// one that sends no list (taking the gate for current) fails after this, not at its idle
/// timeout.
const WHOLE_LIST_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// A version-2 session that has said it holds `held`, a list the gateway must send whole (none,
/// or one of another history), been sent the offline rules and the whole list first, and
/// acknowledged the list: where its sequence stands, and the list it now holds.
async fn version_2_session(
    target: &Target,
    held: DenyAck,
) -> Result<(GateClient, u64, DenyAck), String> {
    tokio::time::timeout(WHOLE_LIST_WITHIN, sent_the_whole_list(target, held))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no whole list within {WHOLE_LIST_WITHIN:?} for a gate holding version {} of history {:016x}",
                held.version, held.history
            ))
        })
}

async fn sent_the_whole_list(
    target: &Target,
    held: DenyAck,
) -> Result<(GateClient, u64, DenyAck), String> {
    let mut gate = GateClient::connect_with(
        &target.endpoint,
        Some(&target.version_2),
        target.addr,
        &target.gate,
        rand::random(),
        (target.now_ms)(),
    )
    .await
    .map_err(|e| e.to_string())?;
    if gate.version() != tapgate_protocol::Version::V2 {
        return Err(format!("negotiated version {}", gate.version()));
    }
    gate.send_frame(&Frame::DenyAck(held))
        .await
        .map_err(|e| e.to_string())?;
    match next_besides_changes(&mut gate).await? {
        Frame::OfflineRules(_) => {}
        other => return Err(format!("{other:?} before the offline rules")),
    }
    let mut frame = gate.recv().await.map_err(|e| e.to_string())?;
    if !matches!(frame, Frame::DenyList(DenyList { first: true, .. })) {
        return Err(format!("{frame:?} instead of the whole list"));
    }
    let mut list = GateDenyList::default();
    loop {
        let applied = list
            .apply(&frame)
            .ok_or(format!("{frame:?} while the whole list was owed"))?
            .map_err(|e| e.to_string())?;
        if let (Frame::DenyList(_), Some(ack)) = (&frame, applied) {
            gate.send_frame(&Frame::DenyAck(ack))
                .await
                .map_err(|e| e.to_string())?;
            let next = gate.ack.last_sequence + 1;
            return Ok((gate, next, ack));
        }
        frame = gate.recv().await.map_err(|e| e.to_string())?;
    }
}

/// Version 2: the deny list and offline taps (sections 4.6 and 4.7).
async fn version_2(target: &Target, checks: &mut Vec<Check>) {
    let mut record = |rule: &'static str, outcome: Result<(), String>| {
        checks.push(Check::from_outcome(rule, outcome));
    };
    let new_gate = version_2_session(target, DenyAck::NEW_GATE).await;
    let held = new_gate.as_ref().ok().map(|(_, _, held)| *held);
    record(
        "4.6/4.7 a new version-2 gate is sent the offline rules, then the whole deny list",
        new_gate.map(|_| ()),
    );
    record(
        "4.6 a gate holding the gateway's version of another history is sent the whole list",
        match held {
            Some(held) => {
                let other_history = DenyAck {
                    history: !held.history,
                    ..held
                };
                version_2_session(target, other_history).await.map(|_| ())
            }
            None => Err("no version-2 session to start from".to_owned()),
        },
    );
    record(
        "4.7 an offline tap is receipted recorded, and its resend already, alike",
        async {
            let (mut gate, next, _) = version_2_session(target, DenyAck::NEW_GATE).await?;
            let now = (target.now_ms)();
            let upload = OfflineTap {
                tap: Tap {
                    gate_time_ms: now - 60_000,
                    ..target.tap(next)
                },
                deny_version: 0,
                deny_history: 0,
                offline_since_ms: now - 120_000,
            };
            let frame = gate.sealed(&Frame::OfflineTap(upload));
            let mut receipts: Vec<OfflineReceipt> = Vec::new();
            for _ in 0..2 {
                gate.send_raw(&frame).await.map_err(|e| e.to_string())?;
                match next_besides_changes(&mut gate).await? {
                    Frame::OfflineReceipt(r) => receipts.push(r),
                    other => return Err(format!("{other:?} instead of a receipt")),
                }
            }
            let (first, again) = (receipts[0], receipts[1]);
            let expected_again = OfflineReceipt {
                status: OfflineStatus::Already,
                ..first
            };
            (first.sequence == next
                && first.status == OfflineStatus::Recorded
                && again == expected_again)
                .then_some(())
                .ok_or(format!("{first:?} then {again:?}"))
        }
        .await,
    );
    record(
        "4.7 on a version-1 connection an OfflineTap is unknown_frame_type",
        target
            .expect_error(
                true,
                |gate, next| {
                    let upload = OfflineTap {
                        tap: target.tap(next),
                        deny_version: 0,
                        deny_history: 0,
                        offline_since_ms: (target.now_ms)(),
                    };
                    gate.sealed(&Frame::OfflineTap(upload)).to_vec()
                },
                ErrorCode::UnknownFrameType,
            )
            .await,
    );
}

/// Hello, answers and resends: what a conforming gate relies on in normal operation.
async fn answers(target: &Target, checks: &mut Vec<Check>) {
    let mut record = |rule: &'static str, outcome: Result<(), String>| {
        checks.push(Check::from_outcome(rule, outcome));
    };

    record(
        "4.2 HelloAck echoes the nonce and announces its bounds",
        async {
            let gate = target.connect().await.map_err(|e| e.to_string())?;
            if gate.ack.terminal_id != target.gate.terminal_id {
                return Err(format!(
                    "terminal_id {} in the HelloAck",
                    gate.ack.terminal_id
                ));
            }
            if gate.ack.max_in_flight == 0 || gate.ack.resend_window == 0 {
                return Err(format!("{:?}", gate.ack));
            }
            Ok(())
        }
        .await,
    );

    record(
        "4.4 a tap is answered with its own sequence",
        async {
            let (mut gate, next) = target.session().await?;
            let r = gate
                .tap(target.tap(next))
                .await
                .map_err(|e| e.to_string())?;
            (r.sequence == next && r.outcome == Outcome::Approve)
                .then_some(())
                .ok_or(format!("{r:?}"))
        }
        .await,
    );

    record(
        "6 a resend gets the first answer, byte for byte",
        async {
            let (mut gate, next) = target.session().await?;
            let frame = gate.sealed(&Frame::Tap(target.tap(next)));
            gate.send_raw(&frame).await.map_err(|e| e.to_string())?;
            let first = gate.recv_result().await.map_err(|e| e.to_string())?;
            gate.send_raw(&frame).await.map_err(|e| e.to_string())?;
            let again = gate.recv_result().await.map_err(|e| e.to_string())?;
            (first == again)
                .then_some(())
                .ok_or(format!("{first:?} then {again:?}"))
        }
        .await,
    );

    record(
        "6 a resend on a new connection gets the first answer",
        async {
            let (mut gate, next) = target.session().await?;
            let frame = gate.sealed(&Frame::Tap(target.tap(next)));
            gate.send_raw(&frame).await.map_err(|e| e.to_string())?;
            let first = gate.recv_result().await.map_err(|e| e.to_string())?;
            let (mut again_gate, _) = target.session().await?;
            again_gate
                .send_raw(&frame)
                .await
                .map_err(|e| e.to_string())?;
            let again = again_gate.recv_result().await.map_err(|e| e.to_string())?;
            (first == again)
                .then_some(())
                .ok_or(format!("{first:?} then {again:?}"))
        }
        .await,
    );

    record(
        "4.2/7 max_in_flight taps in one write are all served",
        async {
            let (mut gate, next) = target.session().await?;
            let n = u64::from(gate.ack.max_in_flight);
            let burst: Vec<u8> = (next..next + n)
                .flat_map(|s| gate.sealed(&Frame::Tap(target.tap(s))).to_vec())
                .collect();
            gate.send_raw(&burst).await.map_err(|e| e.to_string())?;
            for _ in 0..n {
                let r = gate.recv_result().await.map_err(|e| e.to_string())?;
                if r.outcome == Outcome::Busy {
                    return Err(format!(
                        "tap {} of a burst of {n} answered Busy",
                        r.sequence
                    ));
                }
            }
            Ok(())
        }
        .await,
    );
}

/// Malformed and misplaced frames, each refused with its own code (section 7).
async fn refusals(target: &Target, checks: &mut Vec<Check>) {
    let mut record = |rule: &'static str, outcome: Result<(), String>| {
        checks.push(Check::from_outcome(rule, outcome));
    };

    record(
        "7 a bad tag is bad_mac",
        target
            .expect_error(
                true,
                |gate, next| {
                    let mut frame = gate.sealed(&Frame::Tap(target.tap(next))).to_vec();
                    let last = frame.len() - 1;
                    frame[last] ^= 1;
                    frame
                },
                ErrorCode::BadMac,
            )
            .await,
    );

    record(
        "7 a length over the maximum is frame_too_large",
        target
            .expect_error(
                true,
                |_, _| vec![0xff, 0xff, 0x01, 0x03],
                ErrorCode::FrameTooLarge,
            )
            .await,
    );

    record(
        "7 a wrong version is unsupported_version",
        target
            .expect_error(
                true,
                |gate, next| {
                    let mut frame = gate.sealed(&Frame::Tap(target.tap(next))).to_vec();
                    frame[2] = 0x02;
                    frame
                },
                ErrorCode::UnsupportedVersion,
            )
            .await,
    );

    record(
        "7 an unknown type is unknown_frame_type",
        target
            .expect_error(
                true,
                |gate, next| {
                    let mut frame = gate.sealed(&Frame::Tap(target.tap(next))).to_vec();
                    frame[3] = 0x7f;
                    frame
                },
                ErrorCode::UnknownFrameType,
            )
            .await,
    );

    record(
        "7 a Tap before the Hello is hello_required",
        target
            .expect_error(
                false,
                |gate, _| gate.sealed(&Frame::Tap(target.tap(1))).to_vec(),
                ErrorCode::HelloRequired,
            )
            .await,
    );

    record(
        "7 a second Hello is duplicate_hello",
        target
            .expect_error(
                true,
                |gate, _| {
                    gate.sealed(&hello(&target.gate, rand::random(), (target.now_ms)()))
                        .to_vec()
                },
                ErrorCode::DuplicateHello,
            )
            .await,
    );

    record(
        "7 a gateway-only frame type is unexpected_frame",
        target
            .expect_error(
                false,
                |gate, _| {
                    gate.sealed(&Frame::Error(tapgate_protocol::ErrorFrame {
                        code: ErrorCode::Internal,
                        sequence: 0,
                    }))
                    .to_vec()
                },
                ErrorCode::UnexpectedFrame,
            )
            .await,
    );
}

/// The sequence window: conflicts and replays.
async fn sequences(target: &Target, checks: &mut Vec<Check>) {
    let mut record = |rule: &'static str, outcome: Result<(), String>| {
        checks.push(Check::from_outcome(rule, outcome));
    };

    record(
        "6 a sequence reused with another body is sequence_conflict",
        async {
            let (mut gate, next) = target.session().await?;
            gate.tap(target.tap(next))
                .await
                .map_err(|e| e.to_string())?;
            let mut other = target.tap(next);
            other.stop += 1;
            gate.send_frame(&Frame::Tap(other))
                .await
                .map_err(|e| e.to_string())?;
            match gate.recv().await {
                Err(ClientError::Refused(e)) if e.code == ErrorCode::SequenceConflict => Ok(()),
                other => Err(format!("got {other:?}")),
            }
        }
        .await,
    );

    record(
        "6 a sequence below the window is replay",
        async {
            let (mut gate, next) = target.session().await?;
            let window = u64::from(gate.ack.resend_window);
            let mut last = next;
            for s in next..next + window + 1 {
                gate.tap(target.tap(s)).await.map_err(|e| e.to_string())?;
                last = s;
            }
            // The first tap of the run is now `window` below the highest: outside the window.
            let old = last - window;
            gate.send_frame(&Frame::Tap(target.tap(old)))
                .await
                .map_err(|e| e.to_string())?;
            match gate.recv().await {
                Err(ClientError::Refused(e)) if e.code == ErrorCode::Replay => Ok(()),
                other => Err(format!("got {other:?}")),
            }
        }
        .await,
    );
}

/// Quick reconnection: a ticket on every connection, and an early Hello answered with it.
async fn reconnection(target: &Target, checks: &mut Vec<Check>) {
    let mut record = |rule: &'static str, outcome: Result<(), String>| {
        checks.push(Check::from_outcome(rule, outcome));
    };
    record(
        "1.2 a gate that reconnects resumes its session and its early Hello is answered",
        async {
            // One connection for a ticket, then one that uses it. The ticket travels apart
            // from the answers, so on a loaded machine it can trail the first tap's answer:
            // the gate waits a little before closing, and tries three times.
            for _ in 0..3 {
                let (mut gate, next) = target.session().await?;
                gate.tap(target.tap(next))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                gate.close();
                let again = target.connect().await.map_err(|e| e.to_string())?;
                match again.early_hello {
                    EarlyHello::Answered => return Ok(()),
                    EarlyHello::NotSent => continue,
                    EarlyHello::Refused => {
                        return Err("the gateway refused the early data".into());
                    }
                }
            }
            Err("no ticket allowing early data came with three connections".into())
        }
        .await,
    );
}

/// The stream rules and the Hello timer.
async fn streams_and_timers(target: &Target, checks: &mut Vec<Check>) {
    let mut record = |rule: &'static str, outcome: Result<(), String>| {
        checks.push(Check::from_outcome(rule, outcome));
    };

    record(
        "1 one bidirectional stream at a time and no unidirectional ones",
        async {
            let (mut gate, next) = target.session().await?;
            let wait = std::time::Duration::from_millis(300);
            if let Ok(opened) = tokio::time::timeout(wait, gate.connection.open_bi()).await {
                return Err(format!("a second bidirectional stream opened: {opened:?}"));
            }
            if let Ok(opened) = tokio::time::timeout(wait, gate.connection.open_uni()).await {
                return Err(format!("a unidirectional stream opened: {opened:?}"));
            }
            let r = gate
                .tap(target.tap(next))
                .await
                .map_err(|e| e.to_string())?;
            (r.sequence == next)
                .then_some(())
                .ok_or(format!("the first stream then answered {r:?}"))
        }
        .await,
    );

    record(
        "7 a stream that ends inside a frame is malformed_frame",
        async {
            let (mut gate, next) = target.session().await?;
            let frame = gate.sealed(&Frame::Tap(target.tap(next)));
            gate.send_raw(&frame[..frame.len() / 2])
                .await
                .map_err(|e| e.to_string())?;
            gate.sender.finish();
            match gate.recv().await {
                Err(ClientError::Refused(e)) if e.code == ErrorCode::MalformedFrame => Ok(()),
                other => Err(format!("got {other:?}")),
            }
        }
        .await,
    );

    record(
        "7 no Hello within 5 s is hello_timeout",
        async {
            let mut gate = GateClient::open(&target.endpoint, target.addr, &target.gate)
                .await
                .map_err(|e| e.to_string())?;
            // One byte opens the stream without completing a frame.
            gate.send_raw(&[0]).await.map_err(|e| e.to_string())?;
            let started = std::time::Instant::now();
            let answer = tokio::time::timeout(std::time::Duration::from_secs(10), gate.recv())
                .await
                .map_err(|_| "nothing within 10 s".to_string())?;
            match answer {
                Err(ClientError::Refused(e)) if e.code == ErrorCode::HelloTimeout => {
                    let waited = started.elapsed();
                    (waited >= std::time::Duration::from_millis(4500))
                        .then_some(())
                        .ok_or(format!("hello_timeout after only {waited:?}"))
                }
                other => Err(format!("got {other:?}")),
            }
        }
        .await,
    );

    record(
        "1 a gate that finishes its stream gets its answers, then close code 0",
        async {
            let (mut gate, next) = target.session().await?;
            gate.send_frame(&Frame::Tap(target.tap(next)))
                .await
                .map_err(|e| e.to_string())?;
            gate.sender.finish();
            let r = gate.recv_result().await.map_err(|e| e.to_string())?;
            if r.sequence != next {
                return Err(format!("{r:?}"));
            }
            match gate.connection.closed().await {
                quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == 0 => {
                    Ok(())
                }
                other => Err(format!("closed by {other}")),
            }
        }
        .await,
    );
}

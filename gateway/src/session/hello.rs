//! The session's first step: what its first frame may be, and whether a Hello admits the gate.
//! The server looks the terminal up between the two steps (that is I/O) and writes what these
//! functions decide.

use crate::directory::TerminalRecord;
use tapgate_protocol::{
    ErrorCode, Frame, FrameType, Hello, HelloAck, KeyRing, MacKey, OpenError, SealedFrame,
};

/// A refused Hello: the Error to send, tagged with `key` when the gateway has one for the gate.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: ErrorCode,
    /// Boxed: a prepared key is large, and refusals are rare.
    pub key: Option<Box<MacKey>>,
    /// Why, for the log.
    pub why: &'static str,
}

impl Refusal {
    fn unkeyed(code: ErrorCode, why: &'static str) -> Refusal {
        Refusal {
            code,
            key: None,
            why,
        }
    }

    fn keyed(code: ErrorCode, key: &MacKey, why: &'static str) -> Refusal {
        Refusal {
            code,
            key: Some(Box::new(key.clone())),
            why,
        }
    }
}

/// Who the first frame claims to come from, if it can be a Hello at all: the only things read
/// from a frame before its tag verifies are what selects the key (PROTOCOL.md section 7).
pub fn claimed_identity(first: &SealedFrame) -> Result<(u64, u8), Refusal> {
    match first.frame_type() {
        FrameType::Hello => first
            .hello_identity()
            .ok_or_else(|| Refusal::unkeyed(ErrorCode::MalformedFrame, "unreadable Hello")),
        FrameType::Tap => Err(Refusal::unkeyed(
            ErrorCode::HelloRequired,
            "a Tap before the Hello",
        )),
        _ => Err(Refusal::unkeyed(
            ErrorCode::UnexpectedFrame,
            "a gateway-only frame first",
        )),
    }
}

/// What looking the claimed terminal up found.
pub enum Provisioning {
    Provisioned(TerminalRecord),
    Unknown,
    /// The terminal register could not be asked.
    Unreachable,
}

/// Whether the Hello admits the gate: its terminal is provisioned, its key version known, its
/// tag verifies, and what it says of itself is what the gate is provisioned with.
pub fn admit(
    first: &SealedFrame,
    key_version: u8,
    provisioning: Provisioning,
    keys: &KeyRing,
) -> Result<(Hello, MacKey, TerminalRecord), Refusal> {
    let terminal = match provisioning {
        Provisioning::Provisioned(terminal) => terminal,
        Provisioning::Unknown => {
            return Err(Refusal::unkeyed(
                ErrorCode::UnknownTerminal,
                "unknown terminal",
            ));
        }
        Provisioning::Unreachable => {
            return Err(Refusal::unkeyed(
                ErrorCode::Internal,
                "terminal register unreachable",
            ));
        }
    };
    let Some(key) = keys.terminal_key(key_version, terminal.terminal_id) else {
        return Err(Refusal::unkeyed(
            ErrorCode::UnknownKeyVersion,
            "unknown key version",
        ));
    };
    let mac = key.mac_key();
    let hello = match first.open(&mac) {
        Ok(Frame::Hello(hello)) => hello,
        Ok(_) => unreachable!("a frame of type Hello parses as a Hello"),
        Err(OpenError::BadMac(_)) => {
            return Err(Refusal::keyed(
                ErrorCode::BadMac,
                &mac,
                "Hello with a bad MAC",
            ));
        }
        // Authentic, but a field holds a value section 3 does not list: the key is known, so
        // the Error is tagged.
        Err(e) => return Err(Refusal::keyed(e.error_code(), &mac, "malformed Hello")),
    };
    if tapgate_protocol::registry::operator(hello.operator).is_none() {
        return Err(Refusal::keyed(
            ErrorCode::MalformedFrame,
            &mac,
            "Hello names no registered operator",
        ));
    }
    if hello.area.area().is_none() || hello.area != terminal.area {
        return Err(Refusal::keyed(
            ErrorCode::UnknownArea,
            &mac,
            "Hello from another area than provisioned",
        ));
    }
    if hello.mode != terminal.mode || hello.operator != terminal.operator {
        // Not the gate provisioned under this id (PROTOCOL.md section 7).
        return Err(Refusal::keyed(
            ErrorCode::UnknownTerminal,
            &mac,
            "Hello claims another mode or operator than provisioned",
        ));
    }
    Ok((hello, mac, terminal))
}

/// The HelloAck of an admitted gate.
pub fn hello_ack(
    hello: &Hello,
    last_sequence: u64,
    resend_window: u16,
    max_in_flight: u16,
    now_ms: u64,
) -> HelloAck {
    HelloAck {
        terminal_id: hello.terminal_id,
        client_nonce: hello.client_nonce,
        server_time_ms: now_ms,
        last_sequence,
        resend_window,
        max_in_flight,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TERMINAL, keys, sealed};
    use super::*;
    use bytes::BytesMut;
    use tapgate_protocol::{AreaCode, ErrorFrame, Mode, Tap, TapKind, seal};

    fn provisioned() -> TerminalRecord {
        TerminalRecord {
            terminal_id: TERMINAL,
            area: AreaCode(500_103),
            mode: Mode::Metro,
            operator: 2,
        }
    }

    fn hello() -> Hello {
        Hello {
            terminal_id: TERMINAL,
            key_version: 1,
            mode: Mode::Metro,
            area: AreaCode(500_103),
            operator: 2,
            client_nonce: 7,
            gate_time_ms: 0,
        }
    }

    /// Runs both steps as the server does, with `provisioning` as the lookup's answer.
    fn outcome(
        frame: &SealedFrame,
        provisioning: Provisioning,
    ) -> Result<Hello, (ErrorCode, bool)> {
        let (_, version) = claimed_identity(frame).map_err(|r| (r.code, r.key.is_some()))?;
        admit(frame, version, provisioning, &keys())
            .map(|(hello, _, _)| hello)
            .map_err(|r| (r.code, r.key.is_some()))
    }

    fn refused(hello: Hello, provisioning: Provisioning) -> (ErrorCode, bool) {
        outcome(&sealed(&Frame::Hello(hello)), provisioning).unwrap_err()
    }

    #[test]
    fn a_provisioned_gate_saying_what_it_is_is_admitted() {
        let admitted = outcome(
            &sealed(&Frame::Hello(hello())),
            Provisioning::Provisioned(provisioned()),
        );
        assert_eq!(admitted.unwrap(), hello());
        let ack = hello_ack(&hello(), 41, 32, 32, 5);
        assert_eq!((ack.client_nonce, ack.last_sequence), (7, 41));
    }

    #[test]
    fn anything_but_a_hello_first_is_refused_without_a_key() {
        let tap = Tap {
            sequence: 1,
            card_id: 1,
            issuer: tapgate_protocol::Issuer::ChongqingSsc,
            kind: TapKind::Entry,
            line: 1,
            stop: 1,
            gate_time_ms: 0,
        };
        let first = sealed(&Frame::Tap(tap));
        assert_eq!(
            claimed_identity(&first).unwrap_err().code,
            ErrorCode::HelloRequired
        );
        let first = sealed(&Frame::Error(ErrorFrame {
            code: ErrorCode::Internal,
            sequence: 0,
        }));
        let refusal = claimed_identity(&first).unwrap_err();
        assert_eq!(
            (refusal.code, refusal.key.is_some()),
            (ErrorCode::UnexpectedFrame, false)
        );
    }

    #[test]
    fn an_unknown_or_unreachable_terminal_is_refused_without_a_key() {
        assert_eq!(
            refused(hello(), Provisioning::Unknown),
            (ErrorCode::UnknownTerminal, false)
        );
        assert_eq!(
            refused(hello(), Provisioning::Unreachable),
            (ErrorCode::Internal, false)
        );
    }

    #[test]
    fn an_unknown_key_version_is_refused_without_a_key() {
        let hello = Hello {
            key_version: 9,
            ..hello()
        };
        assert_eq!(
            refused(hello, Provisioning::Provisioned(provisioned())),
            (ErrorCode::UnknownKeyVersion, false)
        );
    }

    #[test]
    fn a_bad_tag_is_bad_mac_whatever_else_the_hello_says() {
        let mut bytes = BytesMut::new();
        // An area outside the list and a mode outside the registry (6), under a tag that no
        // longer verifies: the tag is checked first, so this is bad_mac and nothing else.
        let mut body = hello();
        body.area = AreaCode(1);
        seal(
            &Frame::Hello(body),
            &keys().terminal_key(1, TERMINAL).unwrap().mac_key(),
            &mut bytes,
        );
        bytes[13] = 6; // the mode byte
        let frame = tapgate_protocol::decode_one(&bytes).unwrap();
        assert_eq!(
            outcome(&frame, Provisioning::Provisioned(provisioned())).unwrap_err(),
            (ErrorCode::BadMac, true)
        );
    }

    #[test]
    fn an_authentic_hello_that_misstates_the_gate_is_refused_with_a_tagged_error() {
        let provisioned = || Provisioning::Provisioned(provisioned());
        let cases = [
            (
                Hello {
                    operator: 8,
                    ..hello()
                },
                ErrorCode::MalformedFrame,
            ),
            (
                Hello {
                    area: AreaCode(123_456),
                    ..hello()
                },
                ErrorCode::UnknownArea,
            ),
            (
                Hello {
                    area: AreaCode(500_101),
                    ..hello()
                },
                ErrorCode::UnknownArea,
            ),
            (
                Hello {
                    mode: Mode::Bus,
                    ..hello()
                },
                ErrorCode::UnknownTerminal,
            ),
            (
                Hello {
                    operator: 1,
                    ..hello()
                },
                ErrorCode::UnknownTerminal,
            ),
        ];
        for (hello, code) in cases {
            assert_eq!(refused(hello, provisioned()), (code, true), "{hello:?}");
        }
    }
}

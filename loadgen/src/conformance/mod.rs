//! Conformance tools for gate vendors, one per side of the protocol, both reporting every rule
//! of PROTOCOL.md they exercised as PASS or FAIL:
//! - [`gateway`] drives a gateway as a gate would (`tapgate conformance gateway`);
//! - [`referee`] is a strict gateway a gate under test connects to, as a state machine without
//!   I/O, and [`gate`] runs it on a QUIC endpoint (`tapgate conformance gate`).
//!
//! Neither links gateway code: each is a second, independent reading of the specification.

pub mod gate;
pub mod gateway;
pub mod referee;

/// One rule and whether the implementation under test kept it.
#[derive(Debug, Clone)]
pub struct Check {
    pub rule: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// The run never reached the situation the rule is about: not a pass, since a vendor's
    /// CI must not go green on a run that checked nothing.
    NotExercised,
}

impl Check {
    pub fn from_outcome(rule: &'static str, outcome: Result<(), String>) -> Check {
        match outcome {
            Ok(()) => Check {
                rule,
                verdict: Verdict::Pass,
                detail: String::new(),
            },
            Err(detail) => Check {
                rule,
                verdict: Verdict::Fail,
                detail,
            },
        }
    }

    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }
}

/// The report: one line per rule, and whether all passed.
pub fn report(checks: &[Check]) -> (String, bool) {
    let mut out = String::new();
    for c in checks {
        let verdict = match c.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::NotExercised => "NOT EXERCISED",
        };
        out.push_str(&format!("{verdict}  {}", c.rule));
        if !c.detail.is_empty() {
            out.push_str(&format!("  ({})", c.detail));
        }
        out.push('\n');
    }
    let passed = checks.iter().filter(|c| c.passed()).count();
    out.push_str(&format!(
        "{passed} passed, {} failed or not exercised\n",
        checks.len() - passed
    ));
    (out, passed == checks.len())
}

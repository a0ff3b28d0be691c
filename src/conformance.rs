//! `tapgate conformance gateway`: checks a gateway against the protocol rules a gate can
//! observe, printing PASS or FAIL for each; exit 1 on any failure (for a vendor's CI).

use crate::runtime;
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tapgate_gateway::card::CardState;
use tapgate_gateway::config::DEV_MASTER_KEY_HEX;
use tapgate_gateway::population::PopulationSpec;
use tapgate_loadgen::client::{GateIdentity, client_endpoint};
use tapgate_loadgen::conformance::{Target, report, run};
use tapgate_protocol::{Concession, Issuer, MasterKey};

#[derive(Args)]
pub struct ConformanceArgs {
    #[command(subcommand)]
    side: Side,
}

#[derive(Subcommand)]
enum Side {
    /// Drive a gateway as a gate would, through every rule a gate can observe.
    Gateway(GatewayArgs),
}

#[derive(Args)]
struct GatewayArgs {
    /// The gateway under test, HOST:PORT.
    #[arg(long)]
    target: SocketAddr,
    /// DER certificate the gateway presents (or its CA).
    #[arg(long, default_value = "tapgate-state/dev-cert/cert.der")]
    cert: PathBuf,
    /// Master key of key version 1, 32 hex digits (the development key by default).
    #[arg(long, default_value = DEV_MASTER_KEY_HEX)]
    master_key: String,
    /// The gateway's synthetic population (`tapgate serve --embedded` defaults): the checks
    /// use its first gate and an active Chongqing card without concession.
    #[arg(long, default_value_t = PopulationSpec::default().seed)]
    seed: u64,
    #[arg(long, default_value_t = PopulationSpec::default().cards)]
    cards: u64,
    #[arg(long, default_value_t = PopulationSpec::default().terminals)]
    terminals: u64,
    /// Which gate of the population to be (a run uses its sequence numbers up).
    #[arg(long, default_value_t = 0)]
    gate: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn run_conformance(args: ConformanceArgs) -> Result<ExitCode, String> {
    let Side::Gateway(args) = args.side;
    let cert = std::fs::read(&args.cert).map_err(|e| format!("{}: {e}", args.cert.display()))?;
    let master = MasterKey::from_hex(&args.master_key).map_err(|e| format!("--master-key: {e}"))?;
    let spec = PopulationSpec {
        seed: args.seed,
        cards: args.cards,
        terminals: args.terminals,
        ..PopulationSpec::default()
    };
    let gate = spec.terminal(args.gate);
    let today = chrono::Utc::now().date_naive();
    let card = spec
        .cards()
        .find(|c| {
            c.state == CardState::Active
                && c.issuer == Issuer::ChongqingSsc
                && c.concession == Concession::None
                && c.expires_on.is_none_or(|d| d > today)
        })
        .ok_or("the population has no active Chongqing card")?;
    let checks = runtime()?.block_on(async {
        let endpoint = client_endpoint(&cert, "0.0.0.0:0".parse().expect("an address"))
            .map_err(|e| e.to_string())?;
        let target = Target {
            endpoint,
            addr: args.target,
            gate: GateIdentity {
                terminal_id: gate.terminal_id,
                key_version: 1,
                key: master.diversify(gate.terminal_id),
                area: gate.area,
                mode: gate.mode,
                operator: gate.operator,
            },
            card_id: card.card_id,
            issuer: card.issuer,
            now_ms,
        };
        Ok::<_, String>(run(&target).await)
    })?;
    let (text, all_passed) = report(&checks);
    print!("{text}");
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

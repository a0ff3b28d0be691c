//! `tapgate conformance gateway` checks a gateway against the protocol rules a gate can
//! observe; `tapgate conformance gate` is a strict gateway that checks a gate connecting to it.
//! Both print PASS or FAIL for each rule and exit 1 on any failure (for a vendor's CI).

use crate::runtime;
use anyhow::Context as _;
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tapgate_city::population::PopulationSpec;
use tapgate_gateway::card::CardState;
use tapgate_gateway::config::DEV_MASTER_KEY_HEX;
use tapgate_gateway::policy::Policy;
use tapgate_loadgen::client::{GateIdentity, client_endpoint};
use tapgate_loadgen::conformance::gate::referee;
use tapgate_loadgen::conformance::gateway::{Target, run};
use tapgate_loadgen::conformance::referee::RefereeSettings;
use tapgate_loadgen::conformance::report;
use tapgate_protocol::{Concession, Issuer, MasterKey, Version};
use tapgate_transport::{TransportSettings, now_ms, server_endpoint, tls};

#[derive(Args)]
pub(crate) struct ConformanceArgs {
    #[command(subcommand)]
    side: Side,
}

#[derive(Subcommand)]
enum Side {
    /// Drive a gateway as a gate would, through every rule a gate can observe.
    Gateway(GatewayArgs),
    /// Be a strict gateway for a gate under test: it connects to --listen and taps; scripted
    /// answers take it through every outcome, refusals, a dropped connection and a jumped
    /// sequence, and every frame it sends is checked. With --protocol 2, also the deny list
    /// and offline taps: the gate must ride offline at least once during the run.
    Gate(GateArgs),
}

#[derive(Args)]
struct GateArgs {
    /// Where the gate under test connects.
    #[arg(long, default_value = "127.0.0.1:4435")]
    listen: SocketAddr,
    /// A development certificate for the gate to trust is written here (cert.der).
    #[arg(long, default_value = "tapgate-state/referee-cert")]
    dev_cert_dir: PathBuf,
    /// Master key of key version 1, 32 hex digits (the development key by default).
    #[arg(long, default_value = DEV_MASTER_KEY_HEX)]
    master_key: String,
    /// The run ends when this many gates have completed the script.
    #[arg(long, default_value_t = 1)]
    gates: usize,
    /// ... or after this long: 60, 60s, 2m.
    #[arg(long, default_value = "60s", value_parser = crate::common::parse_duration)]
    timeout: Duration,
    /// The max_in_flight the HelloAck announces (and the referee holds the gate to).
    #[arg(long, default_value_t = 4)]
    max_in_flight: u16,
    /// The protocol version the gate under test claims (1 or 2), the newest the referee
    /// offers. Version 2 gates are sent the shipped policy's offline rules.
    #[arg(long, default_value = "1", value_parser = crate::common::parse_version)]
    protocol: Version,
    /// How long each answer is held, so a pipelining gate reaches max_in_flight.
    #[arg(long, default_value_t = 5)]
    answer_delay_ms: u64,
    /// How long the gate has to close a connection it must refuse.
    #[arg(long, default_value_t = 3000)]
    grace_ms: u64,
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

pub(crate) fn run_conformance(args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    match args.side {
        Side::Gateway(args) => check_gateway(args),
        Side::Gate(args) => check_gate(args),
    }
}

fn check_gate(args: GateArgs) -> anyhow::Result<ExitCode> {
    let master =
        MasterKey::from_hex(&args.master_key).map_err(|e| anyhow::anyhow!("--master-key: {e}"))?;
    let run = runtime()?.block_on(async {
        let (chain, key) = tls::load(&tls::TlsSource::Dev {
            dir: args.dev_cert_dir.clone(),
        })
        ?;
        let transport = TransportSettings {
            newest_version: args.protocol,
            ..TransportSettings::default()
        };
        let endpoint = server_endpoint(args.listen, chain, key, &transport)?;
        eprintln!(
            "conformance referee on {}: point the gate under test here (certificate {}); the run ends after {} gate(s) complete the script or {:.0} s",
            endpoint.local_addr()?,
            args.dev_cert_dir.join(tls::DEV_CERT_FILE).display(),
            args.gates,
            args.timeout.as_secs_f64()
        );
        let settings = RefereeSettings {
            master_key: master,
            max_in_flight: args.max_in_flight.max(1),
            resend_window: 32,
            answer_delay_ms: args.answer_delay_ms,
            grace_ms: args.grace_ms,
            protocol: args.protocol,
            offline_rules: Policy::embedded_default().offline,
        };
        Ok::<_, anyhow::Error>(referee(endpoint, settings, args.gates, args.timeout).await)
    })?;
    let (text, all_passed) = report(&run.checks);
    print!("{text}");
    println!(
        "{} of {} gate(s) completed the script over {} connection(s)",
        run.completed, args.gates, run.connections
    );
    Ok(if all_passed && run.completed >= args.gates {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check_gateway(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let cert =
        std::fs::read(&args.cert).map_err(|e| anyhow::anyhow!("{}: {e}", args.cert.display()))?;
    let master =
        MasterKey::from_hex(&args.master_key).map_err(|e| anyhow::anyhow!("--master-key: {e}"))?;
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
        .context("the population has no active Chongqing card")?;
    let checks = runtime()?.block_on(async {
        let endpoint = client_endpoint(&cert, "0.0.0.0:0".parse().expect("an address"))?;
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
            version_2: tls::GateTls::new(&cert, tls::Resumption::Full, Version::V2)?
                .for_one_gate()?,
        };
        Ok::<_, anyhow::Error>(run(&target).await)
    })?;
    let (text, all_passed) = report(&checks);
    print!("{text}");
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

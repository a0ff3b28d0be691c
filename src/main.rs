//! `tapgate`: the one command-line entry point. It parses arguments and calls the libraries.

mod adjust;
mod bench;
mod books;
mod cards;
mod common;
mod conformance;
mod deny_bench;
mod load;
mod scrape;
mod serve;
mod servers;
mod settle;
mod statement;
mod top;
mod vectors;
mod watch;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tapgate",
    version,
    about = "QUIC tap gateway for Chongqing one-card transit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Zero-setup demonstration: an embedded gateway and simulated gates tapping it.
    Demo(load::DemoArgs),
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Check a gateway's configuration, policy and fare tables (with the same flags as serve),
    /// and start nothing: every problem is named by its key; exit 1 if there is any.
    CheckConfig(serve::ServeArgs),
    /// Drive a gateway with simulated gates and report latency and throughput.
    Load(load::LoadArgs),
    /// Run the transport baseline: a bare QUIC server that echoes every byte.
    Echo(load::EchoArgs),
    /// Measure what tapgate adds per tap over the transport baseline: the echo and an embedded
    /// gateway as processes of their own, driven alternately by one generator; taps/s,
    /// latency, server CPU per tap and their ratios, printed and written as JSON.
    Bench(bench::BenchArgs),
    /// Time a lost card's way to the deny list of every connected version-2 gate (an embedded
    /// gateway and 20,000 gates in this process; or, with --gate-processes, a Redis gateway in
    /// its own process and the gates in processes of their own).
    BenchDeny(deny_bench::DenyBenchArgs),
    /// One process's share of the gates of `bench-deny --gate-processes`.
    #[command(hide = true)]
    BenchDenyGates(deny_bench::DenyGatesArgs),
    /// Settlement: fares per area, operator and mode, and clearing between issuers.
    Settle(settle::SettleArgs),
    /// Manage card records in Redis: import, generate, report lost, block, unblock, show.
    Cards(cards::CardsArgs),
    /// Live figures of one or more gateways and settlers in the terminal (reads their ops
    /// endpoints every second).
    Top(top::TopArgs),
    /// Check an implementation against the protocol: `conformance gateway --target HOST:PORT`
    /// drives a gateway as a gate would and prints PASS or FAIL for every rule.
    Conformance(conformance::ConformanceArgs),
    /// Card-use watching: rules over decided taps that raise alerts (`watch journal`).
    Watch(watch::WatchArgs),
    /// List the card-use alerts kept in Redis: `--since 24h`, `--rule clone`, `--json`.
    Alerts(watch::AlertsArgs),
    /// Print the protocol's worked example (keys, frames and tags in hex) for gate vendors;
    /// `--json` adds a vector for every frame type, deny reason and Error code.
    Vectors(vectors::VectorsArgs),
}

fn main() -> ExitCode {
    // Reports are meant to be piped (`| head`, `| less`): a closed pipe should end the program
    // quietly, as it does for other Unix tools, not make printing panic.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    #[allow(
        unsafe_code,
        reason = "signal(2) has no safe wrapper in the dependencies"
    )]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => load::run_demo(args),
        Command::Serve(args) => serve::run(args),
        Command::CheckConfig(args) => serve::check(args),
        Command::Load(args) => load::run_load(args),
        Command::Echo(args) => load::run_echo(args),
        Command::Bench(args) => bench::run_bench(args),
        Command::BenchDeny(args) => deny_bench::run_deny_bench(args),
        Command::BenchDenyGates(args) => deny_bench::run_deny_gates(args),
        Command::Cards(args) => cards::run(args),
        Command::Top(args) => top::run(args),
        Command::Settle(args) => return report_failure(settle::run(args)),
        Command::Conformance(args) => return report_failure(conformance::run_conformance(args)),
        Command::Vectors(args) => vectors::run(args),
        Command::Watch(args) => return report_failure(watch::run(args)),
        Command::Alerts(args) => return report_failure(watch::list_alerts(args)),
    };
    report_failure(result.map(|()| ExitCode::SUCCESS))
}

/// The multi-threaded tokio runtime every subcommand that does network I/O runs on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))
}

/// Prints an error the way every subcommand does, and exits 1 with it.
fn report_failure(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tapgate: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and every cause under it, each once: many of the libraries' errors already
/// repeat their cause in their own message, and context added here does not.
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn every_cause_is_told_once() {
        let io = std::io::Error::other("disk full");
        let error = anyhow::Error::new(io).context("writing ledger.json");
        assert_eq!(describe(&error), "writing ledger.json: disk full");
        #[derive(Debug, thiserror::Error)]
        #[error("starting: {0}")]
        struct Repeats(#[source] std::io::Error);
        let error = anyhow::Error::new(Repeats(std::io::Error::other("port taken")));
        assert_eq!(describe(&error), "starting: port taken");
    }
}

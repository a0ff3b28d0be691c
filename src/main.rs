//! `tapgate`: the one command-line entry point. It parses arguments and calls the libraries.

mod cards;
mod serve;

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
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Manage card records in Redis: import, generate, report lost, block, unblock, show.
    Cards(cards::CardsArgs),
    /// Print the protocol's worked example (keys, frames and tags in hex) for gate vendors.
    Vectors,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Cards(args) => cards::run(args),
        Command::Vectors => {
            for (name, value) in tapgate_protocol::example::lines() {
                println!("{name}: {value}");
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tapgate: {message}");
            ExitCode::FAILURE
        }
    }
}

//! `tapgate`: the one command-line entry point.

use clap::{Parser, Subcommand};

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
    /// Print the protocol's worked example (keys, frames and tags in hex) for gate vendors.
    Vectors,
}

fn main() {
    match Cli::parse().command {
        Command::Vectors => {
            for (name, value) in tapgate_protocol::example::lines() {
                println!("{name}: {value}");
            }
        }
    }
}

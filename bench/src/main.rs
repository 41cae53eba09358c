//! securechat-bench: the load generator that measures securechat against the
//! servers operators would run instead, side by side on one machine.
//!
//! # Layout
//! - [`target`]: where the server is, how to connect (source addresses,
//!   TLS, upgrade), and the two protocol modes: `securechat` frames or `raw`
//!   text broadcast by the peers.
//! - [`tls`]: the client's rustls configuration (aws-lc-rs, TLS 1.3, no
//!   resumption, so every handshake is a full one).
//! - [`token`]: HS256 tokens minted in-process (no process per token).
//! - [`polled`]: receivers read from one `mio` poll loop on a thread of
//!   its own, tungstenite over rustls, no task per connection.
//! - [`procfs`]: the server's resident memory and CPU time from `/proc`.
//! - [`stats`]: latency histograms and their summaries.
//! - [`scenario`]: `idle`, `fanout`, `handshake`, `slow`; each prints one
//!   JSON summary line on stdout and a progress bar on stderr.
//! - [`suite`]: starts each server pinned to its core, runs every scenario
//!   against each in alternation, keeps the medians.
//! - [`report`]: `docs/benchmarks.md` and the PNG charts.
//! - [`floor`]: plain TCP sends from one loop or a task per connection, no
//!   server: what the kernel's send path costs, and what tasks add.

mod floor;
mod polled;
mod procfs;
mod report;
mod scenario;
mod stats;
mod suite;
mod target;
mod tls;
mod token;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "securechat-bench",
    version,
    about = "Load generator comparing securechat with its peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open N connections, hold them, report the server's memory per connection.
    Idle(scenario::idle::Args),
    /// Members in one room, senders at a fixed total rate: deliveries, loss,
    /// latency, server CPU per delivery.
    Fanout(scenario::fanout::Args),
    /// Full TLS handshakes + upgrades (+ token checks) per second, CPU per handshake.
    Handshake(scenario::handshake::Args),
    /// A share of receivers stops reading: server memory and the others' latency.
    Slow(scenario::slow::Args),
    /// Run every scenario against securechat and each peer, write the report.
    // Boxed: its options outweigh every other command's.
    Suite(Box<suite::Args>),
    /// Write docs/benchmarks.md and the charts from a results file.
    Report(report::Args),
    /// Plain TCP sends to many connections, from one loop or a task per
    /// connection: the kernel's cost per send, and what the tasks add.
    Floor(floor::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Idle(args) => scenario::run(scenario::idle::run(args)),
        Command::Fanout(args) => scenario::run(scenario::fanout::run(args)),
        Command::Handshake(args) => scenario::run(scenario::handshake::run(args)),
        Command::Slow(args) => scenario::run(scenario::slow::run(args)),
        Command::Suite(args) => suite::run(*args),
        Command::Report(args) => report::run(args),
        Command::Floor(args) => floor::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("securechat-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

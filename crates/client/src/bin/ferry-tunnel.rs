//! `ferry-tunnel`: the tunnel alone, for players who do not run the relay. The same as
//! `ferry tunnel host|join`.

use std::process::ExitCode;

use clap::Parser;
use ferry_client::tunnel::cli::{self, TunnelCommand};

#[derive(Parser)]
#[command(name = "ferry-tunnel", version, about = "Carry any UDP game through a Ferry relay")]
struct Cli {
    #[command(subcommand)]
    command: TunnelCommand,
}

fn main() -> ExitCode {
    let r = match &Cli::parse().command {
        TunnelCommand::Host(a) => cli::host(a),
        TunnelCommand::Join(a) => cli::join(a),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferry-tunnel: {e}");
            ExitCode::FAILURE
        }
    }
}

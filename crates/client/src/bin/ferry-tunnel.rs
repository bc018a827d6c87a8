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
    let r = cli::run(&Cli::parse().command);
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferry-tunnel: {e}");
            ExitCode::FAILURE
        }
    }
}

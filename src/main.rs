use std::process::ExitCode;

use clap::Parser;
use ferry::cli::{Cli, Command};
use ferry::config::LogFormat;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let cfg = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ferry: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(cfg.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("ferry-control")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ferry: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(ferry::serve::serve_until_signal(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Load(args) => match ferry::load::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry load: {e}");
                ExitCode::FAILURE
            }
        },
        Command::BenchB1(args) => match ferry::load::b1::run(args.listen, args.pin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry bench-b1: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo(args) => {
            match ferry::client::demo::run(&args.api, args.token.as_deref(), &args.message) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

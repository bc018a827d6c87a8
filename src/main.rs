use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use ferry::cli::{Cli, Command};
use ferry::config::LogFormat;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a file or pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(ferry::logging::non_blocking(std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// A bad value that came from a `FERRY_*` variable rather than a flag: the message names the
/// variable and the configuration key, not the flag the user never typed.
fn env_error(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(e.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue) {
        return None;
    }
    let ContextValue::String(arg) = e.get(ContextKind::InvalidArg)? else { return None };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?.to_string();
    let typed = std::env::args().any(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")));
    if typed {
        return None;
    }
    let cmd = Cli::command();
    let found = cmd
        .get_subcommands()
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long.as_str()) && a.get_env().is_some())?;
    let var = found.get_env()?.to_string_lossy().into_owned();
    let value = std::env::var(&var).ok()?;
    let reason =
        std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_else(|| "not a valid value".into());
    Some(format!(
        "invalid configuration `{}`: environment variable {var}={value:?}: {reason}",
        found.get_id()
    ))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if let Some(msg) = env_error(&e) {
                eprintln!("ferry: {msg}");
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    match cli.command {
        Command::Serve(args) => serve(args, ferry::config::Role::Serve),
        Command::Relay(args) => serve(args, ferry::config::Role::Relay),
        Command::Api(args) => serve(args, ferry::config::Role::Api),
        Command::Fleet(cmd) => match ferry::fleet::status::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry fleet: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Tunnel(cmd) => match ferry::client::tunnel::cli::run(&cmd) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("ferry tunnel: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl(args) => match ferry::ctl::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry ctl: {e}");
                ExitCode::FAILURE
            }
        },
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
        Command::BenchXdpGen(args) => match ferry::load::live::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry bench-xdp-gen: {e}");
                ExitCode::FAILURE
            }
        },
        Command::BenchXdpPass(args) => match &args.sink {
            None => match ferry::xdp::attach_pass(&args.interface, ferry::xdp::XdpMode::Native) {
                Ok(_held) => loop {
                    std::thread::park();
                },
                Err(e) => {
                    eprintln!("ferry bench-xdp-pass: {e}");
                    ExitCode::FAILURE
                }
            },
            Some(path) => match ferry::xdp::attach_sink(&args.interface) {
                Ok(held) => loop {
                    if let Ok((p, b)) = ferry::xdp::sink_counts(&held) {
                        let tmp = path.with_extension("tmp");
                        if std::fs::write(&tmp, format!("{p} {b}\n")).is_ok() {
                            let _ = std::fs::rename(&tmp, path);
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                },
                Err(e) => {
                    eprintln!("ferry bench-xdp-pass: {e}");
                    ExitCode::FAILURE
                }
            },
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

fn serve(args: Box<ferry::cli::ServeArgs>, role: ferry::config::Role) -> ExitCode {
    let reload_from = (*args).clone();
    let cfg = match args.into_config().and_then(|c| c.for_role(role)) {
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
    match rt.block_on(ferry::serve::serve_until_signal(cfg, Some(reload_from))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e}");
            // Configuration that only start-up can judge (keys, descriptor limits).
            if e.kind() == std::io::ErrorKind::InvalidInput {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

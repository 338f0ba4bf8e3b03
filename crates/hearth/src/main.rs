//! `hearth`: one binary for the server, the executor, and both together.

mod cli;
mod config;
mod observe;
mod serve;
mod server;
mod status;
mod storage;
mod vm;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    let args = config::args_with_config_file(std::env::args().collect())?;
    let cli = cli::Cli::parse_from(args);
    if let cli::Command::ForwardUnix { socket } = &cli.command {
        // Runs per forwarded connection: no logging, no runtime.
        return Ok(hearth_vm::forward::stdio_to_unix(socket)?);
    }
    init_logging(&cli.log_format);
    hearth_executor::client::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            cli::Command::Up(a) => serve::up(*a).await,
            cli::Command::Server(a) => serve::server(*a).await,
            cli::Command::Executor(a) => serve::executor(*a).await,
            cli::Command::Status(a) => status::run(a).await,
            cli::Command::ForwardUnix { .. } => Ok(()),
        }
    })
}

/// Logs to stderr, filtered by HEARTH_LOG (default `info`), as text or as
/// JSON lines (`--log-format json`: one object per event, its fields and
/// the spans it is in, for log shippers).
fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        fmt.json().flatten_event(true).init();
    } else {
        fmt.init();
    }
}

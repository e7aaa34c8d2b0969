//! Command-line edge. Each subcommand parses its flags, calls the library, and maps the result
//! to output and an exit code; `anyhow` stops here. The clients a CI job runs (`exchange`,
//! `exec`) and the security team's `revoke`, `freeze` and `unfreeze` speak only HTTP and build
//! without the server (`--no-default-features --features client`).

mod admin;
#[cfg(feature = "server")]
mod audit;
mod exchange;
mod exec;
mod native;
#[cfg(feature = "server")]
mod policy;
#[cfg(feature = "server")]
mod server;

#[cfg(feature = "server")]
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "credbroker", version, about = "Exchange CI job tokens for short-lived credentials")]
struct Cli {
    /// Configuration file (TOML).
    #[cfg(feature = "server")]
    #[arg(long, global = true, env = "CREDBROKER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[cfg(feature = "server")]
    #[command(flatten)]
    Server(server::ServerCommand),
    /// Exchange this job's OIDC token for a credential and print it.
    Exchange(exchange::ExchangeArgs),
    /// Run a command with credentials for its whole life: renewed before expiry, revoked when it exits.
    Exec(exec::ExecArgs),
    /// Revoke issued credentials (security team; needs `[admins]` rights).
    Revoke(admin::RevokeArgs),
    /// Stop new issuance for a project, a role or everything (needs `[admins]` rights).
    Freeze(admin::FreezeArgs),
    /// End a freeze (needs `[admins]` rights).
    Unfreeze(admin::UnfreezeArgs),
}

const WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The runtime reads TOKIO_WORKER_THREADS itself (README, "Runtime threads") and panics on a
    // value it cannot use; say what is wrong instead.
    if let Some(threads) = std::env::var_os(WORKER_THREADS) {
        if threads.to_str().and_then(|threads| threads.parse::<std::num::NonZeroUsize>().ok()).is_none() {
            eprintln!("credbroker: {WORKER_THREADS} must be a number of threads, at least 1 (it is {threads:?}); unset it for one per core");
            return ExitCode::FAILURE;
        }
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // The server's log lines wait for their thread to run out of work (crate::logging).
    #[cfg(feature = "server")]
    builder.on_thread_park(crate::logging::thread_idle).on_thread_stop(crate::logging::thread_idle);
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("credbroker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The clients have their own exit codes, one per problem code.
    match cli.command {
        Command::Exchange(args) => runtime.block_on(exchange::run(args)),
        Command::Exec(args) => runtime.block_on(exec::run(args)),
        Command::Revoke(args) => runtime.block_on(admin::revoke(args)),
        Command::Freeze(args) => runtime.block_on(admin::freeze(args)),
        Command::Unfreeze(args) => runtime.block_on(admin::unfreeze(args)),
        #[cfg(feature = "server")]
        Command::Server(command) => match runtime.block_on(server::run(command, cli.config.as_deref())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("credbroker: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

//! `commerce-kernel`: runs the kernel (`serve`, the default), applies migrations
//! (`migrate`), or prints the GraphQL schema (`schema`).

use std::process::ExitCode;

use commerce_kernel::config::{self, Config};
use commerce_kernel::server::{self, KernelError};
use commerce_kernel::storage::Database;

const USAGE: &str = "\
usage: commerce-kernel [COMMAND]

commands:
  serve     run the kernel (default)
  migrate   bring the database schema up to date, then exit
  schema    print the GraphQL schema (SDL) to stdout
  help      print this message

Configuration comes from COMMERCE_* environment variables; see README.md.
With COMMERCE_DATABASE_URL unset, data is kept in SQLite under ./data/.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match args.as_slice() {
        [] => "serve",
        [one] => one.as_str(),
        _ => {
            eprintln!("commerce-kernel: expected at most one command\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match command {
        "serve" | "migrate" => {}
        "schema" => {
            print!("{}", commerce_kernel::api::sdl());
            return ExitCode::SUCCESS;
        }
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        "-V" | "--version" => {
            println!("commerce-kernel {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("commerce-kernel: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    }

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("commerce-kernel: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = init_logging(&config.log_filter) {
        eprintln!("commerce-kernel: invalid configuration: {error}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("commerce-kernel: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if command == "migrate" {
            migrate(&config).await
        } else {
            server::run(config, server::shutdown_signal(), |_| {}).await
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "commerce-kernel stopped");
            eprintln!("commerce-kernel: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(config: &Config) -> Result<(), KernelError> {
    let database = Database::connect(&config.database).await?;
    database.migrate().await?;
    tracing::info!(backend = %database.backend(), "database schema is up to date");
    database.close().await;
    Ok(())
}

fn init_logging(filter: &str) -> Result<(), config::ConfigError> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| config::ConfigError {
            variable: config::LOG,
            reason: format!("`{filter}` is not a tracing filter ({e})"),
        })?;
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .init();
    Ok(())
}

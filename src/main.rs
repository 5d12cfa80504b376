//! The `freight-kpi` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use freight_kpi::cli::{execute, report_error, write_stdout, Command, LogFormat, EXIT_USAGE};
use freight_kpi::config_file::{
    check_effective_configuration, parse_command_line, render_effective_configuration,
};
use freight_kpi::error::error_chain;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let parsed = match parse_command_line(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Command::Config = parsed.cli.command {
        // The configuration is printed even when invalid, because it shows the value
        // that the error line names. The exit code still tells a script that `run`
        // would reject it.
        let printed = write_stdout(&render_effective_configuration(&parsed));
        let checked = check_effective_configuration(&parsed);
        return match checked.and(printed) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => report_error(&error),
        };
    }
    let cli = parsed.cli;

    // The demo draws on the terminal, where routine logs would break up its view.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colour codes only help a terminal; in a file or a journal they are noise.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }

    execute(cli).await
}

//! The optional TOML configuration file (`--config PATH` or `FREIGHT_KPI_CONFIG`),
//! and `freight-kpi config`, which prints the effective configuration.
//!
//! Precedence, highest first: command-line flags, environment variables, the file,
//! the built-in defaults. The file's values become the defaults of the command line's
//! arguments, which clap ranks below flags and environment variables, so one parser
//! applies the whole order.
//!
//! The file uses the flags' names, with `_` or `-`: global settings at the top, the
//! settings of a command in a table named after it.
//!
//! ```toml
//! database_url = "postgres://freight_kpi@db.internal:5432/app"
//! log_format = "json"
//!
//! [run]
//! debounce_quiet_ms = 50
//! poll_interval_ms = "5s"
//! http = "127.0.0.1:9187"
//! ```
//!
//! A setting whose name ends in `_ms` takes a whole number of milliseconds or a string
//! with a unit: `"250ms"`, `"5s"`, `"2m"`, `"1h"`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

use crate::cli::{run_settings, Cli, Command};
use crate::db::DatabaseTarget;
use crate::error::Error;

/// Environment variable naming the configuration file, below `--config`.
pub const CONFIG_ENV: &str = "FREIGHT_KPI_CONFIG";

/// Arguments that are not settings and cannot come from the file.
const NOT_SETTINGS: [&str; 3] = ["config", "help", "version"];

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not valid TOML.
    #[error("invalid TOML in the configuration file {path}: {reason}")]
    Syntax { path: PathBuf, reason: String },

    /// A key names no setting, or a value does not fit its setting.
    #[error("invalid configuration file {path}: key {key}: {reason}")]
    Key {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// The parsed command line, with where each setting came from.
#[derive(Debug)]
pub struct ParsedCommandLine {
    pub cli: Cli,
    /// The configuration file in use, if any.
    pub config_file: Option<PathBuf>,
    /// The file's settings, as `command.setting_id` (global ones without a command).
    pub file_keys: Vec<String>,
    arguments: Vec<OsString>,
}

/// Parses the command line with the configuration file's values as defaults. Exits
/// with clap's message and code 2 on a usage error, as `Cli::parse` does.
///
/// # Errors
///
/// [`ConfigFileError`] when the file cannot be read, is not TOML, or names an
/// unknown setting or an invalid value.
pub fn parse_command_line(arguments: Vec<OsString>) -> Result<ParsedCommandLine, ConfigFileError> {
    let config_file = config_file_path(&arguments);
    let (command, file_keys) = match &config_file {
        Some(path) => with_file_defaults(Cli::command(), path)?,
        None => (Cli::command(), Vec::new()),
    };

    let matches = command.get_matches_from(arguments.clone());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    Ok(ParsedCommandLine {
        cli,
        config_file,
        file_keys,
        arguments,
    })
}

/// Finds `--config PATH`, `--config=PATH` or `FREIGHT_KPI_CONFIG`, before the full
/// parse, since the file changes how the rest is parsed.
fn config_file_path(arguments: &[OsString]) -> Option<PathBuf> {
    let mut rest = arguments.iter().skip(1);
    while let Some(argument) = rest.next() {
        let text = argument.to_string_lossy();
        if text == "--" {
            break;
        }
        if text == "--config" {
            return rest.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(CONFIG_ENV).map(PathBuf::from)
}

/// Reads the file and sets each of its values as the default of its argument.
fn with_file_defaults(
    mut command: clap::Command,
    path: &Path,
) -> Result<(clap::Command, Vec<String>), ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table =
        text.parse()
            .map_err(|error: toml::de::Error| ConfigFileError::Syntax {
                path: path.to_path_buf(),
                reason: error.message().to_owned(),
            })?;

    let key_error = |key: &str, reason: String| ConfigFileError::Key {
        path: path.to_path_buf(),
        key: key.to_owned(),
        reason,
    };
    let mut file_keys = Vec::new();
    for (key, value) in &table {
        if let toml::Value::Table(settings) = value {
            let Some(subcommand) = command.find_subcommand(key).cloned() else {
                return Err(key_error(key, format!("no command is named {key}")));
            };
            let mut subcommand = subcommand;
            for (setting, value) in settings {
                let qualified = format!("{key}.{setting}");
                subcommand = set_default(subcommand, setting, value)
                    .map_err(|reason| key_error(&qualified, reason))?;
                file_keys.push(format!("{key}.{}", setting.replace('-', "_")));
            }
            command = command.mut_subcommand(key, |_| subcommand);
        } else {
            command = set_default(command, key, value).map_err(|reason| key_error(key, reason))?;
            file_keys.push(key.replace('-', "_"));
        }
    }
    Ok((command, file_keys))
}

/// Makes `value` the default of the argument `key` of `command`, after checking it
/// with the argument's own parser.
fn set_default(
    command: clap::Command,
    key: &str,
    value: &toml::Value,
) -> Result<clap::Command, String> {
    let id = key.replace('-', "_");
    let Some(argument) = command
        .get_arguments()
        .find(|argument| argument.get_id() == id.as_str())
        .filter(|argument| !NOT_SETTINGS.contains(&argument.get_id().as_str()))
    else {
        let known: Vec<String> = command
            .get_arguments()
            .map(|argument| argument.get_id().to_string())
            .filter(|id| !NOT_SETTINGS.contains(&id.as_str()))
            .collect();
        return Err(format!(
            "no setting of this name; the settings here are {}",
            known.join(", ")
        ));
    };

    let text = value_text(&id, value)?;
    check_value(argument, &text)?;

    // clap keeps defaults as `&'static str` here; the few values of one file live as
    // long as the process anyway.
    let text: &'static str = Box::leak(text.into_boxed_str());
    let id = argument.get_id().clone();
    Ok(command.mut_arg(id, |argument| argument.default_value(text)))
}

/// Runs `text` through the argument's own parser, so that an invalid value is reported
/// with its key in the file rather than as a flag the user never typed.
fn check_value(argument: &clap::Arg, text: &str) -> Result<(), String> {
    // Switches such as --dry-run take no value on the command line.
    if !argument.get_action().takes_values() {
        return match text {
            "true" | "false" => Ok(()),
            _ => Err(format!("invalid value {text:?}: expected true or false")),
        };
    }

    let probe = clap::Arg::new("value")
        .long("value")
        .value_parser(argument.get_value_parser().clone())
        .action(clap::ArgAction::Set);
    clap::Command::new("check")
        .no_binary_name(true)
        .arg(probe)
        .try_get_matches_from(["--value", text])
        .map(|_| ())
        .map_err(|error| {
            let detail = error.to_string();
            let detail = detail.lines().next().unwrap_or_default().to_owned();
            format!(
                "invalid value {text:?}: {}",
                detail.trim_start_matches("error: ")
            )
        })
}

/// Converts a TOML value to the text the argument's parser expects. Settings named
/// `*_ms` also take a string with a unit.
fn value_text(id: &str, value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(text) if id.ends_with("_ms") => milliseconds(text)
            .map(|ms| ms.to_string())
            .ok_or_else(|| {
                format!("invalid duration {text:?}: expected a whole number of milliseconds or a number with ms, s, m or h, such as \"250ms\" or \"5s\"")
            }),
        toml::Value::String(text) => Ok(text.clone()),
        toml::Value::Integer(number) => Ok(number.to_string()),
        toml::Value::Float(number) => Ok(number.to_string()),
        toml::Value::Boolean(flag) => Ok(flag.to_string()),
        other => Err(format!(
            "a {} is not a setting value; use a string, a number or a boolean",
            other.type_str()
        )),
    }
}

/// Parses `"250ms"`, `"5s"`, `"2m"`, `"1h"` or a bare number of milliseconds.
fn milliseconds(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// Parses the command line of `config` with `run` in place of `config`, so that every
/// setting of `run` is resolved from flags, environment and file as `run` would.
/// Returns the command it was parsed with, the file's values included as defaults.
fn run_matches(parsed: &ParsedCommandLine) -> Result<(clap::Command, ArgMatches), clap::Error> {
    // The subcommand is the first argument that is neither a flag nor the value of a
    // global flag.
    let mut arguments: Vec<OsString> = Vec::new();
    let mut replaced = false;
    let mut takes_value = false;
    for argument in &parsed.arguments {
        let text = argument.to_string_lossy();
        if !replaced && !takes_value && !text.starts_with('-') && !arguments.is_empty() {
            arguments.push("run".into());
            replaced = true;
            continue;
        }
        takes_value = !text.contains('=')
            && ["--config", "--database-url", "--log-format"].contains(&text.as_ref());
        arguments.push(argument.clone());
    }
    let (command, _) = match &parsed.config_file {
        Some(path) => with_file_defaults(Cli::command(), path)
            .unwrap_or_else(|_| (Cli::command(), Vec::new())),
        None => (Cli::command(), Vec::new()),
    };
    let matches = command.clone().try_get_matches_from(arguments)?;
    Ok((command, matches))
}

/// Checks the configuration that `config` prints as `run` checks it, so that `config`
/// rejects what `run` would reject.
///
/// # Errors
///
/// [`Error::InvalidArguments`] when the settings of `run` do not parse (such as an
/// environment variable with a value of the wrong type), [`Error::InvalidDatabaseUrl`]
/// for a connection string that is set but invalid, and [`Error::InvalidSetting`]
/// from [`run_settings`].
pub fn check_effective_configuration(parsed: &ParsedCommandLine) -> Result<(), Error> {
    let (_, matches) = run_matches(parsed).map_err(|error| {
        let message = error.to_string();
        let first_line = message.lines().next().unwrap_or_default();
        Error::InvalidArguments(first_line.trim_start_matches("error: ").to_owned())
    })?;
    let cli = Cli::from_arg_matches(&matches)
        .map_err(|error| Error::InvalidArguments(error.to_string()))?;
    let Command::Run(args) = &cli.command else {
        unreachable!("run_matches parses the command line of run");
    };

    // `config` may run without a connection string, which it then shows as not set.
    // The settings still need a target to be checked; this one is never connected to.
    let target = match cli.database_url.as_deref() {
        Some(url) => DatabaseTarget::parse(url)?,
        None => DatabaseTarget::parse("host=localhost user=postgres dbname=postgres")?,
    };
    run_settings(target, args).map(|_| ())
}

/// Renders the configuration that `freight-kpi run` would use with the same flags,
/// environment and file, as TOML with the source of each value in a comment. Values
/// of settings whose environment value clap hides (the connection string, alert URLs
/// and keys) are redacted.
pub fn render_effective_configuration(parsed: &ParsedCommandLine) -> String {
    let (command, matches) = match run_matches(parsed) {
        Ok(parsed_run) => parsed_run,
        Err(error) => return format!("# the settings of run do not parse: {error}\n"),
    };

    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Effective configuration of `freight-kpi run`. Precedence: flags, environment, {}, defaults.",
        parsed
            .config_file
            .as_ref()
            .map_or_else(|| "configuration file (none)".to_owned(), |path| format!("configuration file {}", path.display()))
    );
    render_arguments(&mut text, &command, &matches, "", &parsed.file_keys);
    if let Some((name, run_matches)) = matches.subcommand() {
        let run = command
            .find_subcommand(name)
            .expect("the matched subcommand exists");
        let _ = writeln!(text, "\n[{name}]");
        render_arguments(&mut text, run, run_matches, name, &parsed.file_keys);
    }
    text
}

fn render_arguments(
    text: &mut String,
    command: &clap::Command,
    matches: &ArgMatches,
    section: &str,
    file_keys: &[String],
) {
    let mut lines = BTreeMap::new();
    for argument in command.get_arguments() {
        let id = argument.get_id().as_str();
        if NOT_SETTINGS.contains(&id) || (argument.is_global_set() && !section.is_empty()) {
            continue;
        }
        let Ok(Some(raw)) = matches.try_get_raw(id) else {
            lines.insert(id.to_owned(), format!("# {id} is not set"));
            continue;
        };
        let values: Vec<String> = raw
            .map(|value| value.to_string_lossy().into_owned())
            .collect();
        let value = values.join(",");
        let value = if argument.is_hide_env_values_set() {
            redact(&value)
        } else {
            value
        };

        let qualified = if section.is_empty() {
            id.to_owned()
        } else {
            format!("{section}.{id}")
        };
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "flag".to_owned(),
            Some(ValueSource::EnvVariable) => format!(
                "environment {}",
                argument
                    .get_env()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            Some(ValueSource::DefaultValue) if file_keys.contains(&qualified) => "file".to_owned(),
            _ => "default".to_owned(),
        };
        // Numbers and booleans are written bare, as a file would have them.
        let rendered = if value.parse::<i64>().is_ok() || value == "true" || value == "false" {
            value
        } else {
            toml::Value::String(value).to_string()
        };
        lines.insert(id.to_owned(), format!("{id} = {rendered}  # {source}"));
    }
    for line in lines.values() {
        let _ = writeln!(text, "{line}");
    }
}

/// Hides a secret: the password of a connection string, or the whole value of any
/// other secret (a webhook URL carries its token in the path).
fn redact(value: &str) -> String {
    if value.is_empty() {
        return value.to_owned();
    }
    if let Some((scheme, rest)) = value.split_once("://") {
        if scheme.starts_with("postgres") {
            if let Some((userinfo, host)) = rest.rsplit_once('@') {
                let user = userinfo.split(':').next().unwrap_or_default();
                let password = if userinfo.contains(':') { ":***" } else { "" };
                return format!("{scheme}://{user}{password}@{host}");
            }
            return value.to_owned();
        }
        return "***".to_owned();
    }
    if let Some(start) = value.find("password=") {
        // key=value pairs: only the password is secret. A quoted password may
        // contain spaces, so its end is the closing quote.
        let value_start = start + "password=".len();
        let rest = &value[value_start..];
        let length = if let Some(quoted) = rest.strip_prefix('\'') {
            let mut escaped = false;
            let closing = quoted.char_indices().find(|&(_, character)| {
                let closes = character == '\'' && !escaped;
                escaped = character == '\\' && !escaped;
                closes
            });
            closing.map_or(rest.len(), |(index, _)| index + 2)
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        return format!("{}***{}", &value[..value_start], &rest[length..]);
    }
    if value.contains('=') {
        return value.to_owned();
    }
    "***".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units() {
        assert_eq!(milliseconds("250"), Some(250));
        assert_eq!(milliseconds("250ms"), Some(250));
        assert_eq!(milliseconds("5s"), Some(5_000));
        assert_eq!(milliseconds("2m"), Some(120_000));
        assert_eq!(milliseconds("1h"), Some(3_600_000));
        assert_eq!(milliseconds("5 parsecs"), None);
        assert_eq!(milliseconds("fast"), None);
    }

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(
            redact("postgres://app:hunter22@db:5432/kpi"),
            "postgres://app:***@db:5432/kpi"
        );
        assert_eq!(
            redact("host=db user=app password=hunter22 dbname=kpi"),
            "host=db user=app password=*** dbname=kpi"
        );
        assert_eq!(
            redact("host=db password='a b\\'c' dbname=kpi"),
            "host=db password=*** dbname=kpi"
        );
        assert_eq!(redact("https://hooks.example/T000/B000/secret"), "***");
    }
}

//! Configuration from flags, environment variables and the `--config` TOML file, and
//! `freight-kpi config`, which prints the result.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::binary;

/// A TOML file that exists for one test and is removed when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn path(&self) -> &str {
        self.0.to_str().expect("the temporary path is UTF-8")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `contents` to a fresh TOML file.
fn config_file(contents: &str) -> ConfigFile {
    let path = std::env::temp_dir().join(format!(
        "freight-kpi-config-{}-{:08x}.toml",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::write(&path, contents).expect("write the configuration file");
    ConfigFile(path)
}

fn freight_kpi(args: &[&str], database_url: Option<&str>) -> Output {
    let mut command = std::process::Command::new(binary());
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("FREIGHT_KPI_CONFIG");
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url);
    }
    command.output().expect("run the freight-kpi binary")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Returns the line of `setting` in the output of `config`.
fn setting_line(config: &str, setting: &str) -> String {
    config
        .lines()
        .find(|line| line.starts_with(&format!("{setting} = ")))
        .unwrap_or_else(|| panic!("no line for {setting} in:\n{config}"))
        .to_owned()
}

#[test]
fn file_sets_run_settings_with_units() {
    let file = config_file("[run]\ndebounce_quiet_ms = \"80ms\"\npoll_interval_ms = \"2s\"\n");

    let output = freight_kpi(&["--config", file.path(), "config"], None);

    assert!(output.status.success(), "{}", stderr(&output));
    let config = stdout(&output);
    assert_eq!(
        setting_line(&config, "debounce_quiet_ms"),
        "debounce_quiet_ms = 80  # file"
    );
    assert_eq!(
        setting_line(&config, "poll_interval_ms"),
        "poll_interval_ms = 2000  # file"
    );
    assert_eq!(
        setting_line(&config, "batch_size"),
        "batch_size = 5000  # default"
    );
}

#[test]
fn flags_beat_environment_beat_file() {
    let file = config_file("database_url = \"host=from-file user=app\"\n");
    let path = file.path();

    let file_only = stdout(&freight_kpi(&["--config", path, "config"], None));
    let with_env = stdout(&freight_kpi(
        &["--config", path, "config"],
        Some("host=from-env user=app"),
    ));
    let with_flag = stdout(&freight_kpi(
        &[
            "--config",
            path,
            "--database-url",
            "host=from-flag user=app",
            "config",
        ],
        Some("host=from-env user=app"),
    ));

    assert!(
        setting_line(&file_only, "database_url").contains("from-file"),
        "{file_only}"
    );
    assert!(
        setting_line(&with_env, "database_url").contains("from-env"),
        "{with_env}"
    );
    assert!(
        setting_line(&with_flag, "database_url").contains("from-flag"),
        "{with_flag}"
    );
}

#[test]
fn config_redacts_database_password() {
    let output = freight_kpi(
        &["config"],
        Some("postgres://app:hunter22@db.example:5432/kpi"),
    );

    let config = stdout(&output);
    assert!(
        !config.contains("hunter22"),
        "the password leaked:\n{config}"
    );
    assert_eq!(
        setting_line(&config, "database_url"),
        "database_url = \"postgres://app:***@db.example:5432/kpi\"  # environment DATABASE_URL"
    );
}

#[test]
fn invalid_file_value_names_key() {
    let file = config_file("[run]\ndebounce_quiet_ms = \"fast\"\n");

    let output = freight_kpi(&["--config", file.path(), "config"], None);

    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("key run.debounce_quiet_ms"), "{message}");
    assert!(message.contains("\"fast\""), "{message}");
}

#[test]
fn unknown_file_key_lists_settings() {
    let file = config_file("[run]\ndebounce = 5\n");

    let output = freight_kpi(&["--config", file.path(), "config"], None);

    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("key run.debounce"), "{message}");
    assert!(
        message.contains("debounce_quiet_ms"),
        "the error does not list the settings: {message}"
    );
}

#[test]
fn file_values_reach_run_checks() {
    // Guards against file values that the parser accepts but `run` never receives.
    let file = config_file("[run]\nbatch_size = 0\n");

    let output = freight_kpi(
        &["--config", file.path(), "run", "--http", "off"],
        Some("host=127.0.0.1 port=1 user=nobody dbname=none"),
    );

    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--batch-size"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn missing_config_file_is_usage_error() {
    let output = freight_kpi(
        &["--config", "/nonexistent/freight-kpi.toml", "config"],
        None,
    );

    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("/nonexistent/freight-kpi.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn config_rejects_what_run_rejects() {
    // Guards against `config` printing with exit 0 a value that `run` rejects.
    let file = config_file("[run]\ndebounce_max_ms = \"2h\"\n");

    let output = freight_kpi(&["--config", file.path(), "config"], None);

    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(message.contains("--debounce-max-ms"), "{message}");
    assert!(message.contains("7200000"), "{message}");
    assert!(
        stdout(&output).contains("debounce_max_ms = 7200000  # file"),
        "the configuration is still printed"
    );
}

#[test]
fn config_rejects_unparsable_environment_value() {
    // Guards against `config` printing "do not parse" with exit 0 for a value that
    // makes `run` exit 2.
    let output = std::process::Command::new(binary())
        .arg("config")
        .env_remove("DATABASE_URL")
        .env_remove("FREIGHT_KPI_CONFIG")
        .env("FREIGHT_KPI_ALERT_ATTEMPTS", "many")
        .output()
        .expect("run the freight-kpi binary");

    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(message.contains("--alert-attempts"), "{message}");
    assert!(message.contains("many"), "{message}");
}

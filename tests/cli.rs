//! The `freight-kpi` binary as an operator meets it: bad and unreachable connection
//! strings, `migrate` on empty and pre-existing databases, `status`, `--help`, and
//! stopping `run` with a signal.

mod common;

use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use common::{binary, queue_depth, wait_until, TestDb};
use tokio::process::{Child, Command};

/// A password placed in connection strings. No output may contain it.
const PASSWORD: &str = "s3cretpw";

/// `run` without its HTTP endpoint, whose fixed default port would make tests that
/// run in parallel fail each other.
const RUN: &[&str] = &["run", "--http", "off"];

/// Time `run` has to exit after SIGINT or SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Builds a command for the binary with `DATABASE_URL` set to `url`, or unset when
/// `url` is `None`. `RUST_BACKTRACE` is on, so a panic would show in the output.
fn freight_kpi(url: Option<&str>, args: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(url) = url {
        command.env("DATABASE_URL", url);
    }
    command
}

/// Runs the binary to completion, at most 60 seconds.
async fn run_to_end(url: Option<&str>, args: &[&str]) -> Output {
    let output = freight_kpi(url, args).output();
    tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .unwrap_or_else(|_| panic!("freight-kpi {args:?} did not exit within 60 s"))
        .expect("start the freight-kpi binary")
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Checks the shape every failing command shares: the expected exit code, exactly
/// one `error:` line on standard error, no panic and no password anywhere.
fn assert_one_error_line(case: &str, output: &Output, expected_code: i32) -> String {
    let stdout = stdout_of(output);
    let stderr = stderr_of(output);
    let lines: Vec<&str> = stderr.lines().collect();

    assert_eq!(
        output.status.code(),
        Some(expected_code),
        "{case}: exit code; stderr:\n{stderr}"
    );
    assert_eq!(lines.len(), 1, "{case}: stderr lines:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{case}: {stderr}");
    assert!(!stderr.contains("panicked"), "{case}: {stderr}");
    assert!(
        !stderr.contains(PASSWORD),
        "{case}: stderr leaks the password: {stderr}"
    );
    assert!(
        !stdout.contains(PASSWORD),
        "{case}: stdout leaks the password: {stdout}"
    );
    lines[0].to_owned()
}

#[tokio::test]
async fn invalid_database_url_exits_with_usage_error() {
    // Each case: the value (None leaves DATABASE_URL unset) and a fragment the error
    // line must contain to name the problem.
    let password_url = format!("postgres://user:{PASSWORD}@host:notaport/db");
    let password_pairs = format!("host=127.0.0.1 password={PASSWORD} port=notaport");
    let quoted_password = format!("host=127.0.0.1 password='{PASSWORD} x' foo=bar");
    let cases: [(&str, Option<&str>, &str); 7] = [
        (
            "garbage text",
            Some("garbage text"),
            "invalid connection string",
        ),
        ("bad port in a URL", Some(&password_url), "port"),
        ("bad port in pairs", Some(&password_pairs), "port"),
        ("unknown key", Some("foo=bar"), "unknown option `foo`"),
        (
            "unknown key after a password",
            Some(&quoted_password),
            "unknown option `foo`",
        ),
        ("empty value", Some(""), "empty"),
        ("unset variable", None, "DATABASE_URL is not set"),
    ];

    for (case, url, fragment) in cases {
        for command in [&["migrate"][..], RUN, &["status"], &["reconcile"]] {
            let label = format!("{case} ({})", command[0]);
            let output = run_to_end(url, command).await;

            let line = assert_one_error_line(&label, &output, 2);
            assert!(
                line.starts_with("error: invalid DATABASE_URL"),
                "{label}: {line}"
            );
            assert!(
                line.contains(fragment),
                "{label}: expected {fragment:?} in {line}"
            );
        }
    }
}

#[tokio::test]
async fn unreachable_server_exits_with_failure() {
    // Port 1 on loopback has no server, so the connection is refused at once.
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:1/db");

    for command in [&["migrate"][..], RUN, &["status"], &["reconcile"]] {
        let label = format!("unreachable server ({})", command[0]);
        let output = run_to_end(Some(&url), command).await;

        let line = assert_one_error_line(&label, &output, 1);
        assert!(line.contains("cannot connect"), "{label}: {line}");
        assert!(line.contains("127.0.0.1:1"), "{label}: {line}");
        assert!(line.contains("refused"), "{label}: {line}");
    }
}

#[tokio::test]
async fn wrong_database_name_shows_server_message() {
    let db = TestDb::empty().await;
    let missing = format!("{}_missing", db.name);
    let url = format!(
        "{} password={PASSWORD}",
        db.url().replace(&db.name, &missing)
    );

    for command in [&["migrate"][..], RUN, &["status"]] {
        let label = format!("wrong database ({})", command[0]);
        let output = run_to_end(Some(&url), command).await;

        let line = assert_one_error_line(&label, &output, 1);
        assert!(
            line.contains(&format!("database \"{missing}\" does not exist")),
            "{label}: {line}"
        );
    }
}

#[tokio::test]
async fn unknown_subcommand_exits_with_usage_error() {
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:1/db");

    let output = run_to_end(Some(&url), &["frobnicate"]).await;

    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("frobnicate"), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");
}

#[tokio::test]
async fn invalid_run_setting_exits_with_usage_error() {
    let db = TestDb::migrated().await;

    let output = run_to_end(
        Some(&db.url()),
        &["run", "--http", "off", "--debounce-quiet-ms", "0"],
    )
    .await;

    let line = assert_one_error_line("zero quiet window", &output, 2);
    assert!(line.contains("--debounce-quiet-ms"), "{line}");
}

#[tokio::test]
async fn migrate_twice_on_empty_database() {
    let db = TestDb::empty().await;

    let first = run_to_end(Some(&db.url()), &["migrate"]).await;
    let second = run_to_end(Some(&db.url()), &["migrate"]).await;

    assert!(
        first.status.success(),
        "first migrate: {}",
        stderr_of(&first)
    );
    assert!(
        stdout_of(&first).contains("applied V3__create_change_capture"),
        "first migrate printed: {}",
        stdout_of(&first)
    );
    assert!(
        second.status.success(),
        "second migrate: {}",
        stderr_of(&second)
    );
    assert_eq!(stdout_of(&second).trim(), "schema is up to date");

    let client = db.client().await;
    let triggers: i64 = client
        .query_one(
            r#"SELECT count(*) FROM pg_trigger
               WHERE tgrelid = '"Load"'::regclass AND tgname LIKE 'freight_kpi_capture_%'"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        triggers, 4,
        "one capture trigger per INSERT, UPDATE, DELETE and TRUNCATE"
    );
}

/// The schema an application (Prisma) creates before this service is attached: a
/// "JobName" enum without KPI_AGGREGATION, and its own rows in every table.
const APPLICATION_SCHEMA: &str = r#"
    CREATE TYPE "JobName" AS ENUM ('INCENTIVE_DAILY_COMMIT', 'CHURN_RECALC', 'TASK_GENERATION');
    CREATE TYPE "LoadStatus" AS ENUM
        ('OPEN', 'WORKING', 'QUOTED', 'COVERED', 'IN_TRANSIT', 'DELIVERED', 'LOST', 'CANCELLED');
    CREATE TABLE "Load" (
        id bigserial PRIMARY KEY,
        "ventureId" integer NOT NULL,
        status "LoadStatus" NOT NULL DEFAULT 'OPEN',
        "billAmount" numeric(12, 2),
        "costAmount" numeric(12, 2),
        "billingDate" timestamptz,
        "createdAt" timestamptz NOT NULL DEFAULT now(),
        "updatedAt" timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE "FreightKpiDaily" (
        id serial PRIMARY KEY,
        "ventureId" integer NOT NULL,
        date date NOT NULL,
        "loadsInbound" integer NOT NULL DEFAULT 0,
        "loadsQuoted" integer NOT NULL DEFAULT 0,
        "loadsCovered" integer NOT NULL DEFAULT 0,
        "loadsLost" integer NOT NULL DEFAULT 0,
        "totalRevenue" numeric(14, 2) NOT NULL DEFAULT 0,
        "totalCost" numeric(14, 2) NOT NULL DEFAULT 0,
        "totalProfit" numeric(14, 2) NOT NULL DEFAULT 0,
        "avgMarginPct" numeric(7, 2),
        "activeShippers" integer,
        "newShippers" integer,
        "churnedShippers" integer,
        "reactivatedShippers" integer,
        "atRiskShippers" integer,
        "activeCarriers" integer,
        "newCarriers" integer,
        "updatedAt" timestamptz NOT NULL DEFAULT now()
    );
    CREATE UNIQUE INDEX "FreightKpiDaily_ventureId_date_key" ON "FreightKpiDaily" ("ventureId", date);
    CREATE TABLE "JobRunLog" (
        id bigserial PRIMARY KEY,
        "jobName" "JobName" NOT NULL,
        status text NOT NULL,
        "startedAt" timestamptz NOT NULL,
        "endedAt" timestamptz,
        "durationMs" integer,
        "statsJson" jsonb,
        error text
    );

    INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
    VALUES (1, 'DELIVERED', 100.00, 60.00, '2024-01-01 10:00+00', '2024-01-01 09:00+00'),
           (2, 'LOST', NULL, NULL, NULL, '2024-01-02 09:00+00');
    INSERT INTO "FreightKpiDaily" ("ventureId", date, "loadsInbound", "totalRevenue", "activeShippers")
    VALUES (1, '2024-01-01', 7, 123.45, 3);
    INSERT INTO "JobRunLog" ("jobName", status, "startedAt")
    VALUES ('CHURN_RECALC', 'SUCCESS', '2024-01-01 00:00+00');
"#;

/// Returns every row of the application's tables as text, to compare before and after.
async fn application_rows(client: &tokio_postgres::Client) -> Vec<String> {
    let mut rows = Vec::new();
    for table in ["Load", "FreightKpiDaily", "JobRunLog"] {
        let statement = format!(r#"SELECT t::text FROM "{table}" t ORDER BY id"#);
        for row in client.query(&statement, &[]).await.unwrap() {
            rows.push(format!("{table}: {}", row.get::<_, String>(0)));
        }
    }
    rows
}

#[tokio::test]
async fn migrate_adds_missing_job_name_value() {
    let db = TestDb::empty().await;
    let client = db.client().await;
    client.batch_execute(APPLICATION_SCHEMA).await.unwrap();
    let rows_before = application_rows(&client).await;

    let output = run_to_end(Some(&db.url()), &["migrate"]).await;

    assert!(output.status.success(), "migrate: {}", stderr_of(&output));
    let labels: Vec<String> = client
        .query(
            r#"SELECT enumlabel::text FROM pg_enum
               WHERE enumtypid = '"JobName"'::regtype ORDER BY enumsortorder"#,
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        labels,
        [
            "INCENTIVE_DAILY_COMMIT",
            "CHURN_RECALC",
            "TASK_GENERATION",
            "KPI_AGGREGATION"
        ]
    );
    assert_eq!(application_rows(&client).await, rows_before);
    let unique_keys: i64 = client
        .query_one(
            r#"SELECT count(*) FROM pg_index
               WHERE indrelid = '"FreightKpiDaily"'::regclass AND indisunique AND indnkeyatts = 2"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        unique_keys, 1,
        "the application's unique key is reused, not duplicated"
    );

    let second = run_to_end(Some(&db.url()), &["migrate"]).await;
    assert!(
        second.status.success(),
        "second migrate: {}",
        stderr_of(&second)
    );
    assert_eq!(application_rows(&client).await, rows_before);

    // The new value is usable: reconcile logs its run under it.
    let reconcile = run_to_end(Some(&db.url()), &["reconcile"]).await;
    assert!(
        reconcile.status.success(),
        "reconcile: {}",
        stderr_of(&reconcile)
    );
    let kpi_runs: i64 = client
        .query_one(
            r#"SELECT count(*) FROM "JobRunLog" WHERE "jobName" = 'KPI_AGGREGATION'"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kpi_runs, 1);
}

#[tokio::test]
async fn status_prints_queue_depth_and_age() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute(
            r#"INSERT INTO "Load" ("ventureId", "createdAt") VALUES (1, '2024-03-01 12:00+00');
               INSERT INTO "Load" ("ventureId", "createdAt") VALUES (2, '2024-03-02 12:00+00');
               INSERT INTO "Load" ("ventureId", "createdAt") VALUES (3, '2024-03-03 12:00+00');
               -- Age the changes so the oldest one is known: 90 s, the others 10 s.
               UPDATE freight_kpi.change_queue SET enqueued_at = now() - interval '10 seconds';
               UPDATE freight_kpi.change_queue SET enqueued_at = now() - interval '90 seconds'
               WHERE id = (SELECT min(id) FROM freight_kpi.change_queue);"#,
        )
        .await
        .unwrap();
    let depth = queue_depth(&client).await;
    assert_eq!(depth, 3);

    let text = run_to_end(Some(&db.url()), &["status"]).await;
    let json = run_to_end(Some(&db.url()), &["status", "--json"]).await;

    assert!(text.status.success(), "status: {}", stderr_of(&text));
    let stdout = stdout_of(&text);
    let depth_line = stdout
        .lines()
        .find(|line| line.starts_with("queue depth:"))
        .unwrap_or_else(|| panic!("no queue depth line in:\n{stdout}"));
    assert_eq!(depth_line.split_whitespace().nth(2), Some("3"), "{stdout}");
    let age_line = stdout
        .lines()
        .find(|line| line.starts_with("oldest change age:"))
        .unwrap_or_else(|| panic!("no oldest change age line in:\n{stdout}"));
    let age: f64 = age_line
        .split_whitespace()
        .nth(3)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no age in {age_line:?}"));
    assert!((90.0..150.0).contains(&age), "{age_line}");

    assert!(json.status.success(), "status --json: {}", stderr_of(&json));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap_or_else(|error| {
        panic!("status --json is not JSON ({error}): {}", stdout_of(&json))
    });
    assert_eq!(report["queue"]["depth"], serde_json::json!(3), "{report}");
    let json_age = report["queue"]["oldest_age_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no oldest_age_seconds number in {report}"));
    assert!((90.0..150.0).contains(&json_age), "{report}");
}

#[tokio::test]
async fn status_of_empty_queue_has_no_age() {
    let db = TestDb::migrated().await;

    let text = run_to_end(Some(&db.url()), &["status"]).await;
    let json = run_to_end(Some(&db.url()), &["status", "--json"]).await;

    assert!(text.status.success(), "status: {}", stderr_of(&text));
    let stdout = stdout_of(&text);
    assert!(stdout.contains("queue depth:        0 changes"), "{stdout}");
    assert!(stdout.contains("(queue empty)"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap_or_else(|error| {
        panic!("status --json is not JSON ({error}): {}", stdout_of(&json))
    });
    assert_eq!(report["queue"]["depth"], serde_json::json!(0), "{report}");
    assert!(report["queue"]["oldest_age_seconds"].is_null(), "{report}");
}

#[tokio::test]
async fn help_hides_database_url_value() {
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:1/hidden_db");
    let invocations: [&[&str]; 7] = [
        &["--help"],
        &["help", "run"],
        &["run", "--help"],
        &["migrate", "--help"],
        &["reconcile", "--help"],
        &["status", "-h"],
        &["--version"],
    ];

    for args in invocations {
        let output = run_to_end(Some(&url), args).await;

        let stdout = stdout_of(&output);
        let everything = format!("{stdout}{}", stderr_of(&output));
        assert!(output.status.success(), "{args:?}: {everything}");
        assert!(
            !everything.contains(PASSWORD),
            "{args:?} leaks the password: {everything}"
        );
        assert!(
            !everything.contains("hidden_db"),
            "{args:?} shows the URL: {everything}"
        );
        if args.contains(&"--version") {
            continue;
        }
        assert!(
            stdout.contains("[env: DATABASE_URL]"),
            "{args:?} does not document the variable: {stdout}"
        );
    }
}

/// Starts `run` on `db` and waits until its listener is armed.
async fn start_run(db: &TestDb) -> Child {
    let child = freight_kpi(Some(&db.url()), RUN)
        .spawn()
        .expect("start freight-kpi run");
    let client = db.client().await;
    wait_until(
        "the listener of freight-kpi run to arm",
        Duration::from_secs(20),
        || async {
            client
                .query_one("SELECT count(*) FROM freight_kpi.listener WHERE armed", &[])
                .await
                .map(|row| row.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        },
    )
    .await;
    child
}

/// Sends `signal` (a name such as `TERM`) to `child` with kill(1).
async fn send_signal(child: &Child, signal: &str) {
    let pid = child.id().expect("the child is still running").to_string();
    let status = Command::new("kill")
        .args(["-s", signal, &pid])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -s {signal} {pid} failed");
}

/// Waits for `child` to exit, at most [`STOP_DEADLINE`], and returns its status and
/// standard error.
async fn wait_for_exit(child: Child) -> (ExitStatus, String) {
    let output = tokio::time::timeout(STOP_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("freight-kpi run did not stop within {STOP_DEADLINE:?}"))
        .expect("wait for freight-kpi run");
    (output.status, stderr_of(&output))
}

/// Counts this database's connections opened by the service.
async fn service_connections(client: &tokio_postgres::Client, db: &TestDb) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name LIKE 'freight-kpi%'",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0)
}

async fn assert_signal_stops_run(signal: &str) {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let child = start_run(&db).await;
    // Work for the service first, so the pool has open connections that the stop
    // must close.
    client
        .batch_execute(r#"INSERT INTO "Load" ("ventureId") SELECT i FROM generate_series(1, 20) i"#)
        .await
        .unwrap();
    common::wait_for_exact_kpis(&client, Duration::from_secs(10)).await;

    send_signal(&child, signal).await;
    let (status, stderr) = wait_for_exit(child).await;

    assert_eq!(status.code(), Some(0), "SIG{signal}: stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("SIG{signal} received")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let listeners: i64 = client
        .query_one("SELECT count(*) FROM freight_kpi.listener", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listeners, 0, "the stopped listener removes its row");
    wait_until(
        "the service's connections to close",
        Duration::from_secs(10),
        || async { service_connections(&client, &db).await == 0 },
    )
    .await;
}

#[tokio::test]
async fn run_stops_on_sigterm() {
    assert_signal_stops_run("TERM").await;
}

#[tokio::test]
async fn run_stops_on_sigint() {
    assert_signal_stops_run("INT").await;
}

#[tokio::test]
async fn run_without_schema_asks_for_migrate() {
    let db = TestDb::empty().await;

    let output = run_to_end(Some(&db.url()), RUN).await;

    let line = assert_one_error_line("run before migrate", &output, 1);
    assert!(line.contains("run `freight-kpi migrate` first"), "{line}");
}

#[tokio::test]
async fn status_without_schema_asks_for_migrate() {
    let db = TestDb::empty().await;

    let output = run_to_end(Some(&db.url()), &["status"]).await;

    let line = assert_one_error_line("status before migrate", &output, 1);
    assert!(line.contains("run `freight-kpi migrate` first"), "{line}");
}

/// A connection string with no server behind it, for checks that must fail before
/// any connection is tried.
const NO_SERVER_URL: &str = "host=127.0.0.1 port=1 user=nobody dbname=none";

/// Runs the binary to completion, at most 60 seconds, with its logs off, so that
/// standard error holds only the error line of a failing command.
async fn run_without_logs(url: &str, args: &[&str]) -> Output {
    let mut command = freight_kpi(Some(url), args);
    command.env("RUST_LOG", "off");
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("freight-kpi {args:?} did not exit within 60 s"))
        .expect("start the freight-kpi binary")
}

#[tokio::test]
async fn run_rejects_durations_above_bounds() {
    // Guards against durations so long that `run` sleeps through a stop request.
    // Each case: the flag, the value and a fragment of what is allowed.
    let cases = [
        ("--debounce-quiet-ms", "60001", "1 minute"),
        ("--debounce-max-ms", "18446744073709551615", "1 minute"),
        ("--poll-interval-ms", "3600001", "1 hour"),
        ("--ping-interval-ms", "18446744073709551615", "1 hour"),
        ("--ping-timeout-ms", "60001", "1 minute"),
    ];

    for (flag, value, allowed) in cases {
        let output = run_to_end(Some(NO_SERVER_URL), &["run", "--http", "off", flag, value]).await;

        let line = assert_one_error_line(flag, &output, 2);
        assert!(line.contains(flag), "{flag}: {line}");
        assert!(line.contains(value), "{flag}: {line}");
        assert!(line.contains(allowed), "{flag}: {line}");
    }
}

#[tokio::test]
async fn unknown_time_zone_names_its_flag() {
    // Guards against blaming --reconcile-schedule, and logging a second line, for a
    // bad --schedule-time-zone.
    let output = run_to_end(
        Some(NO_SERVER_URL),
        &[
            "run",
            "--http",
            "off",
            "--schedule-time-zone",
            "Mars/Olympus",
        ],
    )
    .await;

    let line = assert_one_error_line("unknown time zone", &output, 2);
    assert!(line.contains("--schedule-time-zone"), "{line}");
    assert!(line.contains("Mars/Olympus"), "{line}");
    assert!(
        line.contains("an IANA time zone name such as Europe/Berlin"),
        "{line}"
    );
    assert!(!line.contains("--reconcile-schedule"), "{line}");
}

#[tokio::test]
async fn partial_reconcile_exits_with_code_4() {
    // Guards against a PARTIAL reconcile exiting 0, which cron cannot tell from success.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // Without the capture triggers the load is never queued, so only reconcile reads
    // it. Its margin, (0.01 - 100) * 100 / 0.01, overflows "avgMarginPct" numeric(7, 2).
    client
        .batch_execute(
            r#"SET session_replication_role = replica;
               INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate")
               VALUES (1, 'DELIVERED', 0.01, 100, now());
               RESET session_replication_role;"#,
        )
        .await
        .unwrap();

    let output = run_to_end(Some(&db.url()), &["reconcile"]).await;

    let stdout = stdout_of(&output);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(4), "stderr:\n{stderr}");
    assert!(stdout.contains("reconcile PARTIAL"), "{stdout}");
    assert!(stdout.contains("failed 1"), "{stdout}");
    let last_line = stderr.lines().last().unwrap_or_default();
    assert!(last_line.starts_with("error: "), "{stderr}");
    assert!(last_line.contains("PARTIAL"), "{last_line}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn output_commands_survive_closed_stdout() {
    // Guards against `print!` panicking (exit 101) when the reader closed the pipe.
    let db = TestDb::migrated().await;
    let commands: [&[&str]; 4] = [
        &["status"],
        &["status", "--json"],
        &["config"],
        &["uninstall", "--dry-run"],
    ];

    for args in commands {
        let mut child = freight_kpi(Some(&db.url()), args)
            .spawn()
            .expect("start freight-kpi");
        // Closing the read end before the child writes makes its write fail with EPIPE.
        drop(child.stdout.take());
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("freight-kpi {args:?} did not exit within 60 s"))
            .expect("wait for freight-kpi");

        let stderr = stderr_of(&output);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn failed_migrate_shows_server_message() {
    // Guards against a failed migration reported only as "db error".
    let db = TestDb::empty().await;
    let client = db.client().await;
    client
        .batch_execute(
            r#"CREATE TABLE "FreightKpiDaily" (
                   id bigserial PRIMARY KEY,
                   "ventureId" integer NOT NULL,
                   date date NOT NULL
               );
               INSERT INTO "FreightKpiDaily" ("ventureId", date)
               VALUES (7, '2024-03-01'), (7, '2024-03-01');"#,
        )
        .await
        .unwrap();

    let output = run_without_logs(&db.url(), &["migrate"]).await;

    let line = assert_one_error_line("migrate over duplicate buckets", &output, 1);
    assert!(line.contains("V1__create_application_tables"), "{line}");
    assert!(line.contains("could not create unique index"), "{line}");
    assert!(line.contains("is duplicated"), "{line}");
    assert!(line.contains("(7, 2024-03-01)"), "{line}");
}

#[tokio::test]
async fn reconcile_after_uninstall_asks_for_migrate() {
    // Guards against a raw "relation does not exist" error from the job lock.
    let db = TestDb::migrated().await;
    let uninstalled = run_to_end(Some(&db.url()), &["uninstall"]).await;
    assert!(
        uninstalled.status.success(),
        "uninstall: {}",
        stderr_of(&uninstalled)
    );

    for lock_mode in ["advisory", "table"] {
        let output = run_without_logs(&db.url(), &["reconcile", "--lock-mode", lock_mode]).await;

        let label = format!("reconcile after uninstall ({lock_mode})");
        let line = assert_one_error_line(&label, &output, 1);
        assert!(
            line.contains("run `freight-kpi migrate` first"),
            "{label}: {line}"
        );
    }
}

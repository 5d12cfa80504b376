//! Schema migrations, embedded from `sql/` at build time.

use tokio_postgres::Client;

use crate::error::{Error, Result};

refinery::embed_migrations!("sql");

/// Table of applied migrations, kept in the service's own schema so the application's
/// schema gains no table of ours.
const HISTORY_TABLE: &str = "freight_kpi.schema_history";

/// Advisory lock key (two-key form) held while migrating, so that instances started
/// together apply each migration once. The first key is the namespace of every
/// advisory lock this service takes.
pub(crate) const MIGRATE_LOCK: (i32, i32) = (crate::ADVISORY_LOCK_NAMESPACE, 0);

/// Outcome of a migration run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Names of the migrations applied by this run, in order; empty when the schema
    /// was already current.
    pub applied: Vec<String>,
}

/// Applies every embedded migration that the database lacks.
///
/// Safe to run on every start and from several processes at once: a session advisory
/// lock serializes concurrent runs, and each migration creates objects only when
/// absent. The client should be a dedicated connection, since the lock is taken on
/// its session.
///
/// # Errors
///
/// [`Error::Migrate`] with the failing migration's error.
pub async fn migrate(client: &mut Client) -> Result<MigrationReport> {
    client
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&MIGRATE_LOCK.0, &MIGRATE_LOCK.1],
        )
        .await
        .map_err(Error::database("take the migration lock"))?;

    let outcome = apply(client).await;

    let unlocked = client
        .execute(
            "SELECT pg_advisory_unlock($1, $2)",
            &[&MIGRATE_LOCK.0, &MIGRATE_LOCK.1],
        )
        .await
        .map_err(Error::database("release the migration lock"));
    let report = outcome?;
    unlocked?;
    Ok(report)
}

async fn apply(client: &mut Client) -> Result<MigrationReport> {
    // refinery creates its history table before the first migration runs, so the
    // schema that contains it must exist already.
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS freight_kpi")
        .await
        .map_err(Error::database("create schema freight_kpi"))?;

    let report = migrations::runner()
        .set_migration_table_name(HISTORY_TABLE)
        .run_async(client)
        .await
        .map_err(|error| Error::Migrate(describe_migration_error(&error)))?;

    let applied = report
        .applied_migrations()
        .iter()
        .map(|migration| migration.to_string())
        .collect();
    Ok(MigrationReport { applied })
}

/// Describes a failed migration with the server's own words. refinery's message wraps
/// the driver's error, whose `Display` is only "db error", so the server's message,
/// detail and hint (such as the key of a duplicate row) come from the `DbError` found
/// in the source chain.
fn describe_migration_error(error: &refinery::Error) -> String {
    let mut text = match error.kind() {
        refinery::error::Kind::Connection(context, _) => context.clone(),
        _ => error.to_string(),
    };

    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let db_error = cause
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::as_db_error);
        match db_error {
            Some(db_error) => {
                text.push_str(": ");
                text.push_str(db_error.message());
                if let Some(detail) = db_error.detail() {
                    text.push_str(&format!(" (detail: {detail})"));
                }
                if let Some(hint) = db_error.hint() {
                    text.push_str(&format!(" (hint: {hint})"));
                }
                // The driver's own source is this same server error again.
                break;
            }
            None => text.push_str(&format!(": {cause}")),
        }
        source = cause.source();
    }
    text
}

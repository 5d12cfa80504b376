//! `freight-kpi uninstall`: removal of what `migrate` installed of the service's own
//! objects, leaving the application's tables, types and rows as they are.
//!
//! The service's objects are the schema `freight_kpi` with everything in it: the
//! change queue, the listener, job and failed-bucket tables, the trigger functions and
//! the migration history. Outside it, they are the triggers on application tables that
//! call those functions, which are the capture triggers on `"Load"`. `migrate` may also have created
//! `"Load"`, `"FreightKpiDaily"`, `"JobRunLog"` and their enum types when they were
//! absent, and added `KPI_AGGREGATION` to `"JobName"`; those belong to the
//! application's data model and stay. Enum values cannot be dropped in PostgreSQL
//! anyway.

use tokio_postgres::Client;

use super::migrate::MIGRATE_LOCK;
use crate::error::{Error, Result};

/// Name of the service's schema.
const SCHEMA: &str = "freight_kpi";

/// A listener whose heartbeat is this recent belongs to a running service.
const LIVE_LISTENER_SECONDS: f64 = 120.0;

/// Triggers outside the service's schema that call one of its functions: the
/// capture triggers on `"Load"`, and any later migration's triggers of the same kind.
const SELECT_CAPTURE_TRIGGERS: &str = r#"
    SELECT t.tgname::text AS trigger_name,
           c.oid::regclass::text AS table_name,
           format('DROP TRIGGER %I ON %s', t.tgname, c.oid::regclass) AS drop_statement
    FROM pg_trigger t
    JOIN pg_class c ON c.oid = t.tgrelid
    JOIN pg_proc p ON p.oid = t.tgfoid
    WHERE p.pronamespace = 'freight_kpi'::regnamespace
      AND c.relnamespace <> 'freight_kpi'::regnamespace
      AND NOT t.tgisinternal
    ORDER BY 2, 1
"#;

/// Objects outside the schema that depend on objects inside it, such as an
/// application view over the change queue. `DROP SCHEMA … CASCADE` would drop them
/// silently, so uninstall stops and names them instead. Sub-objects of a relation
/// (its rules, triggers, constraints, defaults and policies) count as inside when
/// their relation is.
const SELECT_OUTSIDE_DEPENDENTS: &str = r#"
    WITH inside AS (
        SELECT 'pg_class'::regclass AS classid, oid AS objid
        FROM pg_class WHERE relnamespace = 'freight_kpi'::regnamespace
        UNION ALL
        SELECT 'pg_proc'::regclass, oid FROM pg_proc WHERE pronamespace = 'freight_kpi'::regnamespace
        UNION ALL
        SELECT 'pg_type'::regclass, oid FROM pg_type WHERE typnamespace = 'freight_kpi'::regnamespace
        UNION ALL
        SELECT 'pg_namespace'::regclass, 'freight_kpi'::regnamespace::oid
    ),
    dependency AS (
        SELECT d.*,
               CASE d.classid
                   WHEN 'pg_class'::regclass THEN d.objid
                   WHEN 'pg_trigger'::regclass THEN (SELECT tgrelid FROM pg_trigger WHERE oid = d.objid)
                   WHEN 'pg_rewrite'::regclass THEN (SELECT ev_class FROM pg_rewrite WHERE oid = d.objid)
                   WHEN 'pg_constraint'::regclass THEN (SELECT conrelid FROM pg_constraint WHERE oid = d.objid)
                   WHEN 'pg_attrdef'::regclass THEN (SELECT adrelid FROM pg_attrdef WHERE oid = d.objid)
                   WHEN 'pg_policy'::regclass THEN (SELECT polrelid FROM pg_policy WHERE oid = d.objid)
               END AS relation_id
        FROM pg_depend d
        WHERE d.deptype = 'n'
          AND (d.refclassid, d.refobjid) IN (SELECT classid, objid FROM inside)
    )
    SELECT DISTINCT
           pg_describe_object(classid, objid, objsubid) AS dependent,
           pg_describe_object(refclassid, refobjid, refobjsubid) AS referenced
    FROM dependency
    WHERE (classid, objid) NOT IN (SELECT classid, objid FROM inside)
      AND NOT EXISTS (SELECT 1 FROM pg_class c
                      WHERE c.oid = dependency.relation_id
                        AND c.relnamespace = 'freight_kpi'::regnamespace)
    ORDER BY 1
"#;

/// The objects of the schema, described as PostgreSQL describes them.
const SELECT_SCHEMA_OBJECTS: &str = r#"
    SELECT pg_describe_object('pg_class'::regclass, oid, 0) AS object
    FROM pg_class
    WHERE relnamespace = 'freight_kpi'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
    UNION ALL
    SELECT pg_describe_object('pg_proc'::regclass, oid, 0)
    FROM pg_proc WHERE pronamespace = 'freight_kpi'::regnamespace
    UNION ALL
    SELECT pg_describe_object('pg_type'::regclass, t.oid, 0)
    FROM pg_type t
    WHERE t.typnamespace = 'freight_kpi'::regnamespace
      AND t.typtype IN ('e', 'd', 'c')
      AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
    ORDER BY 1
"#;

/// Options of an uninstall.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UninstallOptions {
    /// Report what would be dropped, drop nothing.
    pub dry_run: bool,
    /// Uninstall even while a service's listener is live. That service then fails on
    /// its next batch and keeps retrying.
    pub force: bool,
}

/// Objects an uninstall dropped, or would drop on a dry run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UninstallReport {
    /// Whether the schema `freight_kpi` existed; when it did not, nothing was dropped.
    pub schema_existed: bool,
    /// Triggers dropped from application tables, as `trigger on table`.
    pub dropped_triggers: Vec<String>,
    /// Objects dropped with the schema: tables, sequences, functions and types.
    pub dropped_objects: Vec<String>,
    /// Changes that waited in the queue and were discarded with it.
    pub discarded_changes: i64,
    /// Whether everything was rolled back because of `dry_run`.
    pub dry_run: bool,
}

/// Drops the capture triggers and the schema `freight_kpi`, in one transaction.
///
/// It holds the migration lock while it runs, so a concurrent `migrate` waits for
/// it and then installs everything again.
///
/// # Errors
///
/// [`Error::Uninstall`] when a service is still listening (unless `force`) or when
/// objects outside the schema depend on it, naming them; [`Error::Database`] when
/// a statement fails. Nothing is dropped in either case.
pub async fn uninstall(client: &mut Client, options: UninstallOptions) -> Result<UninstallReport> {
    let transaction = client
        .transaction()
        .await
        .map_err(Error::database("begin the uninstall"))?;
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&MIGRATE_LOCK.0, &MIGRATE_LOCK.1],
        )
        .await
        .map_err(Error::database("take the migration lock"))?;

    let mut report = UninstallReport {
        dry_run: options.dry_run,
        ..UninstallReport::default()
    };
    report.schema_existed = transaction
        .query_one("SELECT to_regnamespace($1) IS NOT NULL", &[&SCHEMA])
        .await
        .map_err(Error::database("look up schema freight_kpi"))?
        .get(0);
    if !report.schema_existed {
        return Ok(report);
    }

    // A running service would fail on every batch once its tables are gone.
    if !options.force {
        let live = count_if_table_exists(
            &transaction,
            "freight_kpi.listener",
            "SELECT count(*) FROM freight_kpi.listener WHERE heartbeat_at > now() - make_interval(secs => $1)",
            &[&LIVE_LISTENER_SECONDS],
        )
        .await?;
        if live > 0 {
            return Err(Error::Uninstall(format!(
                "{live} freight-kpi listeners sent a heartbeat in the last {LIVE_LISTENER_SECONDS} seconds; stop every `freight-kpi run` first, or pass --force"
            )));
        }
    }
    report.discarded_changes = count_if_table_exists(
        &transaction,
        "freight_kpi.change_queue",
        "SELECT count(*) FROM freight_kpi.change_queue",
        &[],
    )
    .await?;

    // The capture triggers go first: they are the service's objects outside its
    // schema, and without them the dependency check below would list them.
    let triggers = transaction
        .query(SELECT_CAPTURE_TRIGGERS, &[])
        .await
        .map_err(Error::database("list the capture triggers"))?;
    for trigger in triggers {
        let drop_statement: String = trigger.get("drop_statement");
        transaction
            .batch_execute(&drop_statement)
            .await
            .map_err(Error::database("drop a capture trigger"))?;
        let name: String = trigger.get("trigger_name");
        let table: String = trigger.get("table_name");
        report.dropped_triggers.push(format!("{name} on {table}"));
    }

    let dependents = transaction
        .query(SELECT_OUTSIDE_DEPENDENTS, &[])
        .await
        .map_err(Error::database(
            "check objects that depend on schema freight_kpi",
        ))?;
    if !dependents.is_empty() {
        let list: Vec<String> = dependents
            .iter()
            .map(|row| {
                let dependent: String = row.get("dependent");
                let referenced: String = row.get("referenced");
                format!("{dependent} (uses {referenced})")
            })
            .collect();
        return Err(Error::Uninstall(format!(
            "objects outside schema freight_kpi depend on it: {}; drop them or remove the dependency first, nothing was dropped",
            list.join(", ")
        )));
    }

    report.dropped_objects = transaction
        .query(SELECT_SCHEMA_OBJECTS, &[])
        .await
        .map_err(Error::database("list the objects of schema freight_kpi"))?
        .iter()
        .map(|row| row.get("object"))
        .collect();
    // CASCADE reaches only objects inside the schema now: the check above found no
    // outside dependent.
    transaction
        .batch_execute("DROP SCHEMA freight_kpi CASCADE")
        .await
        .map_err(Error::database("drop schema freight_kpi"))?;

    if options.dry_run {
        transaction
            .rollback()
            .await
            .map_err(Error::database("roll back the dry run"))?;
    } else {
        transaction
            .commit()
            .await
            .map_err(Error::database("commit the uninstall"))?;
    }
    Ok(report)
}

async fn count_if_table_exists(
    transaction: &tokio_postgres::Transaction<'_>,
    table: &str,
    query: &str,
    parameters: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<i64> {
    let exists: bool = transaction
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(Error::database("look up a table of schema freight_kpi"))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(transaction
        .query_one(query, parameters)
        .await
        .map_err(Error::database("count rows of schema freight_kpi"))?
        .get(0))
}

impl std::fmt::Display for UninstallReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.schema_existed {
            return writeln!(f, "nothing to uninstall: schema freight_kpi does not exist");
        }
        let verb = if self.dry_run {
            "would drop"
        } else {
            "dropped"
        };
        for trigger in &self.dropped_triggers {
            writeln!(f, "{verb} trigger {trigger}")?;
        }
        writeln!(f, "{verb} schema freight_kpi with:")?;
        for object in &self.dropped_objects {
            writeln!(f, "  {object}")?;
        }
        if self.discarded_changes > 0 {
            writeln!(
                f,
                "{} {} pending changes; after the next migrate, run `freight-kpi reconcile` to repair the buckets they touched",
                if self.dry_run { "would discard" } else { "discarded" },
                self.discarded_changes
            )?;
        }
        writeln!(
            f,
            "kept the application's tables and types (\"Load\", \"FreightKpiDaily\", \"JobRunLog\", \"LoadStatus\", \"JobName\") and their rows"
        )?;
        if self.dry_run {
            writeln!(f, "dry run: nothing was dropped")?;
        }
        Ok(())
    }
}

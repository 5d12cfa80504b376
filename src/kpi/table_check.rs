//! A start-up check that `"FreightKpiDaily"` accepts the rows this service inserts.
//!
//! The service may attach to a table that the application created, where a column
//! such as a text `id` filled by the application's ORM has no database default. Every
//! insert of a new bucket would then fail, so the service reports it at start instead.

use tokio_postgres::GenericClient;

use crate::error::{Error, Result};

/// The columns the service writes when it inserts a bucket.
const WRITTEN_COLUMNS: [&str; 11] = [
    "ventureId",
    "date",
    "loadsInbound",
    "loadsQuoted",
    "loadsCovered",
    "loadsLost",
    "totalRevenue",
    "totalCost",
    "totalProfit",
    "avgMarginPct",
    "updatedAt",
];

/// Checks that every NOT NULL column of `"FreightKpiDaily"` that the service does not
/// write has a default.
///
/// # Errors
///
/// [`Error::IncompatibleSchema`] naming the columns and the fix; [`Error::Database`]
/// when the catalog cannot be read.
pub async fn check_kpi_table(client: &impl GenericClient) -> Result<()> {
    let written: Vec<&str> = WRITTEN_COLUMNS.to_vec();
    let rows = client
        .query(
            r#"SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a
               WHERE a.attrelid = '"FreightKpiDaily"'::regclass
                 AND a.attnum > 0
                 AND NOT a.attisdropped
                 AND a.attnotnull
                 AND NOT a.atthasdef
                 AND a.attidentity = ''
                 AND a.attgenerated = ''
                 AND a.attname <> ALL ($1::text[])
               ORDER BY a.attnum"#,
            &[&written],
        )
        .await
        .map_err(Error::database("check the columns of \"FreightKpiDaily\""))?;

    let Some(first) = rows.first() else {
        return Ok(());
    };
    let columns: Vec<String> = rows
        .iter()
        .map(|row| format!("\"{}\"", row.get::<_, String>(0)))
        .collect();
    let (name, type_name): (String, String) = (first.get(0), first.get(1));
    let example_default = if type_name.starts_with("text") || type_name.starts_with("character") {
        "gen_random_uuid()::text"
    } else {
        "a sequence's nextval"
    };
    Err(Error::IncompatibleSchema(format!(
        "\"FreightKpiDaily\" column {} is NOT NULL without a default, so new buckets cannot be inserted; \
         give it a default, for example ALTER TABLE \"FreightKpiDaily\" ALTER COLUMN \"{name}\" SET DEFAULT {example_default}",
        columns.join(", ")
    )))
}

//! The bench's dataset: the guard against foreign data, and the generation of loads
//! that look like a freight brokerage's, streamed to the server with `COPY`.
//!
//! The bench owns the venture ids from [`FIRST_VENTURE_ID`] up to, but not including,
//! [`END_VENTURE_ID`], and records each dataset it generates in
//! `freight_kpi.bench_dataset`. A database whose loads lie outside that range, or that
//! has loads but no such record, contains someone else's data and is rejected.

use std::ops::Range;
use std::time::Instant;

use bytes::Bytes;
use chrono::{Datelike, Duration as ChronoDuration, NaiveDate, Utc, Weekday};
use futures::SinkExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use super::error::{database, BenchError};

/// First venture id the bench generates.
pub const FIRST_VENTURE_ID: i32 = 1_000_000_000;
/// End (exclusive) of the venture ids the bench owns.
pub const END_VENTURE_ID: i32 = 2_000_000_000;
/// First venture id of the freshness probes, past any generated venture.
pub const FIRST_PROBE_VENTURE_ID: i32 = 1_900_000_000;

/// Seed of the dataset, so that two runs with the same options generate the same loads.
const DATASET_SEED: u64 = 0x4B50_4942_454E_4348;

/// Zipf exponent of the venture sizes: with 200 ventures the largest has about 21%
/// of the loads, and the smallest half of them have about 9% together.
const VENTURE_SKEW: f64 = 1.1;

/// Daily volume grows by this fraction from the first to the last day of history.
const VOLUME_GROWTH: f64 = 0.6;

/// Days counted as recent: most status changes and corrections touch loads this young.
pub const RECENT_DAYS: u32 = 30;

/// Size of one `COPY` data message sent to the server.
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// Tables of the bench itself, created if absent: the record of generated datasets and
/// the scratch table of the bare aggregation.
const CREATE_BENCH_TABLES: &str = r#"
    CREATE TABLE IF NOT EXISTS freight_kpi.bench_dataset (
        id            bigserial PRIMARY KEY,
        generated_at  timestamptz NOT NULL DEFAULT now(),
        loads         bigint NOT NULL,
        ventures      integer NOT NULL,
        days          integer NOT NULL,
        first_venture integer NOT NULL,
        end_venture   integer NOT NULL
    );
    CREATE TABLE IF NOT EXISTS freight_kpi.bench_scratch_kpi (
        "ventureId"    integer NOT NULL,
        date           date NOT NULL,
        "loadsInbound" integer NOT NULL,
        "loadsQuoted"  integer NOT NULL,
        "loadsCovered" integer NOT NULL,
        "loadsLost"    integer NOT NULL,
        "totalRevenue" numeric(14, 2) NOT NULL,
        "totalCost"    numeric(14, 2) NOT NULL,
        "totalProfit"  numeric(14, 2) NOT NULL,
        "avgMarginPct" numeric(7, 2),
        "updatedAt"    timestamptz NOT NULL,
        UNIQUE ("ventureId", date)
    );
"#;

/// Whether the database contains data that is not the bench's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    /// "Load" has rows outside the bench's venture range, or rows but no bench record.
    pub foreign_loads: bool,
    /// "FreightKpiDaily" has rows outside the bench's venture range.
    pub foreign_kpis: bool,
}

/// Creates the bench's tables and checks that the database is a scratch database.
///
/// # Errors
///
/// [`BenchError::ForeignData`] when it contains foreign loads and `force` is false.
pub async fn check_ownership(client: &Client, force: bool) -> Result<Ownership, BenchError> {
    client
        .batch_execute(CREATE_BENCH_TABLES)
        .await
        .map_err(database("create the bench tables"))?;

    // min and max read the ends of the indexes, so the check is instant on any size.
    let row = client
        .query_one(
            r#"SELECT (SELECT min("ventureId") FROM "Load"),
                      (SELECT max("ventureId") FROM "Load"),
                      (SELECT min("ventureId") FROM "FreightKpiDaily"),
                      (SELECT max("ventureId") FROM "FreightKpiDaily"),
                      (SELECT count(*) FROM freight_kpi.bench_dataset)"#,
            &[],
        )
        .await
        .map_err(database("check for loads the bench did not generate"))?;
    let outside = |min: Option<i32>, max: Option<i32>| {
        min.is_some_and(|min| min < FIRST_VENTURE_ID)
            || max.is_some_and(|max| max >= END_VENTURE_ID)
    };
    let (load_min, load_max): (Option<i32>, Option<i32>) = (row.get(0), row.get(1));
    let (kpi_min, kpi_max): (Option<i32>, Option<i32>) = (row.get(2), row.get(3));
    let records: i64 = row.get(4);

    let reason = if outside(load_min, load_max) {
        Some(format!(
            "\"ventureId\" spans {} to {}, but the bench generates only {FIRST_VENTURE_ID} to {}",
            load_min.unwrap_or_default(),
            load_max.unwrap_or_default(),
            END_VENTURE_ID - 1
        ))
    } else if load_min.is_some() && records == 0 {
        Some("\"Load\" has rows but freight_kpi.bench_dataset records no bench dataset".to_owned())
    } else {
        None
    };
    if let Some(reason) = &reason {
        if !force {
            return Err(BenchError::ForeignData {
                database: database_name(client).await?,
                reason: reason.clone(),
            });
        }
        tracing::warn!(reason = %reason, "running beside foreign loads because of --force");
    }
    Ok(Ownership {
        foreign_loads: reason.is_some(),
        foreign_kpis: outside(kpi_min, kpi_max),
    })
}

async fn database_name(client: &Client) -> Result<String, BenchError> {
    Ok(client
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(database("read the database name"))?
        .get(0))
}

/// Enables the capture triggers on "Load", which an interrupted earlier run may have
/// left disabled.
///
/// # Errors
///
/// [`BenchError::Service`] when the statement fails.
pub async fn set_triggers(client: &Client, enabled: bool) -> Result<(), BenchError> {
    let statement = if enabled {
        r#"ALTER TABLE "Load" ENABLE TRIGGER USER"#
    } else {
        r#"ALTER TABLE "Load" DISABLE TRIGGER USER"#
    };
    client
        .batch_execute(statement)
        .await
        .map_err(database("enable or disable the triggers on \"Load\""))
}

/// Removes the bench's earlier data: its loads, their KPI rows, the change queue and
/// the failed buckets. Foreign loads and KPI rows are left as they are.
///
/// # Errors
///
/// [`BenchError::Service`] when a statement fails.
pub async fn clear(client: &Client, ownership: Ownership) -> Result<(), BenchError> {
    set_triggers(client, false).await?;
    let loads = if ownership.foreign_loads {
        format!(
            r#"DELETE FROM "Load" WHERE "ventureId" >= {FIRST_VENTURE_ID} AND "ventureId" < {END_VENTURE_ID}"#
        )
    } else {
        r#"TRUNCATE "Load" RESTART IDENTITY"#.to_owned()
    };
    let kpis = if ownership.foreign_kpis {
        format!(
            r#"DELETE FROM "FreightKpiDaily" WHERE "ventureId" >= {FIRST_VENTURE_ID} AND "ventureId" < {END_VENTURE_ID}"#
        )
    } else {
        r#"TRUNCATE "FreightKpiDaily""#.to_owned()
    };
    let cleared = client
        .batch_execute(&format!(
            "{loads}; {kpis}; TRUNCATE freight_kpi.change_queue, freight_kpi.failed_bucket, \
             freight_kpi.bench_dataset, freight_kpi.bench_scratch_kpi"
        ))
        .await
        .map_err(database("remove the data of an earlier bench run"));
    set_triggers(client, true).await?;
    cleared
}

/// The shape of the dataset: how loads spread over ventures and days. The writers of
/// later phases draw from the same distributions.
#[derive(Debug, Clone)]
pub struct DatasetShape {
    /// Oldest day of history; the last one is yesterday (UTC).
    pub first_day: NaiveDate,
    /// Loads generated on each day, oldest first.
    pub day_loads: Vec<u64>,
    venture_cumulative: Vec<f64>,
    day_cumulative: Vec<f64>,
}

impl DatasetShape {
    /// Plans `loads` loads over `ventures` ventures and `days` days ending yesterday.
    pub fn plan(loads: u64, ventures: u32, days: u32) -> Self {
        let today = Utc::now().date_naive();
        let first_day = today - ChronoDuration::days(i64::from(days));

        let venture_weights: Vec<f64> = (0..ventures)
            .map(|rank| 1.0 / f64::from(rank + 1).powf(VENTURE_SKEW))
            .collect();
        let day_weights: Vec<f64> = (0..days)
            .map(|index| {
                let day = first_day + ChronoDuration::days(i64::from(index));
                let weekday = match day.weekday() {
                    Weekday::Sat => 0.35,
                    Weekday::Sun => 0.25,
                    _ => 1.0,
                };
                weekday * (1.0 + VOLUME_GROWTH * f64::from(index) / f64::from(days))
            })
            .collect();

        let day_cumulative = cumulative(&day_weights);
        let mut day_loads = Vec::with_capacity(day_cumulative.len());
        let mut assigned = 0_u64;
        for share in &day_cumulative {
            let until = (loads as f64 * share).round() as u64;
            day_loads.push(until - assigned);
            assigned = until;
        }
        Self {
            first_day,
            day_loads,
            venture_cumulative: cumulative(&venture_weights),
            day_cumulative,
        }
    }

    /// Share of all loads that the largest venture holds.
    pub fn largest_venture_share(&self) -> f64 {
        self.venture_cumulative.first().copied().unwrap_or(1.0)
    }

    /// Number of days of history.
    pub fn days(&self) -> usize {
        self.day_loads.len()
    }

    /// Draws a venture id, large ventures more often.
    pub fn pick_venture(&self, rng: &mut impl Rng) -> i32 {
        let rank = pick(&self.venture_cumulative, rng.random());
        FIRST_VENTURE_ID + rank as i32
    }

    /// Draws a day with the probability of a load picked at random from `days`.
    pub fn pick_day(&self, rng: &mut impl Rng, days: Range<usize>) -> NaiveDate {
        let low = if days.start == 0 {
            0.0
        } else {
            self.day_cumulative[days.start - 1]
        };
        let high = self.day_cumulative[days.end - 1];
        let index = pick(
            &self.day_cumulative,
            low + rng.random::<f64>() * (high - low),
        );
        self.first_day + ChronoDuration::days(index.clamp(days.start, days.end - 1) as i64)
    }

    /// Index of the first recent day.
    pub fn first_recent_day(&self) -> usize {
        self.days().saturating_sub(RECENT_DAYS as usize)
    }

    /// Loads generated before day `index`.
    pub fn loads_before(&self, index: usize) -> u64 {
        self.day_loads[..index].iter().sum()
    }

    /// Splits the days into consecutive chunks whose ends hold about 1/8, 1/4, 1/2 and
    /// all of the loads, for the full-pass time against table size.
    pub fn size_steps(&self) -> Vec<Range<usize>> {
        let total: u64 = self.day_loads.iter().sum();
        let mut steps = Vec::new();
        let mut start = 0;
        let mut loaded = 0_u64;
        for fraction in [0.125, 0.25, 0.5] {
            let mut end = start;
            while end < self.days() && (loaded as f64) < total as f64 * fraction {
                loaded += self.day_loads[end];
                end += 1;
            }
            if end > start && end < self.days() {
                steps.push(start..end);
                start = end;
            }
        }
        steps.push(start..self.days());
        steps
    }
}

fn cumulative(weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    let mut sum = 0.0;
    let mut cumulative: Vec<f64> = weights
        .iter()
        .map(|weight| {
            sum += weight;
            sum / total
        })
        .collect();
    if let Some(last) = cumulative.last_mut() {
        *last = 1.0;
    }
    cumulative
}

fn pick(cumulative: &[f64], draw: f64) -> usize {
    cumulative
        .partition_point(|&share| share < draw)
        .min(cumulative.len() - 1)
}

/// Records the dataset in `freight_kpi.bench_dataset`, which marks the loads as the
/// bench's own for the next run's ownership check.
///
/// # Errors
///
/// [`BenchError::Service`] when the insert fails.
pub async fn record(
    client: &Client,
    loads: u64,
    ventures: u32,
    days: u32,
) -> Result<(), BenchError> {
    client
        .execute(
            "INSERT INTO freight_kpi.bench_dataset (loads, ventures, days, first_venture, end_venture) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &(loads as i64),
                &(ventures as i32),
                &(days as i32),
                &FIRST_VENTURE_ID,
                &END_VENTURE_ID,
            ],
        )
        .await
        .map_err(database("record the bench dataset"))?;
    Ok(())
}

/// Durations of generating one chunk of days.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenerationTiming {
    pub loads: u64,
    /// Time of the `COPY` statements, index maintenance included.
    pub copy_seconds: f64,
    /// Time of `VACUUM (ANALYZE)` afterwards, which sets hint bits and statistics as a
    /// settled table has them.
    pub vacuum_seconds: f64,
}

/// Generates the loads of `days` with `COPY`, triggers disabled, as a bulk load or a
/// restore would, then vacuums and analyzes "Load".
///
/// # Errors
///
/// [`BenchError::Service`] when a statement fails; the triggers are enabled again
/// either way.
pub async fn generate(
    client: &Client,
    shape: &DatasetShape,
    days: Range<usize>,
    bar: &indicatif::ProgressBar,
) -> Result<GenerationTiming, BenchError> {
    set_triggers(client, false).await?;
    let started = Instant::now();
    let copied = copy_days(client, shape, days.clone(), bar).await;
    let copy_seconds = started.elapsed().as_secs_f64();
    set_triggers(client, true).await?;
    let loads = copied?;

    let started = Instant::now();
    client
        .batch_execute(r#"VACUUM (ANALYZE) "Load""#)
        .await
        .map_err(database("vacuum \"Load\""))?;
    Ok(GenerationTiming {
        loads,
        copy_seconds,
        vacuum_seconds: started.elapsed().as_secs_f64(),
    })
}

async fn copy_days(
    client: &Client,
    shape: &DatasetShape,
    days: Range<usize>,
    bar: &indicatif::ProgressBar,
) -> Result<u64, BenchError> {
    let sink = client
        .copy_in::<_, Bytes>(
            r#"COPY "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt", "updatedAt") FROM STDIN"#,
        )
        .await
        .map_err(database("start COPY into \"Load\""))?;
    futures::pin_mut!(sink);

    // Rows are formatted on a thread of their own while the server ingests the last
    // chunk; the bounded channel keeps at most a few chunks in memory.
    let (sender, mut chunks) = tokio::sync::mpsc::channel::<(Vec<u8>, u64)>(4);
    let shape = shape.clone();
    let producer = std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(DATASET_SEED ^ days.start as u64);
        let now = Utc::now();
        let mut buffer = Vec::with_capacity(COPY_CHUNK_BYTES + 256);
        let mut rows = 0_u64;
        for index in days {
            let day = shape.first_day + ChronoDuration::days(index as i64);
            let age_days = (now.date_naive() - day).num_days();
            for _ in 0..shape.day_loads[index] {
                let venture = shape.pick_venture(&mut rng);
                write_load(
                    &mut buffer,
                    &mut rng,
                    venture,
                    day,
                    age_days,
                    now.timestamp(),
                );
                rows += 1;
                if buffer.len() >= COPY_CHUNK_BYTES {
                    let full =
                        std::mem::replace(&mut buffer, Vec::with_capacity(COPY_CHUNK_BYTES + 256));
                    if sender.blocking_send((full, rows)).is_err() {
                        return;
                    }
                    rows = 0;
                }
            }
        }
        if !buffer.is_empty() {
            let _ = sender.blocking_send((buffer, rows));
        }
    });

    let mut total = 0;
    while let Some((chunk, rows)) = chunks.recv().await {
        sink.send(Bytes::from(chunk))
            .await
            .map_err(database("send COPY data"))?;
        total += rows;
        bar.inc(rows);
    }
    let _ = producer.join();
    sink.as_mut()
        .finish()
        .await
        .map_err(database("finish COPY into \"Load\""))?;
    Ok(total)
}

/// Statuses with their shares, by the age of the load: young loads are still moving
/// through the lifecycle, old ones have ended as delivered, lost or cancelled.
const YOUNG_MIX: &[(&str, f64)] = &[
    ("OPEN", 0.30),
    ("WORKING", 0.20),
    ("QUOTED", 0.20),
    ("COVERED", 0.15),
    ("IN_TRANSIT", 0.07),
    ("DELIVERED", 0.03),
    ("LOST", 0.02),
    ("CANCELLED", 0.03),
];
const WEEK_MIX: &[(&str, f64)] = &[
    ("OPEN", 0.04),
    ("WORKING", 0.04),
    ("QUOTED", 0.08),
    ("COVERED", 0.12),
    ("IN_TRANSIT", 0.20),
    ("DELIVERED", 0.42),
    ("LOST", 0.06),
    ("CANCELLED", 0.04),
];
const SETTLED_MIX: &[(&str, f64)] = &[
    ("OPEN", 0.01),
    ("WORKING", 0.01),
    ("QUOTED", 0.02),
    ("COVERED", 0.01),
    ("IN_TRANSIT", 0.01),
    ("DELIVERED", 0.76),
    ("LOST", 0.12),
    ("CANCELLED", 0.06),
];

/// Median billed amount of a load in dollars, and the spread of its logarithm.
const MEDIAN_BILL: f64 = 1_800.0;
const BILL_LOG_SPREAD: f64 = 0.55;

/// Appends one load as a line of `COPY` text.
fn write_load(
    buffer: &mut Vec<u8>,
    rng: &mut StdRng,
    venture: i32,
    day: NaiveDate,
    age_days: i64,
    now: i64,
) {
    use std::io::Write;

    let mix = match age_days {
        ..=2 => YOUNG_MIX,
        3..=10 => WEEK_MIX,
        _ => SETTLED_MIX,
    };
    let mut draw: f64 = rng.random();
    let status = mix
        .iter()
        .find(|(_, share)| {
            draw -= share;
            draw < 0.0
        })
        .map_or("DELIVERED", |(status, _)| status);

    let day_start = day
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc()
        .timestamp();
    let created = (day_start + rng.random_range(0..86_400)).min(now);

    let bill_cents = {
        // Box-Muller: a normal draw for a log-normal amount.
        let normal = (-2.0 * (1.0 - rng.random::<f64>()).ln()).sqrt()
            * (std::f64::consts::TAU * rng.random::<f64>()).cos();
        let dollars = (MEDIAN_BILL.ln() + BILL_LOG_SPREAD * normal)
            .exp()
            .clamp(150.0, 40_000.0);
        (dollars * 100.0).round() as i64
    };
    let cost_cents = |rng: &mut StdRng| {
        // Most loads earn a margin of 6 to 22 percent; a few lose money.
        let ratio = if rng.random::<f64>() < 0.03 {
            rng.random_range(1.0..1.15)
        } else {
            rng.random_range(0.78..0.94)
        };
        (bill_cents as f64 * ratio).round() as i64
    };
    let (bill, cost) = match status {
        "OPEN" | "WORKING" => ((rng.random::<f64>() < 0.5).then_some(bill_cents), None),
        "QUOTED" => (
            Some(bill_cents),
            (rng.random::<f64>() < 0.7).then(|| cost_cents(rng)),
        ),
        "COVERED" | "IN_TRANSIT" | "DELIVERED" => (Some(bill_cents), Some(cost_cents(rng))),
        "LOST" => (Some(bill_cents), None),
        _ => ((rng.random::<f64>() < 0.3).then_some(bill_cents), None),
    };

    // Delivered loads are billed 1 to 10 days after creation; a few bills are missing.
    let billed = (status == "DELIVERED")
        .then(|| created + rng.random_range(86_400..864_000))
        .filter(|billed| *billed < now && rng.random::<f64>() < 0.97);
    let updated = billed
        .unwrap_or(created + rng.random_range(0..172_800))
        .min(now);

    let _ = write!(buffer, "{venture}\t{status}\t");
    write_cents(buffer, bill);
    buffer.push(b'\t');
    write_cents(buffer, cost);
    buffer.push(b'\t');
    match billed {
        Some(seconds) => write_timestamp(buffer, seconds),
        None => buffer.extend_from_slice(b"\\N"),
    }
    buffer.push(b'\t');
    write_timestamp(buffer, created);
    buffer.push(b'\t');
    write_timestamp(buffer, updated);
    buffer.push(b'\n');
}

fn write_cents(buffer: &mut Vec<u8>, cents: Option<i64>) {
    use std::io::Write;
    match cents {
        Some(cents) => {
            let _ = write!(buffer, "{}.{:02}", cents / 100, cents % 100);
        }
        None => buffer.extend_from_slice(b"\\N"),
    }
}

fn write_timestamp(buffer: &mut Vec<u8>, seconds: i64) {
    use std::io::Write;
    let Some(moment) = chrono::DateTime::from_timestamp(seconds, 0) else {
        buffer.extend_from_slice(b"\\N");
        return;
    };
    let _ = write!(
        buffer,
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}+00",
        moment.year(),
        moment.month(),
        moment.day(),
        chrono::Timelike::hour(&moment),
        chrono::Timelike::minute(&moment),
        chrono::Timelike::second(&moment)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_assigns_every_load_to_a_day() {
        let shape = DatasetShape::plan(10_007, 20, 90);
        assert_eq!(shape.day_loads.iter().sum::<u64>(), 10_007);
        assert_eq!(shape.days(), 90);
    }

    #[test]
    fn largest_venture_is_picked_most() {
        let shape = DatasetShape::plan(1_000, 50, 10);
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0_u32; 50];
        for _ in 0..20_000 {
            counts[(shape.pick_venture(&mut rng) - FIRST_VENTURE_ID) as usize] += 1;
        }
        assert!(counts[0] > counts[1]);
        assert!(counts[1] > counts[40]);
    }

    #[test]
    fn size_steps_cover_every_day_once() {
        let shape = DatasetShape::plan(100_000, 10, 365);
        let steps = shape.size_steps();
        assert_eq!(steps.first().map(|step| step.start), Some(0));
        assert_eq!(steps.last().map(|step| step.end), Some(365));
        for pair in steps.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
    }

    #[test]
    fn picked_day_stays_in_requested_range() {
        let shape = DatasetShape::plan(10_000, 10, 100);
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..1_000 {
            let day = shape.pick_day(&mut rng, 70..100);
            assert!(day >= shape.first_day + ChronoDuration::days(70));
            assert!(day < shape.first_day + ChronoDuration::days(100));
        }
    }

    #[test]
    fn copy_line_has_seven_columns() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut buffer = Vec::new();
        let day = NaiveDate::from_ymd_opt(2026, 1, 5).unwrap();
        write_load(
            &mut buffer,
            &mut rng,
            FIRST_VENTURE_ID,
            day,
            400,
            i64::MAX / 4,
        );
        let line = String::from_utf8(buffer).unwrap();
        assert_eq!(line.trim_end().split('\t').count(), 7, "{line}");
    }
}

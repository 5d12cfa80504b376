//! The writers: connections that change "Load" one row per transaction, as an
//! application does, at full speed or at a steady rate.
//!
//! Six changes in seven update an existing load (its next lifecycle status, or a
//! billing correction on a finished one), the seventh inserts a new load created now.
//! Updates pick recent loads most of the time, as status changes do. When probes are enabled,
//! every [`PROBE_EVERY`]th change instead goes to a probe bucket whose KPI values tell
//! the observer exactly which changes it contains (see `freshness`).

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};

use super::dataset::{DatasetShape, END_VENTURE_ID, FIRST_VENTURE_ID};
use super::error::{database, BenchError};
use crate::db::{connect_dedicated, DatabaseTarget};

/// Share of changes that update an existing load; the others insert one. A load is
/// created once and then changes status about six times (working, quoted, covered,
/// in transit, delivered, billed), so six updates come with each insert.
pub const UPDATE_SHARE: f64 = 6.0 / 7.0;

/// Share of updates that pick a load of the last `RECENT_DAYS` days; the others pick
/// any load, like a late billing correction.
pub const RECENT_SHARE: f64 = 0.9;

/// One change in this many is a probe change when probes are on.
pub const PROBE_EVERY: u64 = 4;

/// Probe buckets per writer. Each writer owns its buckets, so a bucket's changes are
/// ordered by that writer's commits.
pub const PROBE_BUCKETS_PER_WRITER: usize = 16;

/// The next lifecycle status, a billing date on delivery, or a billing correction on a
/// finished load: every update changes a KPI input, so every one is captured. The
/// venture condition keeps the bench away from loads it did not generate.
const UPDATE_LOAD: &str = r#"
    UPDATE "Load" SET
        status = CASE status
            WHEN 'OPEN' THEN 'WORKING'::"LoadStatus"
            WHEN 'WORKING' THEN 'QUOTED'::"LoadStatus"
            WHEN 'QUOTED' THEN 'COVERED'::"LoadStatus"
            WHEN 'COVERED' THEN 'IN_TRANSIT'::"LoadStatus"
            WHEN 'IN_TRANSIT' THEN 'DELIVERED'::"LoadStatus"
            ELSE status END,
        "billingDate" = CASE WHEN status = 'IN_TRANSIT' THEN now() ELSE "billingDate" END,
        "billAmount" = CASE WHEN status IN ('DELIVERED', 'LOST', 'CANCELLED')
                            THEN coalesce("billAmount", 0) + $2::integer * 0.01
                            ELSE "billAmount" END,
        "updatedAt" = now()
    WHERE id = $1 AND "ventureId" >= $3 AND "ventureId" < $4
"#;

const INSERT_LOAD: &str = r#"
    INSERT INTO "Load" ("ventureId", status, "billAmount") VALUES ($1, 'OPEN', $2::integer * 0.01)
"#;

const INSERT_PROBE: &str = r#"
    INSERT INTO "Load" ("ventureId", status, "createdAt") VALUES ($1, 'OPEN', $2) RETURNING id
"#;

const UPDATE_PROBE: &str =
    r#"UPDATE "Load" SET status = 'LOST', "updatedAt" = now() WHERE id = $1"#;

/// Target of the writers' changes: the dataset's shape and its load ids.
#[derive(Debug, Clone)]
pub struct Workload {
    pub shape: DatasetShape,
    /// Ids of the generated loads, and the first id of the recent days.
    pub first_id: i64,
    pub recent_first_id: i64,
    pub last_id: i64,
}

impl Workload {
    fn pick_load_id(&self, rng: &mut impl Rng) -> i64 {
        if rng.random::<f64>() < RECENT_SHARE {
            rng.random_range(self.recent_first_id..=self.last_id)
        } else {
            rng.random_range(self.first_id..=self.last_id)
        }
    }

    /// Draws the bucket that one change of the writers' mix touches, for queueing a
    /// backlog directly: inserts touch today, updates the day of a load picked as
    /// [`Workload`] picks them.
    pub fn pick_change_bucket(&self, rng: &mut impl Rng, today: NaiveDate) -> (i32, NaiveDate) {
        let venture = self.shape.pick_venture(rng);
        if rng.random::<f64>() >= UPDATE_SHARE {
            return (venture, today);
        }
        let days = if rng.random::<f64>() < RECENT_SHARE {
            self.shape.first_recent_day()..self.shape.days()
        } else {
            0..self.shape.days()
        };
        (venture, self.shape.pick_day(rng, days))
    }
}

/// Pace of a writer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// One change after the other, as fast as the server responds.
    FullSpeed,
    /// This many changes per second, evenly spaced.
    PerSecond(f64),
}

/// A committed probe change: the probe bucket now contains `version` changes.
#[derive(Debug, Clone, Copy)]
pub struct ProbeCommit {
    pub bucket: usize,
    pub version: u64,
    /// Client-side instant right after the commit returned.
    pub committed_at: Instant,
}

/// The probe buckets of one freshness run.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// Venture id of probe bucket 0; bucket `i` is venture `first_venture + i`.
    pub first_venture: i32,
    /// Creation time of every probe load, which fixes the bucket's day.
    pub created_at: DateTime<Utc>,
    pub commits: mpsc::UnboundedSender<ProbeCommit>,
}

#[derive(Debug, Default, Clone, Copy)]
struct ProbeBucket {
    version: u64,
    open_load: Option<i64>,
}

/// Counts of the changes a set of writers made in one run.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Tally {
    pub changes: u64,
    pub updates: u64,
    pub inserts: u64,
    pub probes: u64,
    /// Updates that found no row; zero unless loads were deleted meanwhile.
    pub missed_updates: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.changes += other.changes;
        self.updates += other.updates;
        self.inserts += other.inserts;
        self.probes += other.probes;
        self.missed_updates += other.missed_updates;
    }
}

/// One writer connection with its prepared statements.
pub struct Writer {
    index: usize,
    client: Client,
    update: Statement,
    insert: Statement,
    insert_probe: Statement,
    update_probe: Statement,
    rng: StdRng,
    probes: Vec<ProbeBucket>,
    // Dropping the receiver would close the connection at its next notice.
    _messages: mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
}

impl Writer {
    /// Opens writer `index` with `application_name` `freight-kpi bench writer`.
    ///
    /// # Errors
    ///
    /// [`BenchError::Service`] when the connection or a prepare fails.
    pub async fn connect(target: &DatabaseTarget, index: usize) -> Result<Self, BenchError> {
        let target = target.with_application_name("freight-kpi bench writer");
        let (client, messages) = connect_dedicated(&target).await?;
        let prepare = |sql: &'static str| client.prepare(sql);
        let update = prepare(UPDATE_LOAD)
            .await
            .map_err(database("prepare the load update"))?;
        let insert = prepare(INSERT_LOAD)
            .await
            .map_err(database("prepare the load insert"))?;
        let insert_probe = prepare(INSERT_PROBE)
            .await
            .map_err(database("prepare the probe insert"))?;
        let update_probe = prepare(UPDATE_PROBE)
            .await
            .map_err(database("prepare the probe update"))?;
        Ok(Self {
            index,
            client,
            update,
            insert,
            insert_probe,
            update_probe,
            rng: StdRng::seed_from_u64(0x5752_4954 + index as u64),
            probes: Vec::new(),
            _messages: messages,
        })
    }

    /// Changes "Load" at `pace` until `deadline`, sending probe commits to `probes`.
    async fn run(
        &mut self,
        workload: &Workload,
        pace: Pace,
        start_offset: Duration,
        deadline: Instant,
        probes: Option<&ProbeTarget>,
    ) -> Result<Tally, BenchError> {
        if probes.is_some() {
            self.probes = vec![ProbeBucket::default(); PROBE_BUCKETS_PER_WRITER];
        }
        let mut tally = Tally::default();
        let mut next = Instant::now() + start_offset;
        loop {
            match pace {
                Pace::FullSpeed => {
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                Pace::PerSecond(rate) => {
                    if next >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(next).await;
                    next += Duration::from_secs_f64(1.0 / rate);
                }
            }

            match probes {
                Some(target) if tally.changes % PROBE_EVERY == 0 => {
                    self.probe(target, tally.probes).await?;
                    tally.probes += 1;
                }
                _ => self.change(workload, &mut tally).await?,
            }
            tally.changes += 1;
        }
        Ok(tally)
    }

    async fn change(&mut self, workload: &Workload, tally: &mut Tally) -> Result<(), BenchError> {
        let amount_cents: i32 = self.rng.random_range(1..5_000);
        if self.rng.random::<f64>() < UPDATE_SHARE {
            let id = workload.pick_load_id(&mut self.rng);
            let updated = self
                .client
                .execute(
                    &self.update,
                    &[&id, &amount_cents, &FIRST_VENTURE_ID, &END_VENTURE_ID],
                )
                .await
                .map_err(database("update a load"))?;
            tally.updates += 1;
            if updated == 0 {
                tally.missed_updates += 1;
            }
        } else {
            let venture = workload.shape.pick_venture(&mut self.rng);
            self.client
                .execute(&self.insert, &[&venture, &amount_cents])
                .await
                .map_err(database("insert a load"))?;
            tally.inserts += 1;
        }
        Ok(())
    }

    /// Makes one probe change: the bucket's next load is inserted OPEN, then set LOST,
    /// so each change raises "loadsInbound" + "loadsLost" of the bucket by one.
    async fn probe(&mut self, target: &ProbeTarget, sequence: u64) -> Result<(), BenchError> {
        let local = sequence as usize % self.probes.len();
        let bucket = self.index * PROBE_BUCKETS_PER_WRITER + local;
        let state = &mut self.probes[local];
        match state.open_load.take() {
            Some(id) => {
                self.client
                    .execute(&self.update_probe, &[&id])
                    .await
                    .map_err(database("update a probe load"))?;
            }
            None => {
                let venture = target.first_venture + bucket as i32;
                let row = self
                    .client
                    .query_one(&self.insert_probe, &[&venture, &target.created_at])
                    .await
                    .map_err(database("insert a probe load"))?;
                state.open_load = Some(row.get(0));
            }
        }
        let committed_at = Instant::now();
        state.version += 1;
        let _ = target.commits.send(ProbeCommit {
            bucket,
            version: state.version,
            committed_at,
        });
        Ok(())
    }
}

/// Runs every writer for `length` at `total_pace` (split evenly between them) and
/// returns them with the sum of their tallies and the time they took.
///
/// # Errors
///
/// The first writer error; the writers are dropped then.
pub async fn run_writers(
    writers: Vec<Writer>,
    workload: &Workload,
    total_pace: Pace,
    length: Duration,
    probes: Option<ProbeTarget>,
) -> Result<(Vec<Writer>, Tally, Duration), BenchError> {
    let count = writers.len();
    let pace = match total_pace {
        Pace::FullSpeed => Pace::FullSpeed,
        Pace::PerSecond(rate) => Pace::PerSecond(rate / count as f64),
    };
    let started = Instant::now();
    let deadline = started + length;

    let tasks: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(position, mut writer)| {
            let workload = workload.clone();
            let probes = probes.clone();
            // Paced writers start staggered so that their changes interleave evenly.
            let offset = match pace {
                Pace::PerSecond(rate) => {
                    Duration::from_secs_f64(position as f64 / (rate * count as f64))
                }
                Pace::FullSpeed => Duration::ZERO,
            };
            tokio::spawn(async move {
                let tally = writer
                    .run(&workload, pace, offset, deadline, probes.as_ref())
                    .await;
                (writer, tally)
            })
        })
        .collect();

    let mut writers = Vec::with_capacity(count);
    let mut total = Tally::default();
    let mut first_error = None;
    for task in tasks {
        let (writer, tally) = task.await.expect("a writer task does not panic");
        match tally {
            Ok(tally) => total.add(&tally),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
        writers.push(writer);
    }
    let elapsed = started.elapsed();
    match first_error {
        Some(error) => Err(error),
        None => Ok((writers, total, elapsed)),
    }
}

/// Opens `count` writers.
///
/// # Errors
///
/// [`BenchError::Service`] when a connection fails.
pub async fn connect_writers(
    target: &DatabaseTarget,
    count: u32,
) -> Result<Vec<Writer>, BenchError> {
    let mut writers = Vec::with_capacity(count as usize);
    for index in 0..count as usize {
        writers.push(Writer::connect(target, index).await?);
    }
    Ok(writers)
}

/// Reads the id range of the generated loads: ids follow the generation order, so the
/// recent days' loads are the ids from the first load of the first recent day on.
///
/// # Errors
///
/// [`BenchError::Service`] when the query fails.
pub async fn locate_loads(
    client: &Client,
    shape: &DatasetShape,
    first_id: i64,
) -> Result<Workload, BenchError> {
    let last_id: i64 = client
        .query_one(r#"SELECT coalesce(max(id), 0) FROM "Load""#, &[])
        .await
        .map_err(database("read the last load id"))?
        .get(0);
    let recent_first_id =
        (first_id + shape.loads_before(shape.first_recent_day()) as i64).min(last_id);
    Ok(Workload {
        shape: shape.clone(),
        first_id,
        recent_first_id,
        last_id,
    })
}

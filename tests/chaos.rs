//! Randomized chaos harness for the KPI invariant: once writes stop, every bucket of
//! "FreightKpiDaily" equals the aggregation of "Load", whatever happened before.
//!
//! It owns a private PostgreSQL cluster and runs 1 to 3 `freight-kpi run` processes
//! behind a loopback proxy. Several writer tasks issue a random mix of changes while
//! a fault injector applies kill -9 and restart, pg_terminate_backend, a concurrent
//! reconcile, SIGSTOP/SIGCONT, connections that go silent, and server restarts.
//!
//! Settings (environment):
//! - `FREIGHT_KPI_CHAOS_SEED`: the seed (default: random, printed);
//! - `FREIGHT_KPI_CHAOS_SECONDS`: how long writers and faults run (default 60).
//!
//! Rerun a failing seed with
//! `FREIGHT_KPI_CHAOS_SEED=<seed> cargo test --test chaos -- --nocapture`.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::PrivateCluster;
use common::proxy::Proxy;
use common::{binary, connect, kpi_mismatches, queue_depth};
use freight_kpi::db::DatabaseTarget;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_postgres::Client;

/// Session time zones of the writers: UTC+14, UTC-10 with DST, UTC+5:45 and others,
/// so local days differ from UTC days.
const TIME_ZONES: [&str; 5] = [
    "UTC",
    "Pacific/Kiritimati",
    "America/Adak",
    "Asia/Kathmandu",
    "Europe/Berlin",
];

/// Venture of the freshness probes, apart from the writers' ventures 1 to 20.
const PROBE_VENTURE: i32 = 999_999;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Change {
    Insert,
    Lifecycle,
    LoseOrCancel,
    AmountEdit,
    BillingSetOrClear,
    MoveVentureOrDay,
    Delete,
    MultiRowUpdate,
    CopyBatch,
    InsertOnConflict,
    RolledBack,
    Savepoints,
    Truncate,
    TouchOnly,
}

const WEIGHTED_CHANGES: [(Change, u32); 13] = [
    (Change::Insert, 20),
    (Change::Lifecycle, 20),
    (Change::LoseOrCancel, 4),
    (Change::AmountEdit, 8),
    (Change::BillingSetOrClear, 5),
    (Change::MoveVentureOrDay, 6),
    (Change::Delete, 5),
    (Change::MultiRowUpdate, 4),
    (Change::CopyBatch, 2),
    (Change::InsertOnConflict, 5),
    (Change::RolledBack, 5),
    (Change::Savepoints, 5),
    (Change::TouchOnly, 3),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillAndRestart,
    TerminateBackends,
    ConcurrentReconcile,
    Pause,
    SilentConnections,
    ServerRestart,
}

const FAULTS: [Fault; 6] = [
    Fault::KillAndRestart,
    Fault::TerminateBackends,
    Fault::ConcurrentReconcile,
    Fault::Pause,
    Fault::SilentConnections,
    Fault::ServerRestart,
];

#[derive(Debug, Default)]
struct Tally {
    changes: BTreeMap<Change, u64>,
    failed_statements: u64,
    faults: BTreeMap<Fault, u64>,
    probe_latencies_ms: Vec<f64>,
    catch_up_ms: Vec<f64>,
}

fn pick_change(rng: &mut StdRng) -> Change {
    let total: u32 = WEIGHTED_CHANGES.iter().map(|(_, weight)| weight).sum();
    let mut roll = rng.random_range(0..total);
    for (change, weight) in WEIGHTED_CHANGES {
        if roll < weight {
            return change;
        }
        roll -= weight;
    }
    unreachable!("the roll is below the total weight")
}

/// Returns a `createdAt` expression: mostly recent, sometimes years back or in the future,
/// sometimes a minute before local midnight of the session's time zone.
fn created_at(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0 => format!(
            "now() - interval '{} years {} days'",
            rng.random_range(1..6),
            rng.random_range(0..365)
        ),
        1 => format!("now() + interval '{} days'", rng.random_range(1..400)),
        2 | 3 => format!(
            "date_trunc('day', now()) - interval '{} days' - interval '1 minute'",
            rng.random_range(0..5)
        ),
        _ => format!("now() - interval '{} hours'", rng.random_range(0..24 * 7)),
    }
}

fn amount(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0 => "NULL".to_owned(),
        _ => format!(
            "{}.{:02}",
            rng.random_range(50..20_000),
            rng.random_range(0..100)
        ),
    }
}

async fn random_load_id(client: &Client, rng: &mut StdRng) -> Result<i64, tokio_postgres::Error> {
    let max: Option<i64> = client
        .query_one(r#"SELECT max(id) FROM "Load""#, &[])
        .await?
        .get(0);
    Ok(rng.random_range(1..=max.unwrap_or(1).max(1)))
}

async fn apply_change(
    client: &mut Client,
    change: Change,
    rng: &mut StdRng,
) -> Result<(), tokio_postgres::Error> {
    let venture = rng.random_range(1..=20);
    match change {
        Change::Insert => {
            let sql = format!(
                r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "createdAt")
                   VALUES ({venture}, 'OPEN', {}, {}, {})"#,
                amount(rng),
                amount(rng),
                created_at(rng)
            );
            client.batch_execute(&sql).await
        }
        Change::Lifecycle => {
            let id = random_load_id(client, rng).await?;
            client
                .execute(
                    r#"UPDATE "Load"
                       SET status = CASE status
                               WHEN 'OPEN' THEN 'QUOTED' WHEN 'WORKING' THEN 'QUOTED'
                               WHEN 'QUOTED' THEN 'COVERED' WHEN 'COVERED' THEN 'IN_TRANSIT'
                               WHEN 'IN_TRANSIT' THEN 'DELIVERED' ELSE status END::"LoadStatus",
                           "billingDate" = CASE WHEN status = 'IN_TRANSIT' THEN now() ELSE "billingDate" END,
                           "updatedAt" = now()
                       WHERE id = $1"#,
                    &[&id],
                )
                .await
                .map(drop)
        }
        Change::LoseOrCancel => {
            let id = random_load_id(client, rng).await?;
            let status = if rng.random_bool(0.5) {
                "LOST"
            } else {
                "CANCELLED"
            };
            client
                .batch_execute(&format!(
                    r#"UPDATE "Load" SET status = '{status}' WHERE id = {id}"#
                ))
                .await
        }
        Change::AmountEdit => {
            let id = random_load_id(client, rng).await?;
            client
                .batch_execute(&format!(
                    r#"UPDATE "Load" SET "billAmount" = {}, "costAmount" = {} WHERE id = {id}"#,
                    amount(rng),
                    amount(rng)
                ))
                .await
        }
        Change::BillingSetOrClear => {
            let id = random_load_id(client, rng).await?;
            let value = if rng.random_bool(0.5) {
                "now()"
            } else {
                "NULL"
            };
            client
                .batch_execute(&format!(
                    r#"UPDATE "Load" SET "billingDate" = {value} WHERE id = {id}"#
                ))
                .await
        }
        Change::MoveVentureOrDay => {
            let id = random_load_id(client, rng).await?;
            let sql = if rng.random_bool(0.5) {
                format!(r#"UPDATE "Load" SET "ventureId" = {venture} WHERE id = {id}"#)
            } else {
                format!(
                    r#"UPDATE "Load" SET "createdAt" = {} WHERE id = {id}"#,
                    created_at(rng)
                )
            };
            client.batch_execute(&sql).await
        }
        Change::Delete => {
            let id = random_load_id(client, rng).await?;
            client
                .batch_execute(&format!(
                    r#"DELETE FROM "Load" WHERE id = {id} AND "ventureId" <> {PROBE_VENTURE}"#
                ))
                .await
        }
        Change::MultiRowUpdate => {
            let modulo = rng.random_range(0..7);
            client
                .batch_execute(&format!(
                    r#"UPDATE "Load" SET "costAmount" = coalesce("costAmount", 0) + 1,
                                         status = CASE WHEN status = 'OPEN' THEN 'WORKING'::"LoadStatus" ELSE status END
                       WHERE "ventureId" = {venture} AND id % 7 = {modulo}"#
                ))
                .await
        }
        Change::CopyBatch => {
            let rows = rng.random_range(20..300);
            let mut data = String::new();
            for _ in 0..rows {
                let status =
                    ["OPEN", "QUOTED", "COVERED", "DELIVERED", "LOST"][rng.random_range(0..5)];
                let billing = if rng.random_bool(0.5) {
                    "2026-01-01 00:00:00+00"
                } else {
                    "\\N"
                };
                let days_back = rng.random_range(0..30);
                let created = chrono::Utc::now()
                    - chrono::Duration::days(days_back)
                    - chrono::Duration::minutes(rng.random_range(0..1440));
                data.push_str(&format!(
                    "{}\t{status}\t{}.{:02}\t{}.{:02}\t{billing}\t{}\n",
                    rng.random_range(1..=20),
                    rng.random_range(100..5000),
                    rng.random_range(0..100),
                    rng.random_range(50..4000),
                    rng.random_range(0..100),
                    created.to_rfc3339()
                ));
            }
            let sink = client
                .copy_in(r#"COPY "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt") FROM STDIN"#)
                .await?;
            futures::pin_mut!(sink);
            futures::SinkExt::send(&mut sink, bytes::Bytes::from(data)).await?;
            sink.finish().await.map(drop)
        }
        Change::InsertOnConflict => {
            let id = random_load_id(client, rng).await?;
            client
                .batch_execute(&format!(
                    r#"INSERT INTO "Load" (id, "ventureId", status, "billAmount", "createdAt")
                       VALUES ({id}, {venture}, 'DELIVERED', {}, {}),
                              (nextval(pg_get_serial_sequence('"Load"', 'id')), {venture}, 'QUOTED', {}, now())
                       ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, "billAmount" = EXCLUDED."billAmount",
                                                      "billingDate" = now()"#,
                    amount(rng),
                    created_at(rng),
                    amount(rng)
                ))
                .await
        }
        Change::RolledBack => {
            let transaction = client.transaction().await?;
            transaction
                .batch_execute(&format!(
                    r#"INSERT INTO "Load" ("ventureId", status) VALUES ({venture}, 'DELIVERED');
                       UPDATE "Load" SET status = 'LOST' WHERE "ventureId" = {venture}"#
                ))
                .await?;
            transaction.rollback().await
        }
        Change::Savepoints => {
            let transaction = client.transaction().await?;
            transaction
                .batch_execute(&format!(
                    r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "billingDate")
                           VALUES ({venture}, 'DELIVERED', 700, now());
                       SAVEPOINT before_bulk;
                       UPDATE "Load" SET status = 'CANCELLED' WHERE "ventureId" = {venture};
                       ROLLBACK TO SAVEPOINT before_bulk;
                       SAVEPOINT kept;
                       INSERT INTO "Load" ("ventureId", status, "createdAt") VALUES ({venture}, 'QUOTED', {});
                       RELEASE SAVEPOINT kept"#,
                    created_at(rng)
                ))
                .await?;
            transaction.commit().await
        }
        Change::Truncate => client.batch_execute(r#"TRUNCATE "Load""#).await,
        Change::TouchOnly => {
            let id = random_load_id(client, rng).await?;
            client
                .batch_execute(&format!(
                    r#"UPDATE "Load" SET "updatedAt" = now() WHERE id = {id}"#
                ))
                .await
        }
    }
}

async fn connect_writer(target: &DatabaseTarget, time_zone: &str) -> Option<Client> {
    let mut config = target.config().clone();
    config.application_name("kpi-test-writer");
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute(&format!("SET TimeZone = '{time_zone}'"))
        .await
        .ok()?;
    Some(client)
}

/// Issues random changes until `stop` is set. A statement that fails (the server
/// restarted, the backend was terminated) is counted and the writer reconnects.
async fn writer(
    target: DatabaseTarget,
    seed: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    truncate_at: Option<Instant>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut truncate_at = truncate_at;
    let mut client: Option<Client> = None;

    while !stop.load(Ordering::SeqCst) {
        let Some(active) = client.as_mut() else {
            let time_zone = TIME_ZONES[rng.random_range(0..TIME_ZONES.len())];
            client = connect_writer(&target, time_zone).await;
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        };

        let change = match truncate_at {
            Some(at) if Instant::now() >= at => {
                truncate_at = None;
                Change::Truncate
            }
            _ => pick_change(&mut rng),
        };
        let outcome = apply_change(active, change, &mut rng).await;

        match outcome {
            Ok(()) => *tally.lock().unwrap().changes.entry(change).or_default() += 1,
            Err(error) => {
                tally.lock().unwrap().failed_statements += 1;
                if change == Change::Truncate {
                    // A TRUNCATE that failed is retried, after a reconnect when a fault
                    // closed the connection, so that every default run issues one.
                    truncate_at = Some(Instant::now());
                }
                if active.is_closed() || error.is_closed() || error.code().is_none() {
                    client = None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..8))).await;
    }
}

/// Inserts one load into a bucket of its own every 250 ms and measures the time from
/// its commit until the bucket shows it.
async fn freshness_probe(target: DatabaseTarget, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let mut probe: i32 = 0;
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::SeqCst) {
        let Some(active) = client.as_ref() else {
            client = connect_writer(&target, "UTC").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        probe += 1;
        let day = chrono::NaiveDate::from_ymd_opt(1990, 1, 1).unwrap()
            + chrono::Duration::days(i64::from(probe));
        let inserted = active
            .execute(
                r#"INSERT INTO "Load" ("ventureId", "createdAt") VALUES ($1, $2::date::timestamp AT TIME ZONE 'UTC')"#,
                &[&PROBE_VENTURE, &day],
            )
            .await;
        if inserted.is_err() {
            client = None;
            continue;
        }
        let committed = Instant::now();

        while committed.elapsed() < Duration::from_secs(60) && !stop.load(Ordering::SeqCst) {
            let fresh = active
                .query_opt(
                    r#"SELECT 1 FROM "FreightKpiDaily" WHERE "ventureId" = $1 AND date = $2 AND "loadsInbound" > 0"#,
                    &[&PROBE_VENTURE, &day],
                )
                .await;
            match fresh {
                Ok(Some(_)) => {
                    tally
                        .lock()
                        .unwrap()
                        .probe_latencies_ms
                        .push(committed.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => {
                    client = None;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One `freight-kpi run` process.
struct Instance {
    child: Child,
    log: std::path::PathBuf,
}

fn spawn_instance(url: &str, log: &std::path::Path) -> Instance {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the instance log");
    let child = Command::new(binary())
        .args([
            "run",
            "--ping-interval-ms",
            "1000",
            "--ping-timeout-ms",
            "1000",
            "--http",
            "off",
        ])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .expect("start freight-kpi run");
    Instance {
        child,
        log: log.to_owned(),
    }
}

fn signal(pid: u32, name: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status();
}

fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * quantile).round() as usize;
    sorted[index]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpis_stay_exact_under_faults() {
    let seed: u64 = std::env::var("FREIGHT_KPI_CHAOS_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(rand::random);
    let seconds: u64 = std::env::var("FREIGHT_KPI_CHAOS_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(60);
    println!("chaos seed {seed}, {seconds} s (rerun: FREIGHT_KPI_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    // The cluster, the database and the proxy the instances connect through.
    let cluster = Arc::new(
        tokio::task::spawn_blocking(PrivateCluster::start)
            .await
            .unwrap(),
    );
    connect(&cluster.target("postgres"))
        .await
        .batch_execute("CREATE DATABASE chaos")
        .await
        .expect("create the chaos database");
    let target = cluster.target("chaos");
    {
        let (mut client, _messages) = freight_kpi::db::connect_dedicated(&target).await.unwrap();
        freight_kpi::db::migrate(&mut client).await.unwrap();
    }
    let proxy = Proxy::start(cluster.addr()).await;
    let service_url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=chaos",
        proxy.addr().port()
    );
    let logs = tempfile_dir();

    let instance_count = rng.random_range(1..=3);
    let mut instances: Vec<Instance> = (0..instance_count)
        .map(|index| spawn_instance(&service_url, &logs.join(format!("instance-{index}.log"))))
        .collect();
    println!("{instance_count} instances, logs in {}", logs.display());

    // Writers and the probe.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let duration = Duration::from_secs(seconds);
    let truncate_at = started + duration.mul_f64(rng.random_range(0.3..0.6));
    let writer_count = 4;
    let mut tasks = Vec::new();
    for index in 0..writer_count {
        tasks.push(tokio::spawn(writer(
            target.clone(),
            seed.wrapping_add(index + 1),
            stop.clone(),
            tally.clone(),
            (index == 0).then_some(truncate_at),
        )));
    }
    tasks.push(tokio::spawn(freshness_probe(
        target.clone(),
        stop.clone(),
        tally.clone(),
    )));

    // Faults: each round injects every kind once, in a random order.
    let mut reconciles: Vec<Child> = Vec::new();
    let mut round: Vec<Fault> = Vec::new();
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
        if round.is_empty() {
            round = FAULTS.to_vec();
            for index in (1..round.len()).rev() {
                round.swap(index, rng.random_range(0..=index));
            }
        }
        let fault = round.pop().expect("the round is refilled when empty");
        *tally.lock().unwrap().faults.entry(fault).or_default() += 1;
        let victim = rng.random_range(0..instances.len());

        match fault {
            Fault::KillAndRestart => {
                let instance = &mut instances[victim];
                instance.child.start_kill().ok();
                instance.child.wait().await.ok();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1_000))).await;
                let log = instance.log.clone();
                *instance = spawn_instance(&service_url, &log);
            }
            Fault::TerminateBackends => {
                // A fresh connection each time, since a server restart closes older ones.
                connect(&cluster.target("postgres"))
                    .await
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = 'chaos' AND application_name LIKE 'freight-kpi%'",
                        &[],
                    )
                    .await
                    .expect("terminate the service's backends");
            }
            Fault::ConcurrentReconcile => {
                let child = Command::new(binary())
                    .arg("reconcile")
                    .env("DATABASE_URL", &service_url)
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("start freight-kpi reconcile");
                reconciles.push(child);
            }
            Fault::Pause => {
                if let Some(pid) = instances[victim].child.id() {
                    let pause = Duration::from_millis(rng.random_range(600..3_000));
                    signal(pid, "STOP");
                    tokio::time::sleep(pause).await;
                    signal(pid, "CONT");
                }
            }
            Fault::SilentConnections => {
                let _ = proxy.silence_open_connections();
            }
            Fault::ServerRestart => {
                let restarting = cluster.clone();
                tokio::task::spawn_blocking(move || restarting.restart())
                    .await
                    .unwrap();
                let restarted = Instant::now();
                // The catch-up time: until a probe committed after the restart is fresh.
                let probes_before = tally.lock().unwrap().probe_latencies_ms.len();
                let deadline = restarted + Duration::from_secs(30);
                while Instant::now() < deadline
                    && tally.lock().unwrap().probe_latencies_ms.len() < probes_before + 2
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tally
                    .lock()
                    .unwrap()
                    .catch_up_ms
                    .push(restarted.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }

    // Quiescence: writes stop, every instance is up, and the queue drains.
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    for child in &mut reconciles {
        let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
    }
    for (index, instance) in instances.iter_mut().enumerate() {
        if let Some(pid) = instance.child.id() {
            signal(pid, "CONT");
        }
        if instance.child.try_wait().ok().flatten().is_some() {
            let log = instance.log.clone();
            *instance = spawn_instance(&service_url, &log);
            println!("instance {index} had exited and was restarted");
        }
    }
    let checker = connect(&target).await;
    let quiesced = Instant::now();
    let mut mismatches = Vec::new();
    while quiesced.elapsed() < Duration::from_secs(60) {
        mismatches = kpi_mismatches(&checker).await;
        if mismatches.is_empty() && queue_depth(&checker).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle_ms = quiesced.elapsed().as_secs_f64() * 1000.0;

    // Report.
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    println!("changes issued: {:?}", tally.changes);
    println!("failed statements (faults): {}", tally.failed_statements);
    println!("faults injected: {:?}", tally.faults);
    let mut latencies = tally.probe_latencies_ms.clone();
    latencies.sort_by(f64::total_cmp);
    println!(
        "freshness over {} probes (ms): p50 {:.0}, p95 {:.0}, p99 {:.0}, max {:.0}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "catch-up after each server restart (ms): {:?}",
        tally
            .catch_up_ms
            .iter()
            .map(|ms| ms.round())
            .collect::<Vec<_>>()
    );
    println!("time to quiescence after writes stopped: {settle_ms:.0} ms");

    // Stop the instances with SIGTERM, as an operator would.
    for instance in &mut instances {
        if let Some(pid) = instance.child.id() {
            signal(pid, "TERM");
        }
    }
    for instance in &mut instances {
        let exited = tokio::time::timeout(Duration::from_secs(10), instance.child.wait()).await;
        assert!(
            exited.is_ok(),
            "an instance did not stop within 10 s of SIGTERM; log {}",
            instance.log.display()
        );
    }

    if seconds >= 60 {
        // Faults come in rounds of every kind, so a default run injects each of them.
        assert_eq!(
            tally.faults.len(),
            FAULTS.len(),
            "fault kinds injected: {:?}",
            tally.faults
        );
        assert!(
            tally.changes.contains_key(&Change::Truncate),
            "the TRUNCATE was issued"
        );
    }
    assert!(
        mismatches.is_empty(),
        "seed {seed}: {} buckets differ after quiescence; first ones:\n{}\ninstance logs in {}",
        mismatches.len(),
        mismatches
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        logs.display()
    );
    let _ = std::fs::remove_dir_all(&logs);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fk-chaos-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("create the log folder");
    dir
}

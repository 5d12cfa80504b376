//! The scheduler against a real PostgreSQL: one run per slot across instances (also
//! with one instance's clock shifted by faketime), catch-up of a missed slot,
//! daylight-saving days with a controlled clock, run-log retention and the
//! incremental summary rows.

mod common;
mod jobs_common;

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::{start_service, test_settings, wait_until, RunningService, TestDb};
use freight_kpi::jobs::{DbClock, LockMode, Schedule, SchedulerSettings};
use jobs_common::*;
use tokio_postgres::Client;

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

/// Starts a service whose scheduler runs `cron` in `zone` with `clock`. With a fast
/// clock every slot starts late by the clock's measure, so the missed-slot grace is
/// three hours unless `alerts` are given.
async fn start_scheduled(
    db: &TestDb,
    cron: &str,
    zone: &str,
    clock: Arc<dyn DbClock>,
    alerts: Option<freight_kpi::jobs::AlertSettings>,
) -> RunningService {
    let mut settings = test_settings(db);
    let mut scheduler = SchedulerSettings::new(Schedule::parse(cron, zone).unwrap());
    scheduler.tick = Duration::from_millis(20);
    scheduler.missed_slot_grace = Duration::from_secs(3 * 3600);
    scheduler.clock = Some(clock);
    settings.jobs.scheduler = Some(scheduler);
    settings.jobs.lock = lock_settings(
        LockMode::Advisory,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    if let Some(alerts) = alerts {
        settings.jobs.alerts = alerts;
        if let Some(scheduler) = settings.jobs.scheduler.as_mut() {
            scheduler.missed_slot_grace = Duration::from_secs(300);
        }
    }
    start_service(db, settings).await
}

/// Returns the claimed slots with the status of their run.
async fn slot_runs(client: &Client) -> Vec<(DateTime<Utc>, Option<String>)> {
    client
        .query(
            r#"SELECT s.scheduled_for, r.status
               FROM freight_kpi.job_slot s LEFT JOIN "JobRunLog" r ON r.id = s.run_id
               ORDER BY s.scheduled_for"#,
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Counts the runs of each status per slot, from the slot recorded in "statsJson".
async fn statuses_per_slot(client: &Client) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut per_slot: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for run in run_rows(client).await {
        let Some(slot) = run
            .stats
            .as_ref()
            .and_then(|stats| stats["slot"].as_str().map(str::to_owned))
        else {
            continue;
        };
        *per_slot
            .entry(slot)
            .or_default()
            .entry(run.status)
            .or_default() += 1;
    }
    per_slot
}

/// Starts `freight-kpi run` on `db` with a scheduler every 5 seconds, optionally under
/// `faketime` with `offset` (such as "+5m").
fn spawn_instance(db: &TestDb, offset: Option<&str>) -> Child {
    let args = [
        "run",
        "--http",
        "off",
        "--lock-mode",
        "advisory",
        "--reconcile-schedule",
        "*/5 * * * * *",
    ];
    let mut command = match offset {
        Some(offset) => {
            let mut command = std::process::Command::new("faketime");
            command.args(["-f", offset]).arg(common::binary());
            command
        }
        None => std::process::Command::new(common::binary()),
    };
    command
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start freight-kpi run; faketime comes from the Debian package faketime")
}

fn stop_instance(mut child: Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Runs `offsets.len()` instances of `freight-kpi run` and checks that each slot that
/// all of them saw ran exactly once, with the others logging SKIPPED.
async fn instances_share_slots(offsets: &[Option<&str>]) {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let instances: Vec<Child> = offsets
        .iter()
        .map(|offset| spawn_instance(&db, *offset))
        .collect();
    wait_until(
        "every instance to listen",
        Duration::from_secs(20),
        || async {
            client
                .query_one("SELECT count(*) FROM freight_kpi.listener", &[])
                .await
                .map(|row| row.get::<_, i64>(0) == offsets.len() as i64)
                .unwrap_or(false)
        },
    )
    .await;
    let all_started: DateTime<Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);

    // Two slots that every instance was up for.
    let seen = |per_slot: &BTreeMap<String, BTreeMap<String, usize>>| {
        per_slot
            .iter()
            .filter(|(slot, statuses)| {
                utc(slot) > all_started + TimeDelta::seconds(1)
                    && statuses.values().sum::<usize>() == offsets.len()
            })
            .count()
    };
    let mut per_slot = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while seen(&per_slot) < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        per_slot = statuses_per_slot(&client).await;
    }
    let now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    for child in instances {
        stop_instance(child);
    }

    assert!(
        seen(&per_slot) >= 2,
        "fewer than two complete slots: {per_slot:?}"
    );
    for (slot, statuses) in per_slot
        .iter()
        .filter(|(slot, _)| utc(slot) > all_started + TimeDelta::seconds(1))
    {
        if statuses.values().sum::<usize>() < offsets.len() {
            continue; // a slot still in flight when the instances stopped
        }
        assert_eq!(
            statuses.get("SUCCESS"),
            Some(&1),
            "slot {slot}: {statuses:?}"
        );
        assert_eq!(
            statuses.get("SKIPPED"),
            Some(&(offsets.len() - 1)),
            "slot {slot}: {statuses:?}"
        );
    }
    // Slots come from the database's clock: none lies in its future, and no run
    // started before its slot.
    for slot in per_slot.keys() {
        assert!(
            utc(slot) <= now,
            "slot {slot} is after the database's now {now}"
        );
    }
    let early: i64 = client
        .query_one(
            r#"SELECT count(*) FROM freight_kpi.job_slot s JOIN "JobRunLog" r ON r.id = s.run_id
               WHERE r."startedAt" < s.scheduled_for"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(early, 0);
}

#[tokio::test]
async fn two_skewed_instances_run_slot_once() {
    instances_share_slots(&[None, Some("+5m")]).await;
}

#[tokio::test]
async fn three_skewed_instances_run_slot_once() {
    instances_share_slots(&[None, Some("-3m"), Some("+90s")]).await;
}

#[tokio::test]
async fn missed_slot_caught_up_once_late() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let hooks = HookServer::start(HookAnswer::Ok).await;

    // Up before the 07:30 slot, then every instance down until 09:30.
    let before = start_scheduled(
        &db,
        "30 7 * * *",
        "UTC",
        FastClock::new(utc("2026-05-04T07:00:00Z"), 1.0),
        None,
    )
    .await;
    before.stop().await;
    assert!(slot_runs(&client).await.is_empty());

    let late = start_scheduled(
        &db,
        "30 7 * * *",
        "UTC",
        FastClock::new(utc("2026-05-04T09:30:00Z"), 1.0),
        Some(hook_settings(&hooks)),
    )
    .await;
    wait_until(
        "the missed slot to run",
        Duration::from_secs(20),
        || async {
            slot_runs(&client)
                .await
                .iter()
                .any(|(_, status)| status.as_deref() == Some("SUCCESS"))
        },
    )
    .await;
    late.stop().await;
    let again = start_scheduled(
        &db,
        "30 7 * * *",
        "UTC",
        FastClock::new(utc("2026-05-04T09:31:00Z"), 1.0),
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    again.stop().await;

    assert_eq!(
        slot_runs(&client).await,
        vec![(utc("2026-05-04T07:30:00Z"), Some("SUCCESS".to_owned()))]
    );
    let runs = runs_with_status(&client, "SUCCESS").await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let late_by = runs[0].stats.as_ref().unwrap()["late_by_seconds"]
        .as_f64()
        .unwrap();
    assert!((7_200.0..7_260.0).contains(&late_by), "late by {late_by} s");
    assert_eq!(hooks.of_kind("/slack", "missed_slot").len(), 1);
    assert_eq!(hooks.of_kind("/pagerduty", "missed_slot").len(), 1);
}

#[tokio::test]
async fn first_start_does_not_catch_up_earlier_slot() {
    let db = TestDb::migrated().await;
    let client = db.client().await;

    let service = start_scheduled(
        &db,
        "30 7 * * *",
        "UTC",
        FastClock::new(utc("2026-05-04T09:30:00Z"), 1.0),
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    service.stop().await;

    assert!(slot_runs(&client).await.is_empty());
}

/// Runs the scheduler through `from`..`until` with a clock 20,000 times faster than
/// real time and returns the claimed slots and their runs' status.
async fn slots_through(
    cron: &str,
    zone: &str,
    from: &str,
    until: &str,
) -> Vec<(DateTime<Utc>, Option<String>)> {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let clock = FastClock::new(utc(from), 20_000.0);
    let service = start_scheduled(&db, cron, zone, clock.clone(), None).await;
    let end = utc(until);
    wait_until(
        "the clock to pass the window",
        Duration::from_secs(60),
        || async { clock.now() > end },
    )
    .await;
    // Let a run in flight finish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    service.stop().await;
    slot_runs(&client)
        .await
        .into_iter()
        .filter(|(slot, _)| *slot <= end)
        .collect()
}

#[tokio::test]
async fn dst_skipped_time_runs_once_after_jump() {
    // Berlin jumps from 02:00 CET to 03:00 CEST on 2026-03-29 (01:00 UTC).
    let slots = slots_through(
        "30 2 * * *",
        "Europe/Berlin",
        "2026-03-28T12:00:00Z",
        "2026-03-30T12:00:00Z",
    )
    .await;

    let success = Some("SUCCESS".to_owned());
    assert_eq!(
        slots,
        vec![
            (utc("2026-03-29T01:00:00Z"), success.clone()),
            (utc("2026-03-30T00:30:00Z"), success),
        ]
    );
}

#[tokio::test]
async fn dst_repeated_time_runs_once() {
    // Berlin goes back from 03:00 CEST to 02:00 CET on 2026-10-25 (01:00 UTC): 02:30
    // happens at 00:30 and again at 01:30 UTC.
    let slots = slots_through(
        "30 2 * * *",
        "Europe/Berlin",
        "2026-10-24T12:00:00Z",
        "2026-10-26T12:00:00Z",
    )
    .await;

    let success = Some("SUCCESS".to_owned());
    assert_eq!(
        slots,
        vec![
            (utc("2026-10-25T00:30:00Z"), success.clone()),
            (utc("2026-10-26T01:30:00Z"), success),
        ]
    );
}

#[tokio::test]
async fn retention_prunes_only_old_service_runs() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute(
            r#"INSERT INTO "JobRunLog" ("jobName", status, "startedAt", "endedAt")
               VALUES ('KPI_AGGREGATION', 'SUCCESS', now() - interval '100 days', now() - interval '100 days'),
                      ('KPI_AGGREGATION', 'SUCCESS', now() - interval '10 days', now() - interval '10 days'),
                      ('KPI_AGGREGATION', 'RUNNING', now() - interval '100 days', NULL),
                      ('CHURN_RECALC', 'SUCCESS', now() - interval '100 days', now() - interval '100 days')"#,
        )
        .await
        .unwrap();

    let service = start_scheduled(
        &db,
        "30 7 * * *",
        "UTC",
        FastClock::new(Utc::now(), 1.0),
        None,
    )
    .await;
    wait_until(
        "the old run to be pruned",
        Duration::from_secs(10),
        || async { run_rows(&client).await.len() == 3 },
    )
    .await;
    service.stop().await;

    let remaining: Vec<(String, String)> = run_rows(&client)
        .await
        .into_iter()
        .map(|run| (run.job, run.status))
        .collect();
    assert_eq!(
        remaining,
        vec![
            ("KPI_AGGREGATION".to_owned(), "SUCCESS".to_owned()),
            ("KPI_AGGREGATION".to_owned(), "RUNNING".to_owned()),
            ("CHURN_RECALC".to_owned(), "SUCCESS".to_owned()),
        ]
    );
}

#[tokio::test]
async fn incremental_summary_rows_follow_interval() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut settings = test_settings(&db);
    settings.jobs.scheduler = None;
    settings.jobs.summary_interval = Duration::from_secs(1);
    let service = start_service(&db, settings).await;
    let started = std::time::Instant::now();

    for venture in 0..20 {
        client
            .execute(
                r#"INSERT INTO "Load" ("ventureId", "createdAt") VALUES ($1, now())"#,
                &[&venture],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summaries = || async {
        run_rows(&client)
            .await
            .into_iter()
            .filter(|run| {
                run.stats
                    .as_ref()
                    .is_some_and(|stats| stats["kind"] == "incremental_summary")
            })
            .collect::<Vec<_>>()
    };
    let consumed = |rows: &[RunRow]| -> u64 {
        rows.iter()
            .map(|run| {
                run.stats.as_ref().unwrap()["changes_consumed"]
                    .as_u64()
                    .unwrap()
            })
            .sum()
    };
    wait_until(
        "the summaries to count every change",
        Duration::from_secs(15),
        || async { consumed(&summaries().await) == 20 },
    )
    .await;
    let rows = summaries().await;
    let batches = service.handles.stats.lock().unwrap().batches;
    let elapsed = started.elapsed();
    service.stop().await;

    let summed_batches: u64 = rows
        .iter()
        .map(|run| run.stats.as_ref().unwrap()["batches"].as_u64().unwrap())
        .sum();
    assert_eq!(summed_batches, batches);
    assert!(
        rows.len() as u64 <= elapsed.as_secs() + 1,
        "{} summary rows in {elapsed:?}",
        rows.len()
    );
    assert!(rows.iter().all(|run| run.status == "SUCCESS"));
    assert!(rows
        .iter()
        .any(|run| run.stats.as_ref().unwrap()["freshness_ms"]["p99"].is_number()));
}

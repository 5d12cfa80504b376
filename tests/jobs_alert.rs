//! Alerts against a real PostgreSQL and a local HTTP server: each kind fires once per
//! event on both sinks, critical jobs are marked, retries are bounded, a hanging sink
//! never delays the job, and no body carries the database password.

mod common;
mod jobs_common;

use std::time::{Duration, Instant};

use common::{start_service, test_settings, wait_until, TestDb};
use freight_kpi::jobs::{
    Acquired, AlertSender, AlertSettings, JobContext, JobName, JobRun, LockMode, RunStatus, Trigger,
};
use freight_kpi::reconcile::{reconcile_job, ReconcileOptions};
use jobs_common::*;
use tokio_util::sync::CancellationToken;

fn advisory() -> freight_kpi::jobs::LockSettings {
    lock_settings(
        LockMode::Advisory,
        Duration::from_secs(3600),
        Duration::from_secs(2),
    )
}

async fn reconcile(context: &JobContext) -> JobRun<freight_kpi::kpi::FullPassSummary> {
    reconcile_job(
        context,
        &ReconcileOptions::default(),
        Trigger::Manual,
        &CancellationToken::new(),
    )
    .await
    .expect("the run is logged")
}

/// Waits until both sinks received `count` alerts of `kind`, then a little longer so
/// that a repeat would show.
async fn wait_for_alerts(hooks: &HookServer, kind: &str, count: usize) {
    wait_until(
        &format!("{count} {kind} alerts on both sinks"),
        Duration::from_secs(15),
        || async {
            hooks.of_kind("/slack", kind).len() >= count
                && hooks.of_kind("/pagerduty", kind).len() >= count
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn error_run_alerts_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let hooks = HookServer::start(HookAnswer::Ok).await;
    let (alerts, dispatcher) = start_alerts(&hook_settings(&hooks));
    let context = context_with_alerts(&db.target, advisory(), alerts);
    // The pass fails as a whole when the KPI table is missing.
    client
        .batch_execute(r#"ALTER TABLE "FreightKpiDaily" RENAME TO "FreightKpiDailyAway""#)
        .await
        .unwrap();

    let run = reconcile(&context).await;
    wait_for_alerts(&hooks, "run_error", 1).await;
    dispatcher.finish(Duration::from_secs(1)).await;

    let JobRun::Finished { run_id, status, .. } = run else {
        panic!("the run is not skipped");
    };
    assert_eq!(status, RunStatus::Error);
    let slack = hooks.of_kind("/slack", "run_error");
    let pagerduty = hooks.of_kind("/pagerduty", "run_error");
    assert_eq!(slack.len(), 1);
    assert_eq!(pagerduty.len(), 1);
    assert_eq!(slack[0].body["freight_kpi"]["run_id"], run_id);
    assert!(slack[0].body["text"]
        .as_str()
        .unwrap()
        .contains("FreightKpiDaily"));
    assert_eq!(
        pagerduty[0].body["payload"]["custom_details"]["run_id"],
        run_id
    );
}

#[tokio::test]
async fn partial_run_alerts_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let hooks = HookServer::start(HookAnswer::Ok).await;
    let (alerts, dispatcher) = start_alerts(&hook_settings(&hooks));
    let context = context_with_alerts(&db.target, advisory(), alerts);
    // 200 loads of the largest bill make a revenue that numeric(14,2) cannot hold.
    client
        .batch_execute(
            r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
               SELECT 7, 'DELIVERED', 9999999999.99, 0, now(), now() FROM generate_series(1, 200)"#,
        )
        .await
        .unwrap();

    let run = reconcile(&context).await;
    wait_for_alerts(&hooks, "run_partial", 1).await;
    dispatcher.finish(Duration::from_secs(1)).await;

    assert!(
        matches!(
            run,
            JobRun::Finished {
                status: RunStatus::Partial,
                ..
            }
        ),
        "{run:?}"
    );
    assert_eq!(hooks.of_kind("/slack", "run_partial").len(), 1);
    assert_eq!(hooks.of_kind("/pagerduty", "run_partial").len(), 1);
}

#[tokio::test]
async fn drift_alerts_once_per_reconcile() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let hooks = HookServer::start(HookAnswer::Ok).await;
    let (alerts, dispatcher) = start_alerts(&hook_settings(&hooks));
    let context = context_with_alerts(&db.target, advisory(), alerts);
    make_drift(&client).await;

    reconcile(&context).await;
    // The repaired table has no drift left, so a second pass alerts nothing.
    reconcile(&context).await;
    wait_for_alerts(&hooks, "drift", 1).await;
    dispatcher.finish(Duration::from_secs(1)).await;

    let slack = hooks.of_kind("/slack", "drift");
    assert_eq!(slack.len(), 1);
    assert_eq!(hooks.of_kind("/pagerduty", "drift").len(), 1);
    assert!(
        slack[0].body["freight_kpi"]["details"]["drifted"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test]
async fn abandoned_run_alerts_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let hooks = HookServer::start(HookAnswer::Ok).await;
    let (alerts, dispatcher) = start_alerts(&hook_settings(&hooks));
    let context = context_with_alerts(&db.target, advisory(), alerts);

    // A holder that takes the lock, writes RUNNING and dies: its lock connection closes.
    {
        let Acquired::Held(lock) = context
            .locks
            .try_acquire(JobName::KpiAggregation)
            .await
            .unwrap()
        else {
            panic!("the lock is free");
        };
        let holder = lock.holder("dead-holder", None);
        freight_kpi::jobs::start_held_run(&client, JobName::KpiAggregation, &holder)
            .await
            .unwrap();
        drop(lock);
    }
    let mut finished = false;
    for _ in 0..100 {
        if !matches!(reconcile(&context).await, JobRun::Skipped { .. }) {
            finished = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(finished);
    reconcile(&context).await;
    wait_for_alerts(&hooks, "abandoned", 1).await;
    dispatcher.finish(Duration::from_secs(1)).await;

    assert_eq!(hooks.of_kind("/slack", "abandoned").len(), 1);
    assert_eq!(hooks.of_kind("/pagerduty", "abandoned").len(), 1);
    assert_eq!(runs_with_status(&client, "ABANDONED").await.len(), 1);
}

#[tokio::test]
async fn freshness_lag_alerts_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let hooks = HookServer::start(HookAnswer::Ok).await;
    let mut settings = test_settings(&db);
    settings.jobs.scheduler = None;
    settings.jobs.alerts = hook_settings(&hooks);
    settings.jobs.health.interval = Duration::from_millis(100);
    settings.jobs.health.freshness_lag = Duration::from_secs(1);
    let service = start_service(&db, settings).await;

    // Holding every bucket stripe keeps the batch waiting, so the change stays pending.
    client
        .batch_execute("SELECT pg_advisory_lock(x'464B5049'::integer, key) FROM generate_series(1000, 1127) AS key")
        .await
        .unwrap();
    client
        .batch_execute(r#"INSERT INTO "Load" ("ventureId") VALUES (1)"#)
        .await
        .unwrap();
    wait_for_alerts(&hooks, "freshness_lag", 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    client
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    service.stop().await;

    assert_eq!(hooks.of_kind("/slack", "freshness_lag").len(), 1);
    assert_eq!(hooks.of_kind("/pagerduty", "freshness_lag").len(), 1);
}

#[tokio::test]
async fn notification_queue_usage_alerts_once() {
    let db = TestDb::migrated().await;
    let hooks = HookServer::start(HookAnswer::Ok).await;
    let mut settings = test_settings(&db);
    settings.jobs.scheduler = None;
    settings.jobs.alerts = hook_settings(&hooks);
    settings.jobs.health.interval = Duration::from_millis(100);
    // 0.001 % of the queue; a few pages of unread notifications exceed it.
    settings.jobs.health.notification_queue = 0.000_01;
    let service = start_service(&db, settings).await;

    // A session that listens and stays in a transaction reads nothing, so the
    // notifications sent meanwhile stay queued.
    let stalled = db.client().await;
    stalled
        .batch_execute("LISTEN jobs_test_stall")
        .await
        .unwrap();
    stalled.batch_execute("BEGIN").await.unwrap();
    let sender = db.client().await;
    sender
        // Payloads differ, since equal ones sent in one transaction are folded into one.
        .batch_execute("SELECT pg_notify('jobs_test_stall', repeat('x', 7000) || i) FROM generate_series(1, 200) AS i")
        .await
        .unwrap();
    wait_for_alerts(&hooks, "notification_queue", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stalled.batch_execute("COMMIT; UNLISTEN *").await.unwrap();
    service.stop().await;

    assert_eq!(hooks.of_kind("/slack", "notification_queue").len(), 1);
    assert_eq!(hooks.of_kind("/pagerduty", "notification_queue").len(), 1);
}

#[tokio::test]
async fn critical_job_marked_critical() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    make_drift(&client).await;
    let hooks = HookServer::start(HookAnswer::Ok).await;
    let (alerts, dispatcher) = start_alerts(&hook_settings(&hooks));
    reconcile(&context_with_alerts(&db.target, advisory(), alerts)).await;
    wait_for_alerts(&hooks, "drift", 1).await;
    dispatcher.finish(Duration::from_secs(1)).await;

    let pagerduty = hooks.of_kind("/pagerduty", "drift");
    assert_eq!(pagerduty[0].body["payload"]["severity"], "critical");
    assert_eq!(pagerduty[0].body["event_action"], "trigger");
    let slack = hooks.of_kind("/slack", "drift");
    assert!(slack[0].body["text"]
        .as_str()
        .unwrap()
        .starts_with("[critical]"));
    let dedup = pagerduty[0].body["dedup_key"].as_str().unwrap();
    assert!(dedup.contains("KPI_AGGREGATION/drift"), "{dedup}");
}

#[tokio::test]
async fn non_critical_job_alerts_as_warning() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    make_drift(&client).await;
    let hooks = HookServer::start(HookAnswer::Ok).await;
    let mut settings = hook_settings(&hooks);
    settings.critical_jobs = vec![JobName::ChurnRecalc];
    let (alerts, dispatcher) = start_alerts(&settings);
    reconcile(&context_with_alerts(&db.target, advisory(), alerts)).await;
    wait_for_alerts(&hooks, "drift", 1).await;
    dispatcher.finish(Duration::from_secs(1)).await;

    assert_eq!(
        hooks.of_kind("/pagerduty", "drift")[0].body["payload"]["severity"],
        "warning"
    );
}

#[tokio::test]
async fn failing_sink_retried_bounded_times() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    make_drift(&client).await;
    let hooks = HookServer::start(HookAnswer::Status(503)).await;
    let mut settings = hook_settings(&hooks);
    settings.attempts = 3;
    let (alerts, dispatcher) = start_alerts(&settings);
    reconcile(&context_with_alerts(&db.target, advisory(), alerts)).await;
    dispatcher.finish(Duration::from_secs(10)).await;

    assert_eq!(hooks.of_kind("/slack", "drift").len(), 3);
    assert_eq!(hooks.of_kind("/pagerduty", "drift").len(), 3);
}

#[tokio::test]
async fn rejected_alert_not_retried() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    make_drift(&client).await;
    let hooks = HookServer::start(HookAnswer::Status(400)).await;
    let (alerts, dispatcher) = start_alerts(&hook_settings(&hooks));
    reconcile(&context_with_alerts(&db.target, advisory(), alerts)).await;
    dispatcher.finish(Duration::from_secs(10)).await;

    assert_eq!(hooks.of_kind("/slack", "drift").len(), 1);
}

#[tokio::test]
async fn hanging_sink_does_not_delay_job() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    make_drift(&client).await;
    let hooks = HookServer::start(HookAnswer::Hang).await;
    let mut settings = hook_settings(&hooks);
    settings.timeout = Duration::from_secs(30);
    let (alerts, dispatcher) = start_alerts(&settings);
    let context = context_with_alerts(&db.target, advisory(), alerts.clone());

    let started = Instant::now();
    let run = reconcile(&context).await;
    // Far more alerts than the queue holds: the extra ones are dropped, not waited for.
    for _ in 0..1_000 {
        alerts.send(freight_kpi::jobs::Alert::new(
            freight_kpi::jobs::AlertKind::Drift,
            JobName::KpiAggregation,
            "flood",
        ));
    }
    let elapsed = started.elapsed();
    dispatcher.finish(Duration::from_millis(100)).await;

    assert!(matches!(
        run,
        JobRun::Finished {
            status: RunStatus::Success,
            ..
        }
    ));
    assert!(elapsed < Duration::from_secs(5), "the run took {elapsed:?}");
    assert!(alerts.dropped() > 0);
}

#[tokio::test]
async fn alert_bodies_never_contain_password() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let password = "hunter2-jobs-secret";
    // The test server trusts local connections, so the password is sent and ignored.
    let target =
        freight_kpi::db::DatabaseTarget::parse(&format!("{} password={password}", db.url()))
            .unwrap();
    let hooks = HookServer::start(HookAnswer::Ok).await;
    let (alerts, dispatcher) = start_alerts(&hook_settings(&hooks));
    let context = context_with_alerts(&target, advisory(), alerts);
    make_drift(&client).await;
    client
        .batch_execute(r#"ALTER TABLE "FreightKpiDaily" RENAME TO "FreightKpiDailyAway""#)
        .await
        .unwrap();

    reconcile(&context).await;
    wait_for_alerts(&hooks, "run_error", 1).await;
    dispatcher.finish(Duration::from_secs(1)).await;

    let received = hooks.received();
    assert!(!received.is_empty());
    for hook in received {
        assert!(!hook.raw.contains(password), "{}", hook.raw);
    }
}

#[tokio::test]
async fn pagerduty_without_routing_key_rejected() {
    let mut settings = AlertSettings::new("test");
    settings.pagerduty_url = Some("http://127.0.0.1:9/v2/enqueue".to_owned());

    let error = settings.validate().unwrap_err();

    assert!(
        error.to_string().contains("--alert-pagerduty-routing-key"),
        "{error}"
    );
    let _ = AlertSender::log_only();
}

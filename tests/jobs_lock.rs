//! Job locks against a real PostgreSQL: advisory locks and table leases, their
//! release on kill, cancellation and panic, lock loss mid-run, fencing tokens, the
//! auto mode behind a real PgBouncer, and ABANDONED marking.

mod common;
mod jobs_common;

use std::time::{Duration, Instant};

use common::{kpi_mismatches, start_service, test_settings, wait_until, TestDb};
use freight_kpi::jobs::{
    job_lock_key, Acquired, Fence, JobLocks, JobName, JobRun, LockMode, ResolvedLockMode,
    RunStatus, Trigger,
};
use freight_kpi::reconcile::{full_pass_fenced, reconcile_job, ReconcileOptions};
use freight_kpi::Error;
use jobs_common::*;
use tokio_util::sync::CancellationToken;

const JOB: JobName = JobName::KpiAggregation;

fn advisory() -> freight_kpi::jobs::LockSettings {
    lock_settings(
        LockMode::Advisory,
        Duration::from_secs(3600),
        Duration::from_secs(2),
    )
}

fn table(lease_timeout: Duration) -> freight_kpi::jobs::LockSettings {
    lock_settings(LockMode::Table, lease_timeout, Duration::from_millis(500))
}

fn locks(db: &TestDb, settings: freight_kpi::jobs::LockSettings) -> JobLocks {
    JobLocks::new(
        db.target.pool(4).unwrap(),
        settings,
        freight_kpi::jobs::new_holder_id(),
    )
}

fn is_held(acquired: &Acquired) -> bool {
    matches!(acquired, Acquired::Held(_))
}

#[tokio::test]
async fn advisory_lock_excludes_second_holder() {
    let db = TestDb::migrated().await;
    let first = locks(&db, advisory());
    let second = locks(&db, advisory());

    let held = first.try_acquire(JOB).await.unwrap();
    let refused = second.try_acquire(JOB).await.unwrap();
    assert!(is_held(&held));
    assert!(!is_held(&refused));

    let Acquired::Held(lock) = held else {
        unreachable!()
    };
    lock.release().await.unwrap();
    assert!(is_held(&second.try_acquire(JOB).await.unwrap()));
}

#[tokio::test]
async fn lease_excludes_second_holder_until_expiry() {
    let db = TestDb::migrated().await;
    let first = locks(&db, table(Duration::from_secs(2)));
    let second = locks(&db, table(Duration::from_secs(2)));

    let Acquired::Held(lock) = first.try_acquire(JOB).await.unwrap() else {
        panic!("the first holder gets the lease");
    };
    assert_eq!(lock.mode(), ResolvedLockMode::Table);
    assert!(!is_held(&second.try_acquire(JOB).await.unwrap()));

    lock.release().await.unwrap();
    assert!(is_held(&second.try_acquire(JOB).await.unwrap()));
}

#[tokio::test]
async fn application_small_key_lock_does_not_block_ours() {
    let db = TestDb::migrated().await;
    let application = db.client().await;
    // The application's own locks: the one-key form on a small integer and on the
    // number of our job lock's second key.
    application
        .batch_execute(&format!(
            "SELECT pg_advisory_lock(1); SELECT pg_advisory_lock({});",
            job_lock_key(JOB)
        ))
        .await
        .unwrap();

    let acquired = locks(&db, advisory()).try_acquire(JOB).await.unwrap();

    assert!(is_held(&acquired));
}

#[tokio::test]
async fn advisory_and_table_holders_exclude_each_other() {
    let db = TestDb::migrated().await;
    let by_lease = locks(&db, table(Duration::from_secs(60)));
    let by_advisory = locks(&db, advisory());

    let Acquired::Held(lease) = by_lease.try_acquire(JOB).await.unwrap() else {
        panic!("the lease is free");
    };
    assert!(!is_held(&by_advisory.try_acquire(JOB).await.unwrap()));
    lease.release().await.unwrap();

    let Acquired::Held(_advisory) = by_advisory.try_acquire(JOB).await.unwrap() else {
        panic!("the advisory lock is free");
    };
    assert!(!is_held(&by_lease.try_acquire(JOB).await.unwrap()));
}

#[tokio::test]
async fn cancelled_acquires_leave_no_advisory_lock() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let locks = locks(&db, advisory());
    let key = job_lock_key(JOB);

    for _ in 0..1_000 {
        let _ = tokio::time::timeout(Duration::from_millis(1), locks.try_acquire(JOB)).await;
    }

    // Timeouts spread around the time one acquire takes, so that many are cancelled
    // after the server granted the lock and before the caller got it.
    let started = Instant::now();
    if let Acquired::Held(lock) = locks.try_acquire(JOB).await.unwrap() {
        lock.release().await.unwrap();
    }
    let one_acquire = started.elapsed();
    let (mut completed, mut cancelled) = (0, 0);
    for step in 0..200u32 {
        let limit = one_acquire * 2 * step / 200;
        match tokio::time::timeout(limit, locks.try_acquire(JOB)).await {
            Ok(_) => completed += 1,
            Err(_) => cancelled += 1,
        }
    }
    assert!(completed > 0, "no acquire finished in time");
    assert!(cancelled > 0, "no acquire was cancelled");

    wait_until("no job lock held", Duration::from_secs(10), || async {
        job_locks_held(&client, key).await == 0
    })
    .await;
    assert!(is_held(&locks.try_acquire(JOB).await.unwrap()));
}

#[tokio::test]
async fn cancelled_acquires_leave_no_lease() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let locks = locks(&db, table(Duration::from_secs(3600)));

    for step in 0..1_000u32 {
        // 1 ms for most, and a spread of longer limits that cancel later stages.
        let limit = Duration::from_micros(1_000 + u64::from(step % 50) * 200);
        let _ = tokio::time::timeout(limit, locks.try_acquire(JOB)).await;
    }

    // Acquisitions spawned by cancelled calls may still be running: wait until the
    // lease is free and its generation has stopped moving.
    let lease_state = || async {
        let row = client
            .query_one(
                "SELECT holder_id, generation FROM freight_kpi.job_lease WHERE job_name = $1",
                &[&JOB.as_str()],
            )
            .await
            .unwrap();
        (row.get::<_, Option<String>>(0), row.get::<_, i64>(1))
    };
    let mut previous = lease_state().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let current = lease_state().await;
        if current == previous && current.0.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lease never settled: {current:?}"
        );
        previous = current;
    }
    let generation = previous.1;
    assert!(
        generation > 0,
        "no cancelled acquisition ever took the lease"
    );
    assert!(is_held(&locks.try_acquire(JOB).await.unwrap()));
}

#[tokio::test]
async fn panicking_holder_releases_both_lock_kinds() {
    let db = TestDb::migrated().await;
    for settings in [advisory(), table(Duration::from_secs(3600))] {
        let holder = locks(&db, settings);
        let panicked = tokio::spawn(async move {
            let _lock = holder.try_acquire(JOB).await.unwrap();
            panic!("the job panics while it holds the lock");
        })
        .await;
        assert!(panicked.is_err());

        let other = locks(&db, settings);
        let mut acquired = false;
        for _ in 0..100 {
            if let Acquired::Held(lock) = other.try_acquire(JOB).await.unwrap() {
                lock.release().await.unwrap();
                acquired = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            acquired,
            "{:?} lock still held after the panic",
            settings.mode
        );
    }
}

/// Starts `freight-kpi reconcile` with `args`, blocked after it logged RUNNING, and
/// returns it once its RUNNING row exists.
async fn start_blocked_reconcile(
    db: &TestDb,
    client: &tokio_postgres::Client,
    args: &[&str],
) -> std::process::Child {
    block_reconciles(client).await;
    let mut all = vec!["reconcile"];
    all.extend_from_slice(args);
    let child = spawn_binary(db, &all);
    wait_for_status(client, "RUNNING", Duration::from_secs(20)).await;
    child
}

#[tokio::test]
async fn killed_holder_releases_advisory_lock_at_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut child = start_blocked_reconcile(&db, &client, &["--lock-mode", "advisory"]).await;
    let other = locks(&db, advisory());
    assert!(!is_held(&other.try_acquire(JOB).await.unwrap()));

    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = Instant::now();
    let mut lock = None;
    while killed_at.elapsed() < Duration::from_secs(10) {
        if let Acquired::Held(held) = other.try_acquire(JOB).await.unwrap() {
            lock = Some(held);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert!(
        lock.is_some(),
        "the lock of the killed holder was not released"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(2),
        "released only after {:?}",
        killed_at.elapsed()
    );
    unblock_reconciles(&client).await;
}

#[tokio::test]
async fn killed_holder_releases_lease_after_expiry() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut child = start_blocked_reconcile(
        &db,
        &client,
        &[
            "--lock-mode",
            "table",
            "--lease-timeout-ms",
            "3000",
            "--lock-heartbeat-ms",
            "500",
        ],
    )
    .await;

    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = Instant::now();
    let other = locks(&db, table(Duration::from_secs(3)));
    assert!(!is_held(&other.try_acquire(JOB).await.unwrap()));

    let mut taken = false;
    while killed_at.elapsed() < Duration::from_secs(15) {
        if is_held(&other.try_acquire(JOB).await.unwrap()) {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(taken, "the lease of the killed holder never expired");
    // The last renewal was at most one heartbeat before the kill.
    assert!(
        killed_at.elapsed() >= Duration::from_millis(2_400),
        "taken over after only {:?}",
        killed_at.elapsed()
    );
    unblock_reconciles(&client).await;
}

#[tokio::test]
async fn killed_run_marked_abandoned_by_next_run() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut child = start_blocked_reconcile(&db, &client, &["--lock-mode", "advisory"]).await;
    child.kill().unwrap();
    child.wait().unwrap();
    unblock_reconciles(&client).await;

    let context = context_on(&db.target, advisory());
    let run = reconcile_job(
        &context,
        &ReconcileOptions::default(),
        Trigger::Manual,
        &CancellationToken::new(),
    )
    .await
    .unwrap();

    assert!(matches!(
        run,
        JobRun::Finished {
            status: RunStatus::Success,
            ..
        }
    ));
    let abandoned = runs_with_status(&client, "ABANDONED").await;
    assert_eq!(abandoned.len(), 1);
    let reason = abandoned[0].error.clone().unwrap_or_default();
    assert!(reason.contains("died"), "{reason}");
    assert!(abandoned[0].ended);
}

#[tokio::test]
async fn killed_run_marked_abandoned_by_next_start() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut child = start_blocked_reconcile(&db, &client, &["--lock-mode", "advisory"]).await;
    child.kill().unwrap();
    child.wait().unwrap();
    unblock_reconciles(&client).await;

    let mut settings = test_settings(&db);
    settings.jobs.scheduler = None;
    settings.jobs.lock = advisory();
    let service = start_service(&db, settings).await;

    let abandoned = wait_for_status(&client, "ABANDONED", Duration::from_secs(10)).await;
    let reason = abandoned.error.unwrap_or_default();
    assert!(reason.contains("advisory lock"), "{reason}");
    assert!(runs_with_status(&client, "RUNNING").await.is_empty());
    service.stop().await;
}

#[tokio::test]
async fn lock_backend_terminated_ends_run_lock_lost() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    make_drift(&client).await;
    block_reconciles(&client).await;
    let heartbeat = Duration::from_secs(2);
    let context = context_on(
        &db.target,
        lock_settings(LockMode::Advisory, Duration::from_secs(3600), heartbeat),
    );
    let run = tokio::spawn(async move {
        reconcile_job(
            &context,
            &ReconcileOptions::default(),
            Trigger::Manual,
            &CancellationToken::new(),
        )
        .await
    });
    wait_for_status(&client, "RUNNING", Duration::from_secs(10)).await;

    let terminated_at = Instant::now();
    let terminated: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'freight-kpi lock') AS t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(terminated, 1);
    let failed = wait_for_status(&client, "ERROR", heartbeat * 2).await;

    assert!(
        terminated_at.elapsed() <= heartbeat,
        "noticed after {:?}",
        terminated_at.elapsed()
    );
    let reason = failed.error.unwrap_or_default();
    assert!(reason.contains("lock lost"), "{reason}");
    assert!(matches!(
        run.await.unwrap().unwrap(),
        JobRun::Finished {
            status: RunStatus::Error,
            ..
        }
    ));

    // Stopped writing: once the bucket lock is free, the drift is still there.
    unblock_reconciles(&client).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!kpi_mismatches(&client).await.is_empty());
}

#[tokio::test]
async fn stalled_lease_holder_write_rejected() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    make_drift(&client).await;
    let pool = db.target.pool(4).unwrap();
    // A heartbeat of an hour never renews: the holder stalls.
    let stalled = locks(
        &db,
        lock_settings(
            LockMode::Table,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        ),
    );
    let Acquired::Held(stale_lock) = stalled.try_acquire(JOB).await.unwrap() else {
        panic!("the lease is free");
    };
    let stale_fence = stale_lock.fence(stalled.holder_id());

    let successor = locks(&db, table(Duration::from_secs(60)));
    let mut taken = None;
    for _ in 0..100 {
        if let Acquired::Held(lock) = successor.try_acquire(JOB).await.unwrap() {
            taken = Some(lock);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh_lock = taken.expect("the successor takes the expired lease over");
    let fresh_fence = fresh_lock.fence(successor.holder_id());

    let late = full_pass_fenced(&pool, &ReconcileOptions::default(), &stale_fence).await;
    assert!(
        matches!(late, Err(Error::Fenced { token: 1, .. })),
        "{late:?}"
    );
    assert!(!kpi_mismatches(&client).await.is_empty());

    let current = full_pass_fenced(&pool, &ReconcileOptions::default(), &fresh_fence).await;
    assert!(current.is_ok(), "{current:?}");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn expired_lease_write_rejected_without_successor() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    make_drift(&client).await;
    let pool = db.target.pool(2).unwrap();
    let stalled = locks(
        &db,
        lock_settings(
            LockMode::Table,
            Duration::from_millis(300),
            Duration::from_secs(3600),
        ),
    );
    let Acquired::Held(lock) = stalled.try_acquire(JOB).await.unwrap() else {
        panic!("the lease is free");
    };
    tokio::time::sleep(Duration::from_millis(600)).await;

    let late = full_pass_fenced(
        &pool,
        &ReconcileOptions::default(),
        &lock.fence(stalled.holder_id()),
    )
    .await;

    assert!(matches!(late, Err(Error::Fenced { .. })), "{late:?}");
}

#[tokio::test]
async fn unlocked_fence_accepts_write() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    make_drift(&client).await;

    let pass = full_pass_fenced(
        &db.target.pool(2).unwrap(),
        &ReconcileOptions::default(),
        &Fence::Unlocked,
    )
    .await;

    assert!(pass.is_ok(), "{pass:?}");
    assert_eq!(kpi_mismatches(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn auto_mode_direct_uses_advisory() {
    let db = TestDb::migrated().await;

    let mode = locks(
        &db,
        lock_settings(
            LockMode::Auto,
            Duration::from_secs(60),
            Duration::from_secs(2),
        ),
    )
    .mode()
    .await
    .unwrap();

    assert_eq!(mode, ResolvedLockMode::Advisory);
}

#[tokio::test]
async fn auto_mode_behind_pgbouncer_uses_lease() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let bouncer = PgBouncer::start(server_port(&db)).await;
    let target = bouncer.target(&db.name);
    let context = context_on(
        &target,
        lock_settings(
            LockMode::Auto,
            Duration::from_secs(60),
            Duration::from_secs(2),
        ),
    );

    assert_eq!(context.locks.mode().await.unwrap(), ResolvedLockMode::Table);
    let run = reconcile_job(
        &context,
        &ReconcileOptions::default(),
        Trigger::Manual,
        &CancellationToken::new(),
    )
    .await
    .unwrap();

    assert!(
        matches!(
            run,
            JobRun::Finished {
                status: RunStatus::Success,
                ..
            }
        ),
        "{run:?}"
    );
    let mode: String = client
        .query_one("SELECT lock_mode FROM freight_kpi.job_run_holder", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "table");
    let generation: i64 = client
        .query_one(
            "SELECT generation FROM freight_kpi.job_lease WHERE job_name = 'KPI_AGGREGATION'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(generation, 1);
}

#[tokio::test]
async fn manual_reconcile_exits_3_when_lock_held() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let holder = locks(&db, advisory());
    let Acquired::Held(_lock) = holder.try_acquire(JOB).await.unwrap() else {
        panic!("the lock is free");
    };

    let output = tokio::task::spawn_blocking({
        let child = spawn_binary(&db, &["reconcile", "--lock-mode", "advisory"]);
        move || child.wait_with_output().unwrap()
    })
    .await
    .unwrap();

    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let skipped = runs_with_status(&client, "SKIPPED").await;
    assert_eq!(skipped.len(), 1);
    assert_eq!(
        skipped[0]
            .stats
            .as_ref()
            .and_then(|stats| stats["reason"].as_str()),
        Some("lock held elsewhere")
    );
}

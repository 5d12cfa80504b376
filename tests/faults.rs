//! Faults around a running service: stopped, killed, cut off, silenced, run several
//! times at once, flooded with junk notifications, and a server restart under it.
//! After each, the KPIs must converge to the independent aggregation of "Load".
//!
//! Most tests set the fallback poll to an hour, so convergence within a few seconds
//! shows that the drain on (re)connect and the notifications work, not the poll.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::PrivateCluster;
use common::proxy::Proxy;
use common::{
    binary, connect, queue_depth, start_service, wait_for_empty_queue, wait_for_exact_kpis,
    wait_until, TestDb,
};
use freight_kpi::config::RunSettings;
use freight_kpi::db::DatabaseTarget;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// A fallback poll long enough never to fire during a test.
const NO_POLL: Duration = Duration::from_secs(3600);

/// Time the KPIs get to converge where only notifications or the drain on
/// (re)connect can bring them there. It is below the default 5 s poll, so a test
/// still checks that path if [`NO_POLL`] is set back to the default.
const QUICK: Duration = Duration::from_secs(4);

/// Sends the service's logs to the test output, shown for failing tests. RUST_LOG
/// sets the level (default warn).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Settings with the fallback poll out of the way.
fn settings_without_poll(target: DatabaseTarget) -> RunSettings {
    let mut settings = RunSettings::new(target);
    settings.poll_interval = NO_POLL;
    settings
}

/// The write statements of the background writers, each a valid write an application
/// or a person with psql could run: inserts of one or many loads, updates that change
/// status, amounts, venture or day, deletes, and a rolled-back insert. Loads fall in
/// 4 ventures over 6 days, so writers and batches keep hitting the same buckets.
const WRITES: [&str; 6] = [
    r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
       VALUES (1 + floor(random() * 4)::int,
               (enum_range(NULL::"LoadStatus"))[1 + floor(random() * 8)::int],
               round((random() * 1000)::numeric, 2), round((random() * 800)::numeric, 2),
               CASE WHEN random() < 0.7 THEN now() END,
               now() - floor(random() * 6) * interval '1 day')"#,
    r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
       SELECT 1 + floor(random() * 4)::int, 'DELIVERED',
              round((random() * 1000)::numeric, 2), round((random() * 800)::numeric, 2),
              now(), now() - floor(random() * 6) * interval '1 day'
       FROM generate_series(1, 10)"#,
    r#"UPDATE "Load"
       SET status = (enum_range(NULL::"LoadStatus"))[1 + floor(random() * 8)::int],
           "billAmount" = round((random() * 1000)::numeric, 2),
           "billingDate" = CASE WHEN random() < 0.7 THEN now() END
       WHERE id = (SELECT 1 + floor(random() * max(id))::bigint FROM "Load")"#,
    r#"UPDATE "Load"
       SET "ventureId" = 1 + floor(random() * 4)::int,
           "createdAt" = now() - floor(random() * 6) * interval '1 day'
       WHERE id = (SELECT 1 + floor(random() * max(id))::bigint FROM "Load")"#,
    r#"DELETE FROM "Load" WHERE id = (SELECT 1 + floor(random() * max(id))::bigint FROM "Load")"#,
    r#"BEGIN;
       INSERT INTO "Load" ("ventureId", status) VALUES (1, 'LOST');
       ROLLBACK"#,
];

/// Relative frequency of each entry of [`WRITES`].
const WRITE_WEIGHTS: [u32; 6] = [35, 10, 25, 10, 10, 10];

/// Background writers on their own connections, reconnecting when the server goes
/// away, until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Writers {
    fn start(target: &DatabaseTarget, count: usize) -> Writers {
        let writers = Writers {
            stop: Arc::new(AtomicBool::new(false)),
            committed: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
            last_error: Arc::new(Mutex::new(None)),
            tasks: Vec::new(),
        };
        let tasks = (0..count)
            .map(|_| {
                tokio::spawn(write_until_stopped(
                    target.clone(),
                    writers.stop.clone(),
                    writers.committed.clone(),
                    writers.failed.clone(),
                    writers.last_error.clone(),
                ))
            })
            .collect();
        Writers { tasks, ..writers }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Waits until the writers have committed `more` statements from now on.
    async fn wait_for_commits(&self, more: u64) {
        let target = self.committed() + more;
        wait_until(
            &format!("writers to commit {more} more statements"),
            Duration::from_secs(60),
            || async { self.committed() >= target },
        )
        .await;
    }

    /// Stops the writers and returns how many statements failed, with the last error.
    async fn stop(self) -> (u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a writer does not panic");
        }
        let last_error = self.last_error.lock().unwrap().clone();
        (self.failed.load(Ordering::Relaxed), last_error)
    }
}

async fn write_until_stopped(
    target: DatabaseTarget,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(writer) = client.as_ref().filter(|client| !client.is_closed()) else {
            client = try_connect(&target).await;
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        };

        let statement = pick_write();
        match writer.batch_execute(statement).await {
            Ok(()) => {
                committed.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                failed.fetch_add(1, Ordering::Relaxed);
                *last_error.lock().unwrap() = Some(error.to_string());
            }
        }
        // A short pause keeps the writers from taking both cores of a small machine.
        let pause = rand::random_range(1..5);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

fn pick_write() -> &'static str {
    let total: u32 = WRITE_WEIGHTS.iter().sum();
    let mut roll = rand::random_range(0..total);
    for (statement, weight) in WRITES.iter().zip(WRITE_WEIGHTS) {
        if roll < weight {
            return statement;
        }
        roll -= weight;
    }
    WRITES[0]
}

/// Connects like [`connect`], but returns `None` instead of panicking while the
/// server is down.
async fn try_connect(target: &DatabaseTarget) -> Option<Client> {
    let mut config = target.config().clone();
    config.application_name(common::TEST_APPLICATION_NAME);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(client)
}

/// Returns the backend pids of the service's listener connections to `database`.
async fn listener_pids(client: &Client, database: &str) -> HashSet<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'freight-kpi listener'",
            &[&database],
        )
        .await
        .expect("list listener backends")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Waits until a listener backend other than `old` exists.
async fn wait_for_new_listener(
    client: &Client,
    database: &str,
    old: &HashSet<i32>,
    timeout: Duration,
) {
    wait_until("a new listener connection", timeout, || async {
        listener_pids(client, database)
            .await
            .iter()
            .any(|pid| !old.contains(pid))
    })
    .await;
}

/// Inserts one load in a bucket no writer uses, so the KPIs differ until the service
/// handles it.
async fn insert_marker_load(client: &Client, venture_id: i32) {
    client
        .execute(
            r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate")
               VALUES ($1, 'DELIVERED', 250, 100, now())"#,
            &[&venture_id],
        )
        .await
        .expect("insert a marker load");
}

/// Inserts a marker load once the service's only listener is armed, so that the
/// insert notifies it, and checks that the KPIs converge within 2 seconds and that
/// the listener counted the wake-up. With the poll out of the way, this shows that
/// notifications reach the current listener connection.
async fn notified_marker_converges(
    client: &Client,
    counters: &freight_kpi::listen::ListenerCounters,
    venture_id: i32,
) {
    wait_until("the listener to arm", Duration::from_secs(5), || async {
        client
            .query_one("SELECT bool_and(armed) FROM freight_kpi.listener", &[])
            .await
            .map(|row| row.get::<_, Option<bool>>(0) == Some(true))
            .unwrap_or(false)
    })
    .await;
    let received = counters.received.load(Ordering::Relaxed);

    insert_marker_load(client, venture_id).await;

    wait_for_exact_kpis(client, Duration::from_secs(2)).await;
    wait_until(
        "the wake-up to be counted",
        Duration::from_secs(2),
        || async { counters.received.load(Ordering::Relaxed) > received },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_while_stopped_are_drained_on_start() {
    init_logging();
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let service = start_service(&db, settings_without_poll(db.target.clone())).await;
    let writers = Writers::start(&db.target, 2);
    writers.wait_for_commits(100).await;
    let (failed, last_error) = writers.stop().await;
    assert_eq!(
        failed, 0,
        "writes failed with the service running: {last_error:?}"
    );
    wait_for_exact_kpis(&client, QUICK).await;
    service.stop().await;

    let writers = Writers::start(&db.target, 2);
    writers.wait_for_commits(200).await;
    let (failed, last_error) = writers.stop().await;
    insert_marker_load(&client, 99).await;

    assert_eq!(
        failed, 0,
        "writes failed with the service stopped: {last_error:?}"
    );
    assert!(queue_depth(&client).await > 0, "changes wait in the queue");
    assert!(
        !common::kpi_mismatches(&client).await.is_empty(),
        "the KPIs are stale while no service runs"
    );

    let service = start_service(&db, settings_without_poll(db.target.clone())).await;
    wait_for_exact_kpis(&client, QUICK).await;
    wait_for_empty_queue(&client, QUICK).await;
    service.stop().await;
}

/// Starts `freight-kpi run` on `db` as a separate process, without fallback poll.
fn spawn_binary(db: &TestDb) -> Child {
    Command::new(binary())
        .args([
            "run",
            // The HTTP endpoint's fixed default port would clash between parallel tests.
            "--http",
            "off",
            "--poll-interval-ms",
            &NO_POLL.as_millis().to_string(),
        ])
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start freight-kpi run")
}

/// Returns the ids of the listeners registered in `freight_kpi.listener`.
async fn listener_ids(client: &Client) -> HashSet<String> {
    client
        .query("SELECT listener_id FROM freight_kpi.listener", &[])
        .await
        .expect("list listeners")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Waits until a listener that is not in `old` has registered and armed.
async fn wait_for_armed_listener(client: &Client, old: &HashSet<String>) {
    wait_until("a new listener to arm", Duration::from_secs(20), || async {
        client
            .query(
                "SELECT listener_id FROM freight_kpi.listener WHERE armed",
                &[],
            )
            .await
            .map(|rows| rows.iter().any(|row| !old.contains(row.get::<_, &str>(0))))
            .unwrap_or(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_binary_restarts_and_converges() {
    init_logging();
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut first = spawn_binary(&db);
    wait_for_armed_listener(&client, &HashSet::new()).await;
    let writers = Writers::start(&db.target, 3);
    writers.wait_for_commits(150).await;

    // SIGKILL: no shutdown code runs, a batch may be cut off mid-transaction.
    first.start_kill().expect("send SIGKILL");
    let killed = first.wait().await.expect("reap the killed service");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed),
        Some(9),
        "the service died of SIGKILL"
    );
    writers.wait_for_commits(150).await;
    assert!(queue_depth(&client).await > 0, "changes wait in the queue");

    let old_listeners = listener_ids(&client).await;
    let mut second = spawn_binary(&db);
    wait_for_armed_listener(&client, &old_listeners).await;
    writers.wait_for_commits(150).await;
    let (failed, last_error) = writers.stop().await;

    assert_eq!(failed, 0, "writes failed: {last_error:?}");
    wait_for_exact_kpis(&client, QUICK).await;
    wait_for_empty_queue(&client, QUICK).await;

    let pid = second.id().expect("the restarted service runs").to_string();
    let signalled = Command::new("kill")
        .args(["-s", "TERM", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(signalled.success());
    let stopped = tokio::time::timeout(Duration::from_secs(10), second.wait())
        .await
        .expect("the restarted service stops within 10 s")
        .expect("reap the restarted service");
    assert_eq!(stopped.code(), Some(0));
}

/// Terminates every backend of the service in `database` and returns the pids and
/// the server time at which it happened.
async fn terminate_service_backends(
    client: &Client,
    database: &str,
) -> (Vec<i32>, chrono::DateTime<chrono::Utc>) {
    let rows = client
        .query(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND application_name LIKE 'freight-kpi%'",
            &[&database],
        )
        .await
        .expect("terminate the service's backends");
    let now = client
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .expect("read the server clock")
        .get(0);
    (rows.iter().map(|row| row.get(0)).collect(), now)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_reconnect_quickly() {
    init_logging();
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let service = start_service(&db, settings_without_poll(db.target.clone())).await;
    let writers = Writers::start(&db.target, 3);

    let mut terminated = HashSet::new();
    let mut listeners_terminated = 0;
    let mut last_termination = None;
    for _ in 0..6 {
        writers.wait_for_commits(40).await;
        // Each round cuts a listener that is back, so every round tests a reconnect.
        wait_until("a listener backend", Duration::from_secs(5), || async {
            !listener_pids(&client, &db.name).await.is_empty()
        })
        .await;
        let listeners = listener_pids(&client, &db.name).await;
        let (pids, at) = terminate_service_backends(&client, &db.name).await;
        listeners_terminated += pids.iter().filter(|pid| listeners.contains(pid)).count();
        terminated.extend(pids);
        last_termination = Some(at);
    }
    let last_termination = last_termination.expect("at least one round ran");

    assert_eq!(listeners_terminated, 6, "every round terminates a listener");
    wait_for_new_listener(&client, &db.name, &terminated, Duration::from_secs(5)).await;
    wait_until(
        "the listener row to be armed again",
        Duration::from_secs(5),
        || async {
            client
                .query_one(
                    "SELECT count(*) FROM freight_kpi.listener
                     WHERE armed AND heartbeat_at > $1",
                    &[&last_termination],
                )
                .await
                .map(|row| row.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        },
    )
    .await;
    writers.wait_for_commits(100).await;
    let (failed, last_error) = writers.stop().await;
    assert_eq!(failed, 0, "writes failed: {last_error:?}");
    wait_for_exact_kpis(&client, QUICK).await;

    notified_marker_converges(&client, &service.handles.notifications, 77).await;
    wait_for_empty_queue(&client, QUICK).await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_instances_converge_together() {
    init_logging();
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut services = Vec::new();
    for _ in 0..3 {
        services.push(start_service(&db, settings_without_poll(db.target.clone())).await);
    }
    let writers = Writers::start(&db.target, 4);
    writers.wait_for_commits(400).await;
    let (failed, last_error) = writers.stop().await;

    assert_eq!(failed, 0, "writes failed: {last_error:?}");
    wait_for_exact_kpis(&client, QUICK).await;
    wait_for_empty_queue(&client, QUICK).await;
    let failed_buckets: i64 = client
        .query_one("SELECT count(*) FROM freight_kpi.failed_bucket", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed_buckets, 0);

    let batches: Vec<u64> = services
        .iter()
        .map(|service| service.handles.stats.lock().unwrap().batches)
        .collect();
    assert!(
        batches.iter().filter(|&&count| count > 0).count() >= 2,
        "at least two instances shared the work: batches {batches:?}"
    );
    for service in services {
        service.stop().await;
    }
    // A deadlock fails a batch that only a retry repairs, which convergence alone
    // would hide. Bucket locks are taken in one order, so there must be none.
    let deadlocks: i64 = client
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(deadlocks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_notifications_are_ignored() {
    init_logging();
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let service = start_service(&db, settings_without_poll(db.target.clone())).await;
    let listener_before = listener_pids(&client, &db.name).await;
    let counters = service.handles.notifications.clone();

    let long_payload = "x".repeat(7999);
    client
        .execute("SELECT pg_notify('freight_kpi', $1)", &[&long_payload])
        .await
        .expect("send a 7999-byte payload");
    client
        .batch_execute(
            r#"NOTIFY freight_kpi, 'junk';
               NOTIFY freight_kpi, '{"ventureId": "seven", "day": 20240101}';
               NOTIFY freight_kpi, '{"venture_id": [1], "day": null}';
               NOTIFY freight_kpi, 'null';
               NOTIFY freight_kpi, ' ';
               DO $$
               BEGIN
                   FOR i IN 1..1000 LOOP
                       PERFORM pg_notify('freight_kpi', 'flood ' || i);
                   END LOOP;
               END
               $$;"#,
        )
        .await
        .expect("send junk notifications");
    let junk = 1 + 5 + 1000;

    wait_until(
        "the junk notifications to be counted",
        Duration::from_secs(10),
        || async { counters.ignored.load(Ordering::Relaxed) >= junk },
    )
    .await;
    assert_eq!(counters.ignored.load(Ordering::Relaxed), junk);
    assert_eq!(counters.received.load(Ordering::Relaxed), 0);

    insert_marker_load(&client, 5).await;
    wait_for_exact_kpis(&client, QUICK).await;
    assert!(counters.received.load(Ordering::Relaxed) >= 1);
    assert_eq!(
        listener_pids(&client, &db.name).await,
        listener_before,
        "the listener kept its connection"
    );
    service.stop().await;
}

async fn server_address(target: &DatabaseTarget) -> SocketAddr {
    let config = target.config();
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let mut addresses = tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolve the test server");
    addresses.next().expect("the test server has an address")
}

/// Returns a target for `db` that connects through `address`.
fn target_through(db: &TestDb, address: SocketAddr) -> DatabaseTarget {
    let config = db.target.config();
    let quote = |value: &str| format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut url = format!(
        "host={} port={} dbname={}",
        address.ip(),
        address.port(),
        quote(&db.name)
    );
    if let Some(user) = config.get_user() {
        url.push_str(&format!(" user={}", quote(user)));
    }
    if let Some(password) = config.get_password() {
        let password = String::from_utf8_lossy(password);
        url.push_str(&format!(" password={}", quote(&password)));
    }
    DatabaseTarget::parse(&url).expect("a valid proxy target")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_replaced() {
    init_logging();
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let proxy = Proxy::start(server_address(&db.target).await).await;
    let mut settings = settings_without_poll(target_through(&db, proxy.addr()));
    settings.ping_interval = Duration::from_millis(500);
    settings.ping_timeout = Duration::from_millis(500);
    let service = start_service(&db, settings).await;
    insert_marker_load(&client, 1).await;
    wait_for_exact_kpis(&client, QUICK).await;
    let listener_before = listener_pids(&client, &db.name).await;

    let silenced = proxy.silence_open_connections();
    insert_marker_load(&client, 2).await;

    assert!(
        silenced >= 2,
        "the listener and a pooled connection were silenced, got {silenced}"
    );
    // Ping every 500 ms with a 500 ms timeout, then the first reconnect after 100 ms.
    wait_for_new_listener(&client, &db.name, &listener_before, Duration::from_secs(5)).await;
    wait_for_exact_kpis(&client, QUICK).await;
    insert_marker_load(&client, 3).await;
    wait_for_exact_kpis(&client, QUICK).await;
    wait_for_empty_queue(&client, QUICK).await;
    service.stop().await;
}

// Regression: a poll before the ping re-armed on the silent connection and hung forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_found_when_poll_comes_first() {
    init_logging();
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let proxy = Proxy::start(server_address(&db.target).await).await;
    let mut settings = RunSettings::new(target_through(&db, proxy.addr()));
    settings.poll_interval = Duration::from_millis(300);
    settings.ping_interval = NO_POLL;
    settings.ping_timeout = Duration::from_millis(500);
    let service = start_service(&db, settings).await;
    let listener_before = listener_pids(&client, &db.name).await;

    // Each cycle arms (stamping the heartbeat), drains for a few milliseconds, then
    // waits 300 ms for the poll. Silencing 100-200 ms after the arm hits the wait, so
    // the poll's arm meets the silence first. A batch in flight would hang on its
    // pooled connection instead, which this test is not about.
    wait_until(
        "the service to wait between two polls",
        Duration::from_secs(10),
        || async {
            client
                .query_one(
                    "SELECT extract(epoch FROM clock_timestamp() - heartbeat_at)::float8
                     FROM freight_kpi.listener",
                    &[],
                )
                .await
                .map(|row| (0.1..0.2).contains(&row.get::<_, f64>(0)))
                .unwrap_or(false)
        },
    )
    .await;
    proxy.silence_open_connections();
    insert_marker_load(&client, 2).await;

    wait_for_new_listener(&client, &db.name, &listener_before, Duration::from_secs(5)).await;
    wait_for_exact_kpis(&client, QUICK).await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_is_survived() {
    init_logging();
    let cluster = std::sync::Arc::new(
        tokio::task::spawn_blocking(PrivateCluster::start)
            .await
            .expect("start the private cluster"),
    );
    let admin = connect(&cluster.target("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE fk_restart")
        .await
        .unwrap();
    let target = cluster.target("fk_restart");
    {
        let (mut migrating, _messages) = freight_kpi::db::connect_dedicated(&target)
            .await
            .expect("connect to the private cluster");
        freight_kpi::db::migrate(&mut migrating)
            .await
            .expect("migrate");
    }

    let handles = freight_kpi::service::ServiceHandles::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(freight_kpi::service::run(
        settings_without_poll(target.clone()),
        handles.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = connect(&target).await;
    wait_for_new_listener(
        &client,
        "fk_restart",
        &HashSet::new(),
        Duration::from_secs(10),
    )
    .await;
    let listener_before = listener_pids(&client, "fk_restart").await;
    let writers = Writers::start(&target, 3);
    writers.wait_for_commits(100).await;

    let restarting = cluster.clone();
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .expect("restart the private cluster");

    let client = connect(&target).await;
    wait_for_new_listener(
        &client,
        "fk_restart",
        &listener_before,
        Duration::from_secs(20),
    )
    .await;
    writers.wait_for_commits(100).await;
    let (_failed_during_restart, _) = writers.stop().await;
    wait_for_exact_kpis(&client, QUICK).await;
    wait_for_empty_queue(&client, QUICK).await;

    notified_marker_converges(&client, &handles.notifications, 42).await;

    let _ = stop.send(());
    let exited = tokio::time::timeout(Duration::from_secs(10), service)
        .await
        .expect("the service stops within 10 s");
    exited
        .expect("the service task does not panic")
        .expect("the service exits without error");
    drop(client);
    drop(admin);
}

// Regression: a batch whose pooled connection went silent mid-flight hung the service
// for good, since no statement of a batch had a time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_batch_times_out_and_retries() {
    init_logging();
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let proxy = Proxy::start(server_address(&db.target).await).await;
    let mut settings = settings_without_poll(target_through(&db, proxy.addr()));
    settings.ping_interval = Duration::from_secs(3600);
    settings.drain.statement_timeout = Duration::from_secs(1);
    settings.drain.lock_wait_timeout = Duration::from_secs(1);
    let service = start_service(&db, settings).await;

    // Hold every bucket lock, as a reconcile does, so the next batch waits on the
    // server. Silence its connection while it waits, then let the lock go.
    let mut holder = db.client().await;
    let blocking = holder.transaction().await.unwrap();
    let stripes: Vec<i32> = (0..freight_kpi::kpi::BUCKET_LOCK_STRIPES)
        .map(|stripe| 1_000 + stripe)
        .collect();
    blocking
        .execute(
            "SELECT pg_advisory_xact_lock($1, key) FROM unnest($2::integer[]) AS key",
            &[&freight_kpi::ADVISORY_LOCK_NAMESPACE, &stripes],
        )
        .await
        .unwrap();
    insert_marker_load(&client, 7).await;
    wait_until(
        "a batch to wait for the bucket locks",
        Duration::from_secs(5),
        || async {
            client
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                    &[],
                )
                .await
                .map(|row| row.get::<_, i64>(0) > 0)
                .unwrap_or(false)
        },
    )
    .await;
    let silenced = proxy.silence_open_connections();
    blocking.rollback().await.unwrap();
    assert!(
        silenced >= 2,
        "the listener and the batch's connection were silenced, got {silenced}"
    );

    // The server ends the lock wait after 1 s, but its error never arrives, so the
    // client gives up 5 s later. The orphaned session keeps the claimed queue row
    // locked until the server ends it for sitting idle in its transaction (5 s). Then
    // a new connection drains the change.
    wait_for_exact_kpis(&client, Duration::from_secs(20)).await;
    wait_for_empty_queue(&client, Duration::from_secs(20)).await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_cuts_debounce_window_short() {
    // Guards against a stop that waits for the debounce window to end.
    init_logging();
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut settings = settings_without_poll(db.target.clone());
    settings.debounce.quiet = Duration::from_secs(30);
    settings.debounce.max_delay = Duration::from_secs(30);
    let service = start_service(&db, settings).await;

    insert_marker_load(&client, 1).await;
    // The listener disarms when it wakes, right before the debounce window opens.
    wait_until(
        "the listener to wake and disarm",
        Duration::from_secs(10),
        || async {
            client
                .query_one("SELECT bool_or(armed) FROM freight_kpi.listener", &[])
                .await
                .map(|row| row.get::<_, Option<bool>>(0) == Some(false))
                .unwrap_or(false)
        },
    )
    .await;
    let stop_started = std::time::Instant::now();
    service.stop().await;

    assert!(
        stop_started.elapsed() < Duration::from_secs(10),
        "the stop took {:?}",
        stop_started.elapsed()
    );
    assert!(
        queue_depth(&client).await > 0,
        "the change of the cut window stays queued for the next start"
    );
}

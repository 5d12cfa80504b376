//! Helpers of the job control tests: job contexts, the run log as rows, a local HTTP
//! server that records alert POSTs, a PgBouncer in transaction pooling mode, a
//! controlled clock, and the `freight-kpi` binary as a child process.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use freight_kpi::db::DatabaseTarget;
use freight_kpi::jobs::{
    new_holder_id, AlertDispatcher, AlertSender, AlertSettings, DbClock, JobContext, LockMode,
    LockSettings,
};
use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_postgres::Client;

use crate::common::{binary, wait_until, TestDb};

/// First key of the service's advisory locks.
pub const NAMESPACE: i32 = freight_kpi::ADVISORY_LOCK_NAMESPACE;

/// Second key of bucket stripe 0; a session that holds it blocks every reconcile that
/// repairs, right after its job lock and RUNNING row.
pub const FIRST_STRIPE_KEY: i32 = 1_000;

/// Lock settings for tests: `mode`, a short heartbeat and lease timeout.
pub fn lock_settings(mode: LockMode, lease_timeout: Duration, heartbeat: Duration) -> LockSettings {
    LockSettings {
        mode,
        lease_timeout,
        heartbeat,
    }
}

/// Creates a job context on `target` whose alerts only log.
pub fn context_on(target: &DatabaseTarget, lock: LockSettings) -> JobContext {
    context_with_alerts(target, lock, AlertSender::log_only())
}

/// Creates a job context on `target` that sends alerts through `alerts`.
pub fn context_with_alerts(
    target: &DatabaseTarget,
    lock: LockSettings,
    alerts: AlertSender,
) -> JobContext {
    let pool = target.pool(4).expect("a valid pool");
    JobContext::new(pool, lock, new_holder_id(), alerts)
}

/// One row of `"JobRunLog"`.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: i64,
    pub job: String,
    pub status: String,
    pub error: Option<String>,
    pub stats: Option<serde_json::Value>,
    pub ended: bool,
}

/// Returns every `"JobRunLog"` row, oldest first.
pub async fn run_rows(client: &Client) -> Vec<RunRow> {
    client
        .query(
            r#"SELECT id, "jobName"::text, status, error, "statsJson", "endedAt" IS NOT NULL
               FROM "JobRunLog" ORDER BY id"#,
            &[],
        )
        .await
        .expect("read the run log")
        .iter()
        .map(|row| RunRow {
            id: row.get(0),
            job: row.get(1),
            status: row.get(2),
            error: row.get(3),
            stats: row.get(4),
            ended: row.get(5),
        })
        .collect()
}

/// Returns the rows of `"JobRunLog"` with `status`.
pub async fn runs_with_status(client: &Client, status: &str) -> Vec<RunRow> {
    run_rows(client)
        .await
        .into_iter()
        .filter(|run| run.status == status)
        .collect()
}

/// Waits until a row has `status`, and returns the first such row.
pub async fn wait_for_status(client: &Client, status: &str, timeout: Duration) -> RunRow {
    wait_until(&format!("a run with status {status}"), timeout, || async {
        !runs_with_status(client, status).await.is_empty()
    })
    .await;
    runs_with_status(client, status).await.remove(0)
}

/// Counts the granted advisory locks of job lock `key` in the test database.
pub async fn job_locks_held(client: &Client, key: i32) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks
             WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND classid = $1::integer::oid AND objid = $2::integer::oid AND objsubid = 2",
            &[&NAMESPACE, &key],
        )
        .await
        .expect("count advisory locks")
        .get(0)
}

/// Takes bucket stripe 0's lock in the test's session, so a repairing reconcile waits
/// right after it logged RUNNING.
pub async fn block_reconciles(client: &Client) {
    client
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&NAMESPACE, &FIRST_STRIPE_KEY],
        )
        .await
        .expect("take bucket stripe 0");
}

/// Releases what [`block_reconciles`] took.
pub async fn unblock_reconciles(client: &Client) {
    client
        .execute(
            "SELECT pg_advisory_unlock($1, $2)",
            &[&NAMESPACE, &FIRST_STRIPE_KEY],
        )
        .await
        .expect("release bucket stripe 0");
}

/// Inserts loads into two buckets, then overwrites one stored KPI row by hand, which
/// is the drift a reconcile must find and repair. Run it without a service running.
pub async fn make_drift(client: &Client) {
    client
        .batch_execute(
            r#"INSERT INTO "Load" ("ventureId", status, "billAmount", "costAmount", "billingDate", "createdAt")
               SELECT 1 + i % 2, 'DELIVERED', 100, 60, now(), now() FROM generate_series(1, 10) AS i;
               INSERT INTO "FreightKpiDaily" ("ventureId", date, "loadsInbound")
               VALUES (1, (now() AT TIME ZONE 'UTC')::date, 999);"#,
        )
        .await
        .expect("write drift");
}

/// Starts `freight-kpi` with `args` on `db`, its output kept in the returned child's
/// pipes.
pub fn spawn_binary(db: &TestDb, args: &[&str]) -> Child {
    Command::new(binary())
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start freight-kpi")
}

/// A request that the [`HookServer`] received.
#[derive(Debug, Clone)]
pub struct Hook {
    pub path: String,
    pub body: serde_json::Value,
    pub raw: String,
}

/// The response of the [`HookServer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAnswer {
    Ok,
    Status(u16),
    /// No response at all, as from a sink that hangs.
    Hang,
}

/// A local HTTP server on 127.0.0.1 that records every POST.
pub struct HookServer {
    pub address: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Hook>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HookServer {
    pub async fn start(answer: HookAnswer) -> HookServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("a local address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let store = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_connection(stream, store.clone(), answer));
            }
        });
        HookServer {
            address,
            received,
            task,
        }
    }

    /// Returns the URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Returns the requests received so far.
    pub fn received(&self) -> Vec<Hook> {
        self.received.lock().unwrap().clone()
    }

    /// Returns the requests to `path` whose body has `kind` as alert kind.
    pub fn of_kind(&self, path: &str, kind: &str) -> Vec<Hook> {
        self.received()
            .into_iter()
            .filter(|hook| hook.path == path && alert_kind(&hook.body) == Some(kind.to_owned()))
            .collect()
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Returns the alert kind of a Slack or PagerDuty body.
pub fn alert_kind(body: &serde_json::Value) -> Option<String> {
    body.pointer("/freight_kpi/kind")
        .or_else(|| body.pointer("/payload/class"))
        .and_then(|kind| kind.as_str())
        .map(str::to_owned)
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    store: Arc<Mutex<Vec<Hook>>>,
    answer: HookAnswer,
) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_owned();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let raw = String::from_utf8_lossy(&body).into_owned();
        store.lock().unwrap().push(Hook {
            path,
            body: serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null),
            raw,
        });

        let status = match answer {
            HookAnswer::Ok => 200,
            HookAnswer::Status(status) => status,
            HookAnswer::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
        };
        let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
        if writer.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Alert settings that post to `server` at /slack and /pagerduty.
pub fn hook_settings(server: &HookServer) -> AlertSettings {
    let mut settings = AlertSettings::new("jobs-test");
    settings.slack_url = Some(server.url("/slack"));
    settings.pagerduty_url = Some(server.url("/pagerduty"));
    settings.pagerduty_routing_key = Some("test-routing-key".to_owned());
    settings.timeout = Duration::from_secs(2);
    settings
}

/// Starts an alert dispatcher for `settings`.
pub fn start_alerts(settings: &AlertSettings) -> (AlertSender, AlertDispatcher) {
    AlertDispatcher::start(settings).expect("valid alert settings")
}

/// A clock that starts at `start` and runs `speed` times faster than real time.
#[derive(Debug)]
pub struct FastClock {
    start: DateTime<Utc>,
    started: std::time::Instant,
    speed: f64,
}

impl FastClock {
    pub fn new(start: DateTime<Utc>, speed: f64) -> Arc<FastClock> {
        Arc::new(FastClock {
            start,
            started: std::time::Instant::now(),
            speed,
        })
    }

    pub fn now(&self) -> DateTime<Utc> {
        let elapsed = self.started.elapsed().as_secs_f64() * self.speed;
        self.start + chrono::TimeDelta::microseconds((elapsed * 1e6) as i64)
    }
}

impl DbClock for FastClock {
    fn now(&self) -> BoxFuture<'_, freight_kpi::Result<DateTime<Utc>>> {
        let now = FastClock::now(self);
        Box::pin(async move { Ok(now) })
    }
}

/// A PgBouncer in transaction pooling mode on a free loopback port, in front of the
/// test server, stopped when dropped.
pub struct PgBouncer {
    child: Child,
    pub port: u16,
    folder: PathBuf,
}

impl PgBouncer {
    /// Starts PgBouncer (Debian package `pgbouncer`) as user postgres when run as
    /// root, with trust authentication, forwarding every database to `server_port`.
    pub async fn start(server_port: u16) -> PgBouncer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("find a free port")
            .port();
        let folder =
            std::env::temp_dir().join(format!("fk-pgbouncer-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&folder).expect("create the PgBouncer folder");
        std::fs::write(folder.join("userlist.txt"), "\"postgres\" \"\"\n").expect("write userlist");
        std::fs::write(
            folder.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host=127.0.0.1 port={server_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {folder}/userlist.txt\npool_mode = transaction\ndefault_pool_size = 4\nmax_client_conn = 200\nignore_startup_parameters = extra_float_digits,options\nlogfile = {folder}/pgbouncer.log\npidfile = {folder}/pgbouncer.pid\n",
                folder = folder.display()
            ),
        )
        .expect("write pgbouncer.ini");

        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|out| out.stdout == b"0\n")
            .unwrap_or(false);
        let ini = folder.join("pgbouncer.ini");
        let child = if root {
            Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&folder)
                .status()
                .expect("chown the PgBouncer folder");
            Command::new("runuser")
                .args(["-u", "postgres", "--", "pgbouncer"])
                .arg(&ini)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        } else {
            Command::new("pgbouncer")
                .arg(&ini)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        }
        .expect("start pgbouncer; install the Debian package pgbouncer");

        let bouncer = PgBouncer {
            child,
            port,
            folder,
        };
        wait_until("PgBouncer to listen", Duration::from_secs(15), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        bouncer
    }

    /// Returns a target for `dbname` through PgBouncer.
    pub fn target(&self, dbname: &str) -> DatabaseTarget {
        DatabaseTarget::parse(&format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        ))
        .expect("a valid PgBouncer target")
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser forwards SIGTERM to PgBouncer, which then exits.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.folder);
    }
}

/// Returns the port of the test server.
pub fn server_port(db: &TestDb) -> u16 {
    db.target
        .config()
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
}

//! `freight-kpi demo`: the whole pipeline on a throwaway database in one command.
//!
//! Without `DATABASE_URL` it starts a throwaway PostgreSQL cluster from the server
//! binaries installed on the machine. With it, the demo works in a new database on
//! that server. Either is removed at the end, also after Ctrl-C. In between it migrates,
//! generates a few thousand loads, starts the service in this process, applies a live
//! stream of changes while showing today's KPI rows of the first ventures, and ends
//! with a reconcile that must find zero drift.

mod view;
mod workload;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::cluster::{ClusterOptions, ThrowawayCluster};
use crate::config::RunSettings;
use crate::db::{connect_dedicated, migrate, DatabaseTarget};
use crate::error::{Error, Result};
use crate::reconcile::{reconcile, ReconcileOptions};
use crate::service::{run, ServiceHandles};

/// How often the view is redrawn.
const REFRESH_INTERVAL: Duration = Duration::from_millis(500);

/// Time the service gets to drain the queue, after the initial loads and at the end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Time the service gets to stop.
const SERVICE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of `freight-kpi demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Stop the live changes after this many seconds (Ctrl-C stops earlier).
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Loads generated before the service starts, spread over the last 14 days.
    #[arg(long, default_value_t = 3_000)]
    pub loads: i32,
    /// Ventures the loads belong to; all of them are shown.
    #[arg(long, default_value_t = 5)]
    pub ventures: i32,
    /// Live changes applied per second.
    #[arg(long, default_value_t = 20)]
    pub changes_per_second: u32,
}

impl DemoArgs {
    fn validate(&self) -> Result<()> {
        let checks = [
            (
                self.seconds >= 1,
                "--seconds",
                self.seconds.to_string(),
                "a whole number of seconds above 0",
            ),
            (
                self.loads >= 1,
                "--loads",
                self.loads.to_string(),
                "a whole number above 0",
            ),
            (
                (1..=50).contains(&self.ventures),
                "--ventures",
                self.ventures.to_string(),
                "a whole number from 1 to 50",
            ),
            (
                (1..=1_000).contains(&self.changes_per_second),
                "--changes-per-second",
                self.changes_per_second.to_string(),
                "a whole number from 1 to 1000",
            ),
        ];
        for (valid, key, value, allowed) in checks {
            if !valid {
                return Err(Error::InvalidSetting {
                    key,
                    value,
                    allowed,
                });
            }
        }
        Ok(())
    }
}

/// Runs the demo, on a throwaway cluster when `database_url` is `None`.
///
/// # Errors
///
/// [`Error::Cluster`] when no cluster can be started (the message names the package
/// to install), [`Error::DemoDrift`] when the final reconcile finds drift, and the
/// errors of each step. The cluster or database is removed in every case.
pub async fn run_demo(args: &DemoArgs, database_url: Option<&str>) -> Result<()> {
    args.validate()?;
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));

    let place = match database_url {
        Some(url) => Place::new_database(url).await?,
        None => Place::start_cluster().await?,
    };
    let outcome = demo_session(place.target(), args, stop.clone()).await;
    stop.cancel();

    let removed = place.remove().await;
    outcome.and(removed)
}

/// Location of the demo's data: a throwaway cluster, or a new database on an
/// existing server.
enum Place {
    Cluster {
        cluster: ThrowawayCluster,
        target: DatabaseTarget,
    },
    Database {
        /// Boxed to keep the two variants of similar size.
        server: Box<DatabaseTarget>,
        target: DatabaseTarget,
    },
}

impl Place {
    async fn start_cluster() -> Result<Self> {
        println!("starting a throwaway PostgreSQL cluster (DATABASE_URL is not set)");
        let cluster =
            tokio::task::spawn_blocking(|| ThrowawayCluster::start(&ClusterOptions::default()))
                .await
                .expect("the cluster start does not panic")?;
        println!(
            "started a throwaway PostgreSQL cluster in {} with the server binaries in {}",
            cluster.folder().display(),
            cluster.bin_dir().display()
        );
        let target = DatabaseTarget::parse(&cluster.connection_string("postgres"))?;
        Ok(Place::Cluster { cluster, target })
    }

    async fn new_database(url: &str) -> Result<Self> {
        let server = DatabaseTarget::parse(url)?;
        let name = format!("freight_kpi_demo_{:08x}", rand::random::<u32>());
        let (client, _messages) = connect_dedicated(&server).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(Error::database("create the demo database"))?;
        println!(
            "using the server in DATABASE_URL ({}); the demo runs in a new database {name}, dropped at the end",
            server.describe()
        );
        let target = server.with_dbname(&name);
        Ok(Place::Database {
            server: Box::new(server),
            target,
        })
    }

    fn target(&self) -> &DatabaseTarget {
        match self {
            Place::Cluster { target, .. } | Place::Database { target, .. } => target,
        }
    }

    async fn remove(self) -> Result<()> {
        match self {
            Place::Cluster { cluster, .. } => {
                let folder = cluster.folder().to_path_buf();
                tokio::task::spawn_blocking(move || cluster.stop())
                    .await
                    .expect("the cluster stop does not panic")?;
                println!(
                    "stopped the throwaway cluster and removed {}",
                    folder.display()
                );
            }
            Place::Database { server, target } => {
                let (client, _messages) = connect_dedicated(&server).await?;
                let name = target.dbname().to_owned();
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .map_err(Error::database("drop the demo database"))?;
                println!("dropped the demo database {name}");
            }
        }
        Ok(())
    }
}

async fn stop_on_signal(stop: CancellationToken) {
    let Ok(mut terminate) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    println!("stopping: finishing the queue, then the reconcile and the cleanup");
    stop.cancel();
}

/// Everything between the database's creation and its removal. Returns early, with
/// `Ok`, when `stop` fires before the live stream starts.
async fn demo_session(
    target: &DatabaseTarget,
    args: &DemoArgs,
    stop: CancellationToken,
) -> Result<()> {
    let (mut admin, _messages) = connect_dedicated(target).await?;
    migrate(&mut admin).await?;
    if stop.is_cancelled() {
        return Ok(());
    }
    let inserted = workload::insert_history(&admin, args.loads, args.ventures).await?;
    println!(
        "migrated and generated {inserted} loads of {} ventures over the last 14 days",
        args.ventures
    );

    let handles = ServiceHandles::default();
    let (service_stop, service_stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(run(
        RunSettings::new(target.clone()),
        handles.clone(),
        async move {
            let _ = service_stopped.await;
        },
    ));
    println!("service started; recomputing the generated loads");
    wait_for_empty_queue(&admin, &stop).await?;

    let live = live_stream(target, &admin, args, &handles, stop.clone()).await;

    // The queue must be empty before the service stops, or the reconcile would find
    // the last changes as drift.
    let drained = wait_for_empty_queue(&admin, &CancellationToken::new()).await;
    let _ = service_stop.send(());
    match tokio::time::timeout(SERVICE_STOP_TIMEOUT, service).await {
        Ok(Ok(outcome)) => outcome?,
        Ok(Err(panic)) => std::panic::resume_unwind(panic.into_panic()),
        Err(_) => {
            return Err(Error::Timeout {
                operation: "stopping the demo's service",
                timeout: SERVICE_STOP_TIMEOUT,
            })
        }
    }
    live?;
    drained?;

    summarize(target).await
}

/// Applies the live changes and redraws the view until `stop` fires or the time is up.
async fn live_stream(
    target: &DatabaseTarget,
    admin: &Client,
    args: &DemoArgs,
    handles: &ServiceHandles,
    stop: CancellationToken,
) -> Result<()> {
    if stop.is_cancelled() {
        return Ok(());
    }
    let duration = Duration::from_secs(args.seconds);
    let started = Instant::now();
    let timer_stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(duration) => timer_stop.cancel(),
            () = timer_stop.cancelled() => {}
        }
    });

    let (writer_client, _writer_messages) =
        connect_dedicated(&target.with_application_name("freight-kpi demo writer")).await?;
    let applied = Arc::new(AtomicU64::new(0));
    let writer = {
        let applied = applied.clone();
        let stop = stop.clone();
        let (ventures, per_second) = (args.ventures, args.changes_per_second);
        tokio::spawn(async move {
            let streamed = workload::stream_changes(
                &writer_client,
                ventures,
                per_second,
                applied,
                stop.clone(),
            )
            .await;
            // A failed writer ends the demo rather than leaving a frozen view.
            stop.cancel();
            streamed
        })
    };

    let mut frames = tokio::time::interval(REFRESH_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = frames.tick() => {}
        }
        let frame = draw(
            admin,
            args,
            handles,
            started,
            duration,
            applied.load(Ordering::Relaxed),
        )
        .await?;
        view::show(&frame);
    }

    let streamed = writer.await.expect("the writer does not panic");
    let frame = draw(
        admin,
        args,
        handles,
        started,
        duration,
        applied.load(Ordering::Relaxed),
    )
    .await?;
    view::show(&frame);
    streamed
}

async fn draw(
    admin: &Client,
    args: &DemoArgs,
    handles: &ServiceHandles,
    started: Instant,
    duration: Duration,
    changes_applied: u64,
) -> Result<String> {
    let mut header = view::Header {
        elapsed: started.elapsed().min(duration),
        duration,
        changes_applied,
        queue_depth: queue_depth(admin).await?,
        ..view::Header::default()
    };
    {
        let stats = handles.stats.lock().expect("stats lock poisoned");
        header.batches = stats.batches;
        header.latency_p50_ms = stats.latency_ms(0.5);
        header.latency_p99_ms = stats.latency_ms(0.99);
    }
    view::render(admin, args.ventures, &header).await
}

async fn queue_depth(client: &Client) -> Result<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM freight_kpi.change_queue", &[])
        .await
        .map_err(Error::database("count the change queue"))?
        .get(0))
}

/// Waits until the service has consumed every queued change, or `stop` fires.
async fn wait_for_empty_queue(client: &Client, stop: &CancellationToken) -> Result<()> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while queue_depth(client).await? > 0 {
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                operation: "waiting for the service to drain the change queue",
                timeout: DRAIN_TIMEOUT,
            });
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    Ok(())
}

/// Runs a repairing reconcile over every bucket and prints its summary. The
/// incremental path kept every bucket exact, so it must find zero drift.
async fn summarize(target: &DatabaseTarget) -> Result<()> {
    let pool = target.pool(2)?;
    let report = reconcile(&pool, &ReconcileOptions::default()).await?;
    pool.close();
    let summary = &report.summary;
    println!(
        "reconcile: scanned {} buckets, drifted {}, repaired {}, zeroed {}",
        summary.scanned, summary.drifted, summary.repaired, summary.zeroed
    );
    if summary.drifted > 0 {
        return Err(Error::DemoDrift {
            drifted: summary.drifted,
        });
    }
    println!("zero drift: every bucket of \"FreightKpiDaily\" equals a from-scratch aggregation of \"Load\"");
    Ok(())
}

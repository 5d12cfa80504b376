//! The machine and the server the figures were measured on.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::error::{database, BenchError};

/// Server settings that move the figures most, reported as the server shows them.
const REPORTED_SETTINGS: &[&str] = &[
    "shared_buffers",
    "work_mem",
    "maintenance_work_mem",
    "effective_cache_size",
    "synchronous_commit",
    "fsync",
    "wal_level",
    "max_wal_size",
    "checkpoint_timeout",
    "max_connections",
    "max_parallel_workers_per_gather",
    "jit",
    "random_page_cost",
    "autovacuum",
];

/// Description of the machine and server the bench ran on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineDescription {
    /// CPUs this process may use.
    pub cores: usize,
    /// CPU model from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// Total memory from `/proc/meminfo`, in MiB.
    pub memory_mib: Option<u64>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// One-minute load average when the bench started, a hint of other work on the
    /// machine.
    pub load_average_at_start: Option<f64>,
    /// `version()` of the server.
    pub postgres_version: String,
    /// Whether the server was reached over loopback or a Unix socket, so that it
    /// shared the machine's cores with the bench.
    pub postgres_on_same_machine: bool,
    /// The settings in [`REPORTED_SETTINGS`], as `current_setting` shows them.
    pub postgres_settings: BTreeMap<String, String>,
    /// Version of this binary.
    pub freight_kpi_version: String,
}

/// Describes this machine and the server behind `client`.
///
/// # Errors
///
/// [`BenchError::Service`] when the server cannot be queried.
pub async fn describe(
    client: &Client,
    same_machine: bool,
) -> Result<MachineDescription, BenchError> {
    let version: String = client
        .query_one("SELECT version()", &[])
        .await
        .map_err(database("read the server version"))?
        .get(0);
    let names: Vec<String> = REPORTED_SETTINGS
        .iter()
        .map(|name| (*name).to_owned())
        .collect();
    let rows = client
        .query(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY($1) ORDER BY name",
            &[&names],
        )
        .await
        .map_err(database("read the server settings"))?;
    let postgres_settings = rows.iter().map(|row| (row.get(0), row.get(1))).collect();

    Ok(MachineDescription {
        cores: std::thread::available_parallelism().map_or(1, |cores| cores.get()),
        cpu_model: read_field("/proc/cpuinfo", "model name"),
        memory_mib: read_field("/proc/meminfo", "MemTotal")
            .and_then(|value| value.trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib / 1024),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|text| text.trim().to_owned()),
        load_average_at_start: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse().ok()),
        postgres_version: version,
        postgres_on_same_machine: same_machine,
        postgres_settings,
        freight_kpi_version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// Returns the value of the first `key: value` line of a `/proc` file.
fn read_field(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == key).then(|| value.trim().to_owned())
    })
}

/// Tells whether a target's host is this machine: a Unix socket or a loopback address.
pub fn is_local(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().all(|host| match host {
        tokio_postgres::config::Host::Unix(_) => true,
        tokio_postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|address| address.is_loopback())
        }
    })
}

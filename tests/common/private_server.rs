//! The server the tests use when none is configured or reachable: one throwaway
//! cluster per test process, started on first use.
//!
//! A static is never dropped, so the cluster cannot stop itself when the process
//! ends. Instead a watchdog process owns it from the start (see
//! `ThrowawayCluster::start_until_process_exit`). The watchdog waits on a pipe from
//! this process and stops the server and removes its folder once the pipe closes. The
//! kernel closes it when this process exits for any reason, a panic or SIGKILL
//! included.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use freight_kpi::cluster::{ClusterOptions, ExitWatchdog, ThrowawayCluster};

/// Setting this variable to 1 makes the tests use a private cluster even when
/// `FREIGHT_KPI_TEST_ADMIN_URL`, `DATABASE_URL` or a server on 127.0.0.1:5432 is
/// there, to check the setup of a machine without a running server.
pub const FORCE_PRIVATE_CLUSTER: &str = "FREIGHT_KPI_TEST_PRIVATE_CLUSTER";

/// Address of the server the tests use by default.
const SHARED_SERVER: &str = "127.0.0.1:5432";

static PRIVATE_CLUSTER: OnceLock<ExitWatchdog> = OnceLock::new();

/// Tells whether the tests must start their own cluster.
pub fn private_cluster_forced() -> bool {
    std::env::var(FORCE_PRIVATE_CLUSTER).is_ok_and(|value| value == "1")
}

/// Tells whether anything accepts TCP connections on 127.0.0.1:5432.
pub fn shared_server_answers() -> bool {
    let address: SocketAddr = SHARED_SERVER.parse().expect("a valid socket address");
    TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_ok()
}

/// Returns the connection string of this process's private cluster, starting it on
/// the first call. The cluster listens on a free port of 127.0.0.1 as well as on
/// its Unix socket, because some tests put a TCP proxy in front of the server.
pub fn private_cluster_url() -> String {
    PRIVATE_CLUSTER
        .get_or_init(|| {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("find a free loopback port")
                .port();
            let options = ClusterOptions {
                tcp_port: Some(port),
                folder_prefix: Some("freight-kpi-test-pg".to_owned()),
            };
            let cluster =
                ThrowawayCluster::start_until_process_exit(&options).unwrap_or_else(|error| {
                    panic!("cannot start a private PostgreSQL cluster for the tests: {error}")
                });
            eprintln!(
                "tests use a private PostgreSQL cluster in {}",
                cluster.folder().display()
            );
            cluster
        })
        .connection_string()
        .to_owned()
}

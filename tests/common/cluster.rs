//! A private PostgreSQL cluster owned by one test, for faults that the shared server
//! must not suffer: restarts and stops. It wraps the library's throwaway cluster and
//! adds a TCP port, which loopback proxies need.

use freight_kpi::cluster::{ClusterOptions, ThrowawayCluster};
use freight_kpi::db::DatabaseTarget;

/// A throwaway cluster listening on 127.0.0.1 and a Unix socket in its own folder.
/// Dropping it stops the server and removes the folder.
pub struct PrivateCluster {
    cluster: ThrowawayCluster,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("ephemeral port")
        .port()
}

impl PrivateCluster {
    /// Creates and starts a cluster with trust authentication. It blocks for a few
    /// seconds, so async tests call it through `spawn_blocking`.
    pub fn start() -> PrivateCluster {
        let options = ClusterOptions {
            tcp_port: Some(free_port()),
            folder_prefix: Some("fk-test-cluster".to_owned()),
        };
        let cluster = ThrowawayCluster::start(&options)
            .unwrap_or_else(|error| panic!("start a private cluster: {error}"));
        PrivateCluster { cluster }
    }

    /// Restarts the server, closing every connection.
    pub fn restart(&self) {
        self.cluster
            .restart()
            .unwrap_or_else(|error| panic!("restart the private cluster: {error}"));
    }

    /// Returns the target of database `dbname` over TCP.
    pub fn target(&self, dbname: &str) -> DatabaseTarget {
        DatabaseTarget::parse(&self.cluster.connection_string(dbname)).expect("valid cluster URL")
    }

    /// Returns the TCP address of the server.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.cluster.port()))
    }
}

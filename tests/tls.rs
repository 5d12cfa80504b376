//! TLS against a private PostgreSQL cluster that accepts TCP connections only over
//! TLS, with a server certificate signed by a CA that the test generates.
//!
//! The cluster runs from `FREIGHT_KPI_TEST_PG_BIN`, else `/usr/lib/postgresql/15/bin`.
//! The tests are skipped with a message when `initdb` is not there. When the tests run
//! as root, the server runs as the `postgres` user.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use freight_kpi::db::{connect_dedicated, DatabaseTarget};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Folder of the server binaries when `FREIGHT_KPI_TEST_PG_BIN` is not set.
const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Time allowed for `pg_ctl` to start or stop the cluster, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Time allowed for the `freight-kpi` binary to finish a command.
const BINARY_TIMEOUT: Duration = Duration::from_secs(60);

/// pg_hba.conf of the cluster: trust over TLS, reject plain TCP, and the Unix socket
/// for the test's own administration.
const PG_HBA: &str = "\
local     all all              trust
hostssl   all all 127.0.0.1/32 trust
hostnossl all all 127.0.0.1/32 reject
";

/// A private PostgreSQL cluster with `ssl=on`, stopped and deleted on drop.
struct TlsCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    run_as_postgres: bool,
}

/// The cluster that running tests share. It stops when the last test that uses it
/// ends, panics included.
static SHARED_CLUSTER: Mutex<Weak<TlsCluster>> = Mutex::new(Weak::new());

/// Returns the shared cluster, starting it if no running test uses it, or `None` when
/// the server binaries are absent.
fn cluster() -> Option<Arc<TlsCluster>> {
    let mut shared = SHARED_CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(running) = shared.upgrade() {
        return Some(running);
    }
    let started = Arc::new(TlsCluster::start()?);
    *shared = Arc::downgrade(&started);
    Some(started)
}

impl TlsCluster {
    fn start() -> Option<TlsCluster> {
        let bin = std::env::var_os("FREIGHT_KPI_TEST_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN));
        if !bin.join("initdb").exists() {
            eprintln!(
                "skipping TLS tests: {} not found; install PostgreSQL server binaries or set \
                 FREIGHT_KPI_TEST_PG_BIN to their folder",
                bin.join("initdb").display()
            );
            return None;
        }

        let dir = std::env::temp_dir().join(format!(
            "freight-kpi-tls-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).expect("create the cluster folder");
        // The guard exists from here on, so a failed start still removes the folder.
        let cluster = TlsCluster {
            bin,
            dir,
            port: free_port(),
            run_as_postgres: is_root(),
        };

        write_certificates(&cluster.dir);
        if cluster.run_as_postgres {
            run_checked(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&cluster.dir),
            );
        }

        let data = cluster.data_dir();
        cluster.pg_command("initdb", |command| {
            command.arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--no-instructions",
            ]);
        });
        let settings = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n\
             fsync = off\nmax_connections = 30\n",
            port = cluster.port,
            dir = cluster.dir.display(),
        );
        append(&data.join("postgresql.conf"), &settings);
        std::fs::write(data.join("pg_hba.conf"), PG_HBA).expect("write pg_hba.conf");

        let log = cluster.dir.join("server.log");
        cluster.pg_command("pg_ctl", |command| {
            command.arg("-D").arg(&data).arg("-l").arg(&log).args([
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECS,
                "start",
            ]);
        });
        Some(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn wrong_ca_file(&self) -> PathBuf {
        self.dir.join("wrong-ca.crt")
    }

    /// Returns a key=value connection string for database `dbname` on host `host`,
    /// with `extra` pairs appended. tokio-postgres adds a repeated `host` to a list
    /// instead of replacing it, so the host is given only here.
    fn url(&self, host: &str, dbname: &str, extra: &str) -> String {
        format!(
            "host={host} port={} user=postgres dbname={dbname} {extra}",
            self.port
        )
    }

    /// Runs a server binary, as the `postgres` user when the test runs as root, and
    /// panics with its output when it fails.
    fn pg_command(&self, program: &str, configure: impl FnOnce(&mut Command)) -> Output {
        let path = self.bin.join(program);
        let mut command = if self.run_as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        configure(&mut command);
        run_checked(&mut command)
    }

    /// Runs SQL through psql over the cluster's Unix socket.
    fn psql(&self, sql: &str) {
        let socket_dir = self.dir.clone();
        let port = self.port.to_string();
        self.pg_command("psql", |command| {
            command
                .arg("-h")
                .arg(&socket_dir)
                .args(["-p", &port, "-U", "postgres", "-d", "postgres"])
                .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-c", sql]);
        });
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        if data.join("postmaster.pid").exists() {
            let path = self.bin.join("pg_ctl");
            let mut command = if self.run_as_postgres {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--"]).arg(&path);
                command
            } else {
                Command::new(&path)
            };
            command.arg("-D").arg(&data).args([
                "-m",
                "immediate",
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECS,
                "stop",
            ]);
            match command.output() {
                Ok(output) if output.status.success() => {}
                Ok(output) => eprintln!(
                    "failed to stop the TLS test cluster in {}: {}",
                    data.display(),
                    String::from_utf8_lossy(&output.stderr)
                ),
                Err(error) => eprintln!("failed to run pg_ctl stop: {error}"),
            }
        }
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("failed to remove {}: {error}", self.dir.display());
        }
    }
}

/// Writes a CA, a server certificate it signs for `localhost` and `127.0.0.1`, the
/// server key, and a second CA that signed nothing.
fn write_certificates(dir: &Path) {
    let ca_key = KeyPair::generate().expect("generate the CA key");
    let ca_params = ca_certificate_params("freight-kpi test CA");
    let ca_certificate = ca_params.self_signed(&ca_key).expect("sign the CA");
    let ca = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().expect("generate the server key");
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("valid subject alternative names");
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_certificate = server_params
        .signed_by(&server_key, &ca)
        .expect("sign the server certificate");

    let wrong_key = KeyPair::generate().expect("generate the second CA key");
    let wrong_ca = ca_certificate_params("freight-kpi unrelated CA")
        .self_signed(&wrong_key)
        .expect("sign the second CA");

    std::fs::write(dir.join("ca.crt"), ca_certificate.pem()).expect("write the CA");
    std::fs::write(dir.join("wrong-ca.crt"), wrong_ca.pem()).expect("write the second CA");
    std::fs::write(dir.join("server.crt"), server_certificate.pem())
        .expect("write the server certificate");
    let key_path = dir.join("server.key");
    std::fs::write(&key_path, server_key.serialize_pem()).expect("write the server key");
    // The server refuses a key file that its group or others can read.
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
        .expect("restrict the server key");
}

fn ca_certificate_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names to parse");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|error| panic!("open {}: {error}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
}

fn run_checked(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("failed to run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn is_root() -> bool {
    let output = run_checked(Command::new("id").arg("-u"));
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// Connects through the service's dedicated-connection path and returns whether
/// `pg_stat_ssl` reports the session as TLS, or the connection error's message.
async fn session_uses_tls(url: &str) -> Result<bool, String> {
    let target = DatabaseTarget::parse(url).map_err(|error| error.to_string())?;
    let (client, _messages) = connect_dedicated(&target)
        .await
        .map_err(|error| error.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("read pg_stat_ssl");
    Ok(row.get(0))
}

#[tokio::test]
async fn require_connects_over_tls() {
    let Some(cluster) = cluster() else { return };

    let uses_tls = session_uses_tls(&cluster.url("127.0.0.1", "postgres", "sslmode=require")).await;

    assert_eq!(uses_tls, Ok(true));
}

#[tokio::test]
async fn default_prefer_connects_over_tls() {
    let Some(cluster) = cluster() else { return };

    let uses_tls = session_uses_tls(&cluster.url("127.0.0.1", "postgres", "")).await;

    assert_eq!(uses_tls, Ok(true));
}

#[tokio::test]
async fn pool_connects_over_tls() {
    let Some(cluster) = cluster() else { return };
    let target = DatabaseTarget::parse(&cluster.url("127.0.0.1", "postgres", "sslmode=require"))
        .expect("valid connection string");
    let pool = target.pool(2).expect("build the pool");

    let client = pool.get().await.expect("a pooled connection over TLS");
    let uses_tls: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("read pg_stat_ssl")
        .get(0);

    assert!(uses_tls);
}

#[tokio::test]
async fn disable_is_rejected_by_tls_only_server() {
    let Some(cluster) = cluster() else { return };

    let error = session_uses_tls(&cluster.url("127.0.0.1", "postgres", "sslmode=disable"))
        .await
        .expect_err("pg_hba.conf rejects plain TCP");

    assert!(error.contains("no encryption"), "{error}");
    assert!(error.contains("set sslmode=require"), "{error}");
}

#[tokio::test]
async fn verify_full_accepts_trusted_certificate() {
    let Some(cluster) = cluster() else { return };
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        cluster.ca_file().display()
    );

    let uses_tls = session_uses_tls(&url).await;

    assert_eq!(uses_tls, Ok(true));
}

#[tokio::test]
async fn verify_full_rejects_untrusted_ca() {
    let Some(cluster) = cluster() else { return };
    let extra = format!(
        "sslmode=verify-full sslrootcert='{}'",
        cluster.wrong_ca_file().display()
    );

    let error = session_uses_tls(&cluster.url("localhost", "postgres", &extra))
        .await
        .expect_err("the certificate is signed by another CA");

    assert!(error.contains("certificate verification failed"), "{error}");
    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[tokio::test]
async fn verify_full_rejects_other_host_name() {
    let Some(cluster) = cluster() else { return };
    // hostaddr carries the connection, and host is only the name the certificate
    // must list.
    let extra = format!(
        "hostaddr=127.0.0.1 sslmode=verify-full sslrootcert='{}'",
        cluster.ca_file().display()
    );

    let error = session_uses_tls(&cluster.url("db.invalid", "postgres", &extra))
        .await
        .expect_err("the certificate does not name db.invalid");

    assert!(error.contains("certificate verification failed"), "{error}");
    assert!(error.contains("verify-ca"), "{error}");
}

#[tokio::test]
async fn verify_ca_ignores_host_name() {
    let Some(cluster) = cluster() else { return };
    let extra = format!(
        "hostaddr=127.0.0.1 sslmode=verify-ca sslrootcert='{}'",
        cluster.ca_file().display()
    );

    let uses_tls = session_uses_tls(&cluster.url("db.invalid", "postgres", &extra)).await;

    assert_eq!(uses_tls, Ok(true));
}

#[tokio::test]
async fn verify_ca_rejects_untrusted_ca() {
    let Some(cluster) = cluster() else { return };
    let extra = format!(
        "sslmode=verify-ca sslrootcert='{}'",
        cluster.wrong_ca_file().display()
    );

    let error = session_uses_tls(&cluster.url("127.0.0.1", "postgres", &extra))
        .await
        .expect_err("the certificate is signed by another CA");

    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[tokio::test]
async fn require_with_root_certificate_checks_chain() {
    // Guards against require ignoring sslrootcert, which libpq uses to check the chain.
    let Some(cluster) = cluster() else { return };
    let extra = format!(
        "sslmode=require sslrootcert='{}'",
        cluster.wrong_ca_file().display()
    );

    let error = session_uses_tls(&cluster.url("127.0.0.1", "postgres", &extra))
        .await
        .expect_err("the certificate is signed by another CA");

    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[tokio::test]
async fn migrate_binary_runs_over_tls() {
    let Some(cluster) = cluster() else { return };
    let dbname = format!("fk_tls_{:08x}", rand::random::<u32>());
    cluster.psql(&format!("CREATE DATABASE {dbname}"));
    let extra = format!(
        "sslmode=verify-full sslrootcert='{}'",
        cluster.ca_file().display()
    );
    let url = cluster.url("localhost", &dbname, &extra);

    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_freight-kpi"));
    command
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    let output = tokio::time::timeout(BINARY_TIMEOUT, command.output())
        .await
        .expect("migrate finishes in time")
        .expect("run freight-kpi migrate");

    assert!(
        output.status.success(),
        "migrate failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let target = DatabaseTarget::parse(&url).expect("valid connection string");
    let (client, _messages) = connect_dedicated(&target).await.expect("connect over TLS");
    let kpi_table_exists: bool = client
        .query_one(
            r#"SELECT to_regclass('"FreightKpiDaily"') IS NOT NULL"#,
            &[],
        )
        .await
        .expect("look up the KPI table")
        .get(0);
    assert!(kpi_table_exists);
}

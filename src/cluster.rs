//! A throwaway PostgreSQL cluster: `initdb` into a temporary folder, a server that
//! listens on a Unix socket in that folder, and removal of everything on drop.
//!
//! `freight-kpi demo` runs on one, and so does the test suite when no server is
//! reachable. The server binaries come from the machine: `PATH` first, then the
//! usual install folders, highest version first.
//!
//! PostgreSQL refuses to run as root, so when this process is root the server runs
//! as the `postgres` system user, which then owns the folder.

use std::fs::{DirBuilder, File};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Port of the server. With only a Unix socket in a private folder no other server
/// can collide with it, so the standard port is used.
const DEFAULT_PORT: u16 = 5432;

/// Seconds `pg_ctl` waits for the server to start or stop.
const PG_CTL_WAIT_SECONDS: &str = "60";

/// Longest path of a Unix socket that Linux accepts (`sun_path` has room for 108 bytes with
/// the terminating NUL).
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// System user that runs the server when this process is root; the PostgreSQL
/// packages of Debian, Ubuntu and Red Hat create it.
const SERVER_USER: &str = "postgres";

/// Failure to set up or remove a throwaway cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No `initdb`, `pg_ctl` and `postgres` were found together.
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found on PATH or in \
         /usr/lib/postgresql/*/bin; install the server (Debian and Ubuntu: apt-get install \
         postgresql) or set DATABASE_URL to an existing server, for example \
         DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres"
    )]
    BinariesNotFound,

    /// This process is root and the system user for the server is missing.
    #[error(
        "running as root, but the system user {SERVER_USER:?} does not exist; PostgreSQL \
         refuses to run as root, so create that user (the postgresql package does) or run \
         as an ordinary user"
    )]
    NoServerUser,

    /// A file operation on the cluster folder failed.
    #[error("{operation} {path}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `initdb` or `pg_ctl` failed.
    #[error("{program} failed ({status}): {output}")]
    Command {
        program: String,
        status: String,
        output: String,
    },

    /// The temporary folder's path is too long for a Unix socket.
    #[error(
        "the socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes; set TMPDIR \
         to a shorter folder such as /tmp"
    )]
    SocketPathTooLong { path: PathBuf },
}

type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// Listening options of the throwaway server.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Also listen on 127.0.0.1 at this port, for clients that need TCP (a test proxy,
    /// say). `None` keeps the server on its Unix socket only.
    pub tcp_port: Option<u16>,
    /// Start of the folder name, to tell clusters of different owners apart.
    pub folder_prefix: Option<String>,
}

/// User and group ids the server runs as.
#[derive(Debug, Clone, Copy)]
struct ServerUser {
    uid: u32,
    gid: u32,
}

/// A running throwaway cluster. Dropping it stops the server (`pg_ctl stop -m fast`)
/// and removes its folder.
#[derive(Debug)]
pub struct ThrowawayCluster {
    folder: PathBuf,
    bin_dir: PathBuf,
    user: Option<ServerUser>,
    port: u16,
    tcp: bool,
    running: bool,
}

impl ThrowawayCluster {
    /// Creates a cluster in a new folder under the temporary folder (`TMPDIR`, else
    /// `/tmp`) and starts its server, waiting until it accepts connections.
    ///
    /// This blocks for a few seconds, mostly in `initdb`; async callers should run it
    /// with `tokio::task::spawn_blocking`.
    ///
    /// # Errors
    ///
    /// [`ClusterError::BinariesNotFound`] when the server is not installed, otherwise
    /// the step that failed with its output. The folder is removed on failure.
    pub fn start(options: &ClusterOptions) -> Result<Self> {
        let mut cluster = Self::prepare(options)?;
        // On failure the drop of `cluster` removes the folder.
        cluster.initialize()?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Starts a cluster as [`ThrowawayCluster::start`] does, owned from the start by a
    /// watchdog process. The watchdog stops it and removes its folder as soon as this
    /// process exits, however it exits: a normal return, a panic, `std::process::exit`,
    /// or a signal that kills it, even during `initdb`.
    ///
    /// The watchdog is a `sh` that blocks reading a pipe whose only writer is this
    /// process. The kernel closes that pipe when this process ends, the read returns,
    /// and the script runs `pg_ctl stop` and `rm -rf`. The watchdog and the server
    /// run in process groups of their own, so a Ctrl-C in the terminal reaches
    /// neither and the watchdog still cleans up after this process.
    ///
    /// Meant for process-wide clusters kept in a static, which Rust never drops.
    ///
    /// # Errors
    ///
    /// As [`ThrowawayCluster::start`], and [`ClusterError::Io`] when the watchdog
    /// cannot be started. The folder is removed on failure.
    pub fn start_until_process_exit(options: &ClusterOptions) -> Result<ExitWatchdog> {
        let mut cluster = Self::prepare(options)?;
        let watchdog = cluster.spawn_exit_watchdog()?;
        cluster.initialize()?;
        cluster.start_server()?;

        let connection_string = cluster.connection_string("postgres");
        let folder = cluster.folder.clone();
        // From here on the watchdog owns the cluster, so the drop must not stop it.
        cluster.running = false;
        cluster.folder = PathBuf::new();
        Ok(ExitWatchdog {
            connection_string,
            folder,
            _child: watchdog,
        })
    }

    /// Finds the binaries and the server user, and creates the folder.
    fn prepare(options: &ClusterOptions) -> Result<Self> {
        let bin_dir = find_server_binaries()?;
        let user = if running_as_root() {
            Some(lookup_server_user()?)
        } else {
            None
        };

        let prefix = options.folder_prefix.as_deref().unwrap_or("freight-kpi-pg");
        let folder = std::env::temp_dir().join(format!(
            "{prefix}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let port = options.tcp_port.unwrap_or(DEFAULT_PORT);
        let socket = folder.join(format!(".s.PGSQL.{port}"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
            return Err(ClusterError::SocketPathTooLong { path: socket });
        }
        DirBuilder::new()
            .mode(0o700)
            .create(&folder)
            .map_err(io_error("create the cluster folder", &folder))?;

        let cluster = Self {
            folder,
            bin_dir,
            user,
            port,
            tcp: options.tcp_port.is_some(),
            running: false,
        };
        if let Some(user) = user {
            // On failure the drop of `cluster` removes the folder.
            std::os::unix::fs::chown(&cluster.folder, Some(user.uid), Some(user.gid)).map_err(
                io_error(
                    "hand the cluster folder to the server user",
                    &cluster.folder,
                ),
            )?;
        }
        Ok(cluster)
    }

    /// Returns the folder that contains the data directory, the socket and the server log.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Returns the folder of the server binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Returns the port of the server, which also names its Unix socket.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns a key=value connection string for the superuser `postgres` and
    /// `dbname`: over TCP on 127.0.0.1 when the cluster listens there, else over the
    /// Unix socket. Authentication is `trust`, so no password is involved.
    pub fn connection_string(&self, dbname: &str) -> String {
        let host = if self.tcp {
            "127.0.0.1".to_owned()
        } else {
            self.folder.display().to_string()
        };
        format!(
            "host={} port={} user=postgres dbname={}",
            quote_value(&host),
            self.port,
            quote_value(dbname)
        )
    }

    /// Stops the server and removes the folder. Dropping the cluster does the same
    /// and only logs a failure.
    ///
    /// # Errors
    ///
    /// The failing step; the folder is removed even when the server did not stop
    /// cleanly, after an immediate shutdown.
    pub fn stop(mut self) -> Result<()> {
        self.stop_and_remove()
    }

    /// Starts the watchdog of [`ThrowawayCluster::start_until_process_exit`].
    fn spawn_exit_watchdog(&self) -> Result<Child> {
        // pg_ctl fails harmlessly when no server was started yet.
        let script = r#"read -r _ || true
"$1" stop -D "$2" -m fast -w -t 60 >/dev/null 2>&1 || "$1" stop -D "$2" -m immediate -w >/dev/null 2>&1
rm -rf -- "$3""#;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg("freight-kpi-cluster-watchdog")
            .arg(self.bin_dir.join("pg_ctl"))
            .arg(self.data_dir())
            .arg(&self.folder)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let Some(user) = self.user {
            // The folder belongs to the server user, which may remove it, and pg_ctl
            // refuses root.
            command.uid(user.uid).gid(user.gid);
        }
        command
            .spawn()
            .map_err(io_error("start the cluster watchdog for", &self.folder))
    }

    fn data_dir(&self) -> PathBuf {
        self.folder.join("data")
    }

    fn initialize(&mut self) -> Result<()> {
        let mut initdb = self.server_command("initdb");
        initdb
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
            ])
            // Nothing here needs to survive a power loss.
            .arg("--no-sync");
        self.run_logged(initdb, "initdb")?;

        // Settings go into postgresql.conf rather than on the command line, so that no
        // path needs shell quoting.
        let listen = if self.tcp { "127.0.0.1" } else { "" };
        let settings = format!(
            "\n# Added by freight-kpi for a throwaway cluster.\n\
             listen_addresses = '{listen}'\n\
             port = {port}\n\
             unix_socket_directories = {socket_dir}\n\
             unix_socket_permissions = 0700\n\
             max_connections = 200\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
            port = self.port,
            socket_dir = quote_value(&self.folder.display().to_string()),
        );
        let config_path = self.data_dir().join("postgresql.conf");
        File::options()
            .append(true)
            .open(&config_path)
            .and_then(|mut file| file.write_all(settings.as_bytes()))
            .map_err(io_error("append settings to", &config_path))?;
        Ok(())
    }

    fn start_server(&mut self) -> Result<()> {
        let mut pg_ctl = self.server_command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.folder.join("server.log"))
            .args(["-w", "-t", PG_CTL_WAIT_SECONDS, "start"])
            // The server inherits this group; outside the terminal's group it does not
            // receive the Ctrl-C meant for this process, which stops it in order instead.
            .process_group(0);
        let started = self.run_logged(pg_ctl, "pg_ctl start");
        // A server that started late, after pg_ctl gave up, must still be stopped.
        self.running = true;
        started.map_err(|error| self.with_server_log(error))
    }

    /// Restarts the server with a fast shutdown, which closes every connection, and
    /// waits until it accepts connections again. Tests use it to restart a server
    /// under a running service.
    ///
    /// # Errors
    ///
    /// The output of `pg_ctl` and the end of the server log when the restart fails.
    pub fn restart(&self) -> Result<()> {
        let mut pg_ctl = self.server_command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.folder.join("server.log"))
            .args(["-m", "fast", "-w", "-t", PG_CTL_WAIT_SECONDS, "restart"])
            .process_group(0);
        self.run_logged(pg_ctl, "pg_ctl restart")
            .map_err(|error| self.with_server_log(error))
    }

    fn stop_and_remove(&mut self) -> Result<()> {
        if self.folder.as_os_str().is_empty() {
            return Ok(());
        }

        let mut outcome = Ok(());
        if self.running {
            let mut fast = self.server_command("pg_ctl");
            fast.arg("-D").arg(self.data_dir()).args([
                "-m",
                "fast",
                "-w",
                "-t",
                PG_CTL_WAIT_SECONDS,
                "stop",
            ]);
            if let Err(error) = self.run_logged(fast, "pg_ctl stop") {
                let mut immediate = self.server_command("pg_ctl");
                immediate
                    .arg("-D")
                    .arg(self.data_dir())
                    .args(["-m", "immediate", "-w", "stop"]);
                let _ = self.run_logged(immediate, "pg_ctl stop -m immediate");
                outcome = Err(error);
            }
            self.running = false;
        }

        let removed = std::fs::remove_dir_all(&self.folder)
            .map_err(io_error("remove the cluster folder", &self.folder));
        self.folder = PathBuf::new();
        outcome.and(removed)
    }

    /// Returns a command for a server binary, run as the server user when this
    /// process is root.
    fn server_command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        command.current_dir(&self.folder);
        if let Some(user) = self.user {
            command.uid(user.uid).gid(user.gid);
        }
        command
    }

    /// Runs `command` with its output in a file of the folder, and returns that output
    /// in the error when it fails. A file, unlike a pipe, cannot be inherited and held
    /// open by the server that `pg_ctl start` leaves running.
    fn run_logged(&self, mut command: Command, program: &str) -> Result<()> {
        let log_path = self.folder.join("commands.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_error("open", &log_path))?;
        let log_for_stderr = log.try_clone().map_err(io_error("open", &log_path))?;
        let status = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .status()
            .map_err(io_error("run", &self.bin_dir.join(program)))?;
        if status.success() {
            return Ok(());
        }
        Err(ClusterError::Command {
            program: program.to_owned(),
            status: status.to_string(),
            output: last_lines(&log_path, 10),
        })
    }

    fn with_server_log(&self, error: ClusterError) -> ClusterError {
        match error {
            ClusterError::Command {
                program,
                status,
                output,
            } => ClusterError::Command {
                program,
                status,
                output: format!(
                    "{output}; server log: {}",
                    last_lines(&self.folder.join("server.log"), 10)
                ),
            },
            other => other,
        }
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        let folder = self.folder.clone();
        if let Err(error) = self.stop_and_remove() {
            tracing::warn!(
                folder = %folder.display(),
                error = %crate::error::error_chain(&error),
                "failed to remove the throwaway cluster"
            );
        }
    }
}

/// A cluster owned by a watchdog process, which stops it when this process exits.
/// Dropping this value does nothing: only the end of the process closes the
/// watchdog's pipe.
#[derive(Debug)]
pub struct ExitWatchdog {
    connection_string: String,
    folder: PathBuf,
    _child: Child,
}

impl ExitWatchdog {
    /// Returns the connection string of the cluster's `postgres` database.
    pub fn connection_string(&self) -> &str {
        &self.connection_string
    }

    /// Returns the cluster's folder, removed when this process exits.
    pub fn folder(&self) -> &Path {
        &self.folder
    }
}

/// Finds a folder that contains `initdb`, `pg_ctl` and `postgres`: the first on `PATH`,
/// then `/usr/lib/postgresql/<version>/bin` (Debian, Ubuntu) and
/// `/usr/pgsql-<version>/bin` (Red Hat), highest version first.
///
/// # Errors
///
/// [`ClusterError::BinariesNotFound`] with the package to install.
pub fn find_server_binaries() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut versioned = versioned_folders(Path::new("/usr/lib/postgresql"), "", "bin");
    versioned.extend(versioned_folders(Path::new("/usr"), "pgsql-", "bin"));
    versioned.sort_by(|a, b| b.0.cmp(&a.0));

    on_path
        .into_iter()
        .chain(versioned.into_iter().map(|(_, folder)| folder))
        .find(|folder| {
            ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|program| folder.join(program).is_file())
        })
        .ok_or(ClusterError::BinariesNotFound)
}

/// Lists `<parent>/<prefix><version>/<leaf>` with the version parsed as numbers, so
/// that 15 sorts above 9.6.
fn versioned_folders(parent: &Path, prefix: &str, leaf: &str) -> Vec<(Vec<u32>, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version: Vec<u32> = name
                .strip_prefix(prefix)?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            Some((version, entry.path().join(leaf)))
        })
        .collect()
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Looks up the server user through `id`, which also consults NSS sources beyond
/// /etc/passwd.
fn lookup_server_user() -> Result<ServerUser> {
    let id = |flag: &str| -> Option<u32> {
        let output = Command::new("id")
            .arg(flag)
            .arg(SERVER_USER)
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        String::from_utf8(output.stdout).ok()?.trim().parse().ok()
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Ok(ServerUser { uid, gid }),
        _ => Err(ClusterError::NoServerUser),
    }
}

/// Quotes a value for a key=value connection string or postgresql.conf.
fn quote_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn last_lines(path: &Path, count: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join(" | ")
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError {
    let path = path.to_path_buf();
    move |source| ClusterError::Io {
        operation,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let parent = std::env::temp_dir().join(format!("fk-versions-{}", std::process::id()));
        for version in ["9.6", "15", "12"] {
            std::fs::create_dir_all(parent.join(version)).unwrap();
        }
        let mut found = versioned_folders(&parent, "", "bin");
        found.sort_by(|a, b| b.0.cmp(&a.0));
        std::fs::remove_dir_all(&parent).unwrap();

        let order: Vec<Vec<u32>> = found.into_iter().map(|(version, _)| version).collect();
        assert_eq!(order, vec![vec![15], vec![12], vec![9, 6]]);
    }

    #[test]
    fn quoted_values_escape_quotes() {
        assert_eq!(quote_value("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(quote_value("it's"), "'it\\'s'");
    }
}

//! `freight-kpi demo`: it runs end to end on a throwaway cluster and leaves no
//! process and no folder behind, also when stopped with Ctrl-C.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{admin_url, binary, connect};
use freight_kpi::db::DatabaseTarget;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// Time a short demo gets: cluster start, migration, the live seconds and cleanup.
const DEMO_TIMEOUT: Duration = Duration::from_secs(120);

const ZERO_DRIFT_LINE: &str = "zero drift: every bucket";

fn demo_command(args: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command
        .arg("demo")
        .args(args)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Returns the cluster folder named in the demo's output.
fn cluster_folder(stdout: &str) -> PathBuf {
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("started a throwaway PostgreSQL cluster in "))
        .unwrap_or_else(|| panic!("the demo does not name its cluster folder:\n{stdout}"));
    let folder = line
        .split(" with the server binaries")
        .next()
        .expect("split yields a first part");
    PathBuf::from(folder)
}

/// Lists the processes whose command line mentions `folder`.
fn processes_using(folder: &Path) -> Vec<String> {
    let needle = folder.display().to_string();
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(&needle)
                .then(|| format!("{}: {cmdline}", entry.file_name().to_string_lossy()))
        })
        .collect()
}

async fn finish(child: Child) -> Output {
    tokio::time::timeout(DEMO_TIMEOUT, child.wait_with_output())
        .await
        .expect("the demo ends in time")
        .expect("collect the demo's output")
}

#[tokio::test]
async fn demo_runs_and_leaves_nothing_behind() {
    let child = demo_command(&["--seconds", "3", "--loads", "1500"])
        .spawn()
        .expect("start the demo");

    let output = finish(child).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(
        output.status.success(),
        "the demo failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(ZERO_DRIFT_LINE),
        "no zero-drift summary:\n{stdout}"
    );
    assert!(
        stdout.contains("freshness"),
        "no KPI view was drawn:\n{stdout}"
    );
    let folder = cluster_folder(&stdout);
    assert!(!folder.exists(), "{} is left behind", folder.display());
    assert_eq!(processes_using(&folder), Vec::<String>::new());
}

#[tokio::test]
async fn demo_cleans_up_after_ctrl_c() {
    // A process group of its own, as a shell gives a foreground job: the signal goes
    // to the whole group, as a Ctrl-C in a terminal does.
    let mut child = demo_command(&["--seconds", "600", "--loads", "1000"])
        .process_group(0)
        .spawn()
        .expect("start the demo");
    let group = child.id().expect("the demo is running");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));

    let mut seen = String::new();
    tokio::time::timeout(DEMO_TIMEOUT, async {
        let mut line = String::new();
        while stdout.read_line(&mut line).await.expect("read the output") > 0 {
            seen.push_str(&line);
            if line.starts_with("live changes applied") {
                return;
            }
            line.clear();
        }
        panic!("the demo ended before its live view:\n{seen}");
    })
    .await
    .expect("the live view appears in time");
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", "--", &format!("-{group}")])
        .status()
        .expect("run kill");
    assert!(interrupted.success());

    let mut rest = String::new();
    stdout
        .read_to_string(&mut rest)
        .await
        .expect("read the rest of the output");
    let status = tokio::time::timeout(DEMO_TIMEOUT, child.wait())
        .await
        .expect("the demo stops in time")
        .expect("wait for the demo");
    let all = format!("{seen}{rest}");

    assert!(status.success(), "the demo failed after Ctrl-C:\n{all}");
    assert!(
        all.contains(ZERO_DRIFT_LINE),
        "no zero-drift summary:\n{all}"
    );
    let folder = cluster_folder(&all);
    assert!(!folder.exists(), "{} is left behind", folder.display());
    assert_eq!(processes_using(&folder), Vec::<String>::new());
}

#[tokio::test]
async fn demo_on_existing_server_drops_its_database() {
    let child = demo_command(&["--seconds", "2", "--loads", "500"])
        .env("DATABASE_URL", admin_url())
        .spawn()
        .expect("start the demo");

    let output = finish(child).await;
    let stdout = String::from_utf8_lossy(&output.stdout);

    assert!(
        output.status.success(),
        "the demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let name = stdout
        .lines()
        .find_map(|line| line.strip_prefix("dropped the demo database "))
        .unwrap_or_else(|| panic!("the demo does not report its database:\n{stdout}"))
        .to_owned();
    let admin = connect(&DatabaseTarget::parse(&admin_url()).expect("valid admin URL")).await;
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .expect("look up the demo database")
        .get(0);
    assert_eq!(left, 0, "database {name} is left behind");
}

//! A short run of `freight-kpi bench`: a tiny dataset and 1-second phases. It checks
//! that the three outputs are complete and that the KPI table is exact afterwards,
//! never the timings, which depend on the machine.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{binary, kpi_mismatches, TestDb};

/// Figures that every run must report as finite numbers, as JSON pointers.
const REQUIRED_NUMBERS: &[&str] = &[
    "/generation/loads",
    "/generation/loads_per_second",
    "/full_pass/at_full_size/bare_seconds",
    "/full_pass/at_full_size/reconcile_cold_seconds",
    "/full_pass/at_full_size/reconcile_warm_seconds",
    "/full_pass/at_full_size/cold_ratio",
    "/full_pass/at_full_size/warm_ratio",
    "/full_pass/peak_rss_mib",
    "/writer_overhead/without_triggers_tps",
    "/writer_overhead/with_triggers_tps",
    "/writer_overhead/with_service_tps",
    "/writer_overhead/with_triggers_ratio",
    "/writer_overhead/with_service_ratio",
    "/freshness/at_rate/achieved_rate",
    "/freshness/at_rate/p50_ms",
    "/freshness/at_rate/p95_ms",
    "/freshness/at_rate/p99_ms",
    "/freshness/at_rate/max_ms",
    "/freshness/max_sustained_rate",
    "/catch_up/queued",
    "/catch_up/loads_in_buckets",
    "/catch_up/loads_in_table",
    "/catch_up/drain_seconds",
    "/catch_up/changes_per_second",
    "/crossover/full_pass_seconds",
    "/crossover/rates/0/db_seconds_per_minute",
    "/crossover/dirty_shares/0/seconds",
    "/machine/cores",
    "/machine/memory_mib",
    "/final_check/buckets",
    "/final_check/drifted_buckets",
];

/// Text that every run must report, as JSON pointers.
const REQUIRED_TEXT: &[&str] = &[
    "/command",
    "/machine/postgres_version",
    "/machine/postgres_settings/shared_buffers",
    "/machine/postgres_settings/synchronous_commit",
    "/freshness/ramp_ended_by",
];

/// Section headings of the Markdown output, one per phase.
const MARKDOWN_SECTIONS: &[&str] = &[
    "## Targets",
    "## 1. Generate",
    "## 2. Full pass",
    "## 3. Writer overhead",
    "## 4. Freshness",
    "## 5. Catch-up",
    "## 6. Crossover",
];

/// A folder under the system's temporary folder, removed when dropped.
struct OutputFolder(PathBuf);

impl OutputFolder {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("fk-bench-{:016x}", rand::random::<u64>()));
        Self(path)
    }
}

impl Drop for OutputFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn run_bench(db: &TestDb, out: &Path, extra: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(binary());
    command
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .args([
            "bench",
            "--loads",
            "3000",
            "--ventures",
            "8",
            "--days",
            "20",
            "--rate",
            "100",
            "--duration",
            "1",
            "--writers",
            "2",
            "--queued",
            "2000",
            "--repeats",
            "1",
            "--out",
        ])
        .arg(out)
        .args(extra);
    command.output().await.expect("the binary starts")
}

#[tokio::test]
async fn short_bench_writes_complete_outputs() {
    let db = TestDb::empty().await;
    let out = OutputFolder::new();

    let output = run_bench(&db, &out.0, &[]).await;

    assert!(
        output.status.success(),
        "bench failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let json = std::fs::read_to_string(out.0.join("bench.json")).expect("bench.json exists");
    let report: serde_json::Value = serde_json::from_str(&json).expect("bench.json is valid JSON");
    for pointer in REQUIRED_NUMBERS {
        let value = report.pointer(pointer);
        assert!(
            value
                .and_then(serde_json::Value::as_f64)
                .is_some_and(f64::is_finite),
            "{pointer} is not a finite number: {value:?}"
        );
    }
    for pointer in REQUIRED_TEXT {
        let value = report.pointer(pointer);
        assert!(
            value
                .and_then(serde_json::Value::as_str)
                .is_some_and(|text| !text.is_empty()),
            "{pointer} is missing or empty: {value:?}"
        );
    }
    let loads_in_buckets = report["catch_up"]["loads_in_buckets"].as_u64();
    let loads_in_table = report["catch_up"]["loads_in_table"].as_u64();
    assert!(
        loads_in_buckets.is_some_and(|loads| loads > 0),
        "loads of the catch-up's buckets: {loads_in_buckets:?}"
    );
    assert!(
        loads_in_buckets <= loads_in_table,
        "loads of the catch-up's buckets {loads_in_buckets:?} exceed the table's {loads_in_table:?}"
    );
    let targets = report["targets"].as_array().map_or(0, Vec::len);
    assert_eq!(targets, 9, "one entry per target");
    let sizes = report["full_pass"]["by_size"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(sizes >= 2, "full pass measured at {sizes} sizes");

    let markdown = std::fs::read_to_string(out.0.join("bench.md")).expect("bench.md exists");
    for section in MARKDOWN_SECTIONS {
        assert!(markdown.contains(section), "bench.md lacks {section}");
    }
    let target_rows = markdown
        .lines()
        .skip_while(|line| !line.starts_with("## Targets"))
        .skip(4)
        .take_while(|line| line.starts_with('|'))
        .count();
    assert_eq!(target_rows, 9, "rows of the targets table");

    let svg = std::fs::read_to_string(out.0.join("bench.svg")).expect("bench.svg exists");
    let document = roxmltree::Document::parse(&svg).expect("bench.svg is well-formed XML");
    assert_eq!(document.root_element().tag_name().name(), "svg");
    let lines = document
        .descendants()
        .filter(|node| node.has_tag_name("polyline"))
        .count();
    assert!(lines >= 6, "expected 3 lines per chart, found {lines}");

    // Guards against a bench that leaves the KPI table behind the loads it changed.
    let client = db.client().await;
    let mismatches = kpi_mismatches(&client).await;
    assert!(
        mismatches.is_empty(),
        "KPI table differs after the bench:\n{}",
        mismatches.join("\n")
    );
}

#[tokio::test]
async fn bench_refuses_database_with_foreign_loads() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute(r#"INSERT INTO "Load" ("ventureId", status) VALUES (7, 'OPEN')"#)
        .await
        .expect("insert a foreign load");
    let out = OutputFolder::new();

    let output = run_bench(&db, &out.0, &[]).await;

    assert_eq!(output.status.code(), Some(2), "usage error exit code");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--force"),
        "the error names the way out: {stderr}"
    );
    let loads: i64 = client
        .query_one(r#"SELECT count(*) FROM "Load" WHERE "ventureId" = 7"#, &[])
        .await
        .expect("count the foreign load")
        .get(0);
    assert_eq!(loads, 1, "the foreign load is untouched");
    assert!(
        !out.0.join("bench.json").exists(),
        "no output from a refused run"
    );
}

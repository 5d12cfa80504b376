//! The bench's results, and their JSON and Markdown forms.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};

use super::catch_up::CatchUp;
use super::crossover::Crossover;
use super::error::BenchError;
use super::freshness::Freshness;
use super::full_pass::FullPassPoint;
use super::machine::MachineDescription;
use super::options::BenchArgs;
use super::writer_overhead::WriterOverhead;

/// Megabytes (10^6 bytes) in a mebibyte, since the memory target is in MB.
const MB_PER_MIB: f64 = 1.048_576;

/// File names written to `--out`.
pub const OUTPUT_JSON: &str = "bench.json";
pub const OUTPUT_MARKDOWN: &str = "bench.md";
pub const OUTPUT_CHART: &str = "bench.svg";

/// The generation phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub loads: u64,
    pub ventures: u32,
    pub days: u32,
    /// Share of all loads held by the largest venture.
    pub largest_venture_share: f64,
    /// Seconds of `COPY`, index maintenance included, over all chunks.
    pub copy_seconds: f64,
    /// Seconds of `VACUUM (ANALYZE)` after the chunks.
    pub vacuum_seconds: f64,
    /// Loads per second of `COPY`.
    pub loads_per_second: f64,
    /// Loads per second with the vacuum counted.
    pub loads_per_second_with_vacuum: f64,
}

/// The full-pass phase: the table at its full size, and smaller sizes measured while
/// the dataset grew.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FullPass {
    pub at_full_size: FullPassPoint,
    /// One point per size, the full size last.
    pub by_size: Vec<FullPassPoint>,
    /// Peak resident memory of the bench process during the passes at full size.
    pub peak_rss_mib: Option<f64>,
}

/// Resident memory of the bench process, with the service inside it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Memory {
    /// Peak of each phase, in MiB.
    pub peak_rss_mib_by_phase: BTreeMap<String, f64>,
    /// Peak since the process started (`VmHWM`), generation buffers included.
    pub lifetime_peak_mib: Option<f64>,
}

/// The state after the last phase: a dry-run reconcile over the whole table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FinalCheck {
    pub buckets: u64,
    /// Buckets whose stored KPIs differ from "Load"; zero when the incremental path
    /// kept up with every change the bench made.
    pub drifted_buckets: u64,
}

/// One target of the project and whether this run met it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetCheck {
    pub name: String,
    pub target: String,
    pub measured: Option<f64>,
    pub unit: String,
    pub met: bool,
}

/// Every figure of one bench run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The command line that reproduces the run.
    pub command: String,
    pub options: BenchArgs,
    pub machine: MachineDescription,
    pub generation: Generation,
    pub full_pass: FullPass,
    pub writer_overhead: WriterOverhead,
    pub freshness: Freshness,
    pub catch_up: CatchUp,
    pub crossover: Crossover,
    pub memory: Memory,
    pub final_check: FinalCheck,
    pub targets: Vec<TargetCheck>,
}

impl BenchReport {
    /// Compares the figures with the project's targets for a 2-core machine with
    /// PostgreSQL on it.
    pub fn check_targets(&self) -> Vec<TargetCheck> {
        let full = &self.full_pass.at_full_size;
        let overhead = &self.writer_overhead;
        let fresh = &self.freshness.at_rate;
        let sustained = self.freshness.max_sustained_rate;
        let peak_mb = self
            .memory
            .peak_rss_mib_by_phase
            .values()
            .copied()
            .reduce(f64::max)
            .map(|mib| mib * MB_PER_MIB);
        let drain_seconds = 1_000_000.0 / self.catch_up.changes_per_second;

        // Figure, target, measured value, unit, met.
        let rows = [
            (
                "full pass, cold, vs bare aggregation",
                "≤ 1.3",
                Some(full.cold_ratio),
                "×",
                full.cold_ratio <= 1.3,
            ),
            (
                "full pass, warm, vs bare aggregation",
                "≤ 1.3",
                Some(full.warm_ratio),
                "×",
                full.warm_ratio <= 1.3,
            ),
            (
                "peak resident memory, any phase",
                "< 100 MB",
                peak_mb,
                "MB",
                peak_mb.is_some_and(|mb| mb < 100.0),
            ),
            (
                "writer throughput with triggers",
                "≥ 0.85",
                Some(overhead.with_triggers_ratio),
                "×",
                overhead.with_triggers_ratio >= 0.85,
            ),
            (
                "writer throughput with service draining",
                "≥ 0.85",
                Some(overhead.with_service_ratio),
                "×",
                overhead.with_service_ratio >= 0.85,
            ),
            (
                "freshness p50",
                "≤ 100 ms",
                Some(fresh.p50_ms),
                "ms",
                fresh.p50_ms <= 100.0,
            ),
            (
                "freshness p99",
                "≤ 300 ms",
                Some(fresh.p99_ms),
                "ms",
                fresh.p99_ms <= 300.0,
            ),
            (
                "highest sustained rate",
                "≥ 10,000 changes/s",
                Some(sustained),
                "changes/s",
                sustained >= 10_000.0,
            ),
            (
                "catch-up of 1 million changes (at the measured drain rate)",
                "< 10 s",
                Some(drain_seconds),
                "s",
                drain_seconds < 10.0,
            ),
        ];
        rows.into_iter()
            .map(|(name, target, measured, unit, met)| TargetCheck {
                name: name.to_owned(),
                target: target.to_owned(),
                measured,
                unit: unit.to_owned(),
                met,
            })
            .collect()
    }

    /// Writes bench.json, bench.md and bench.svg into `folder`.
    ///
    /// # Errors
    ///
    /// [`BenchError::Output`] naming the file that could not be written.
    pub fn write(&self, folder: &Path) -> Result<(), BenchError> {
        let output = |name: &str, contents: String| {
            let path = folder.join(name);
            std::fs::write(&path, contents).map_err(|source| BenchError::Output { path, source })
        };
        std::fs::create_dir_all(folder).map_err(|source| BenchError::Output {
            path: folder.to_owned(),
            source,
        })?;
        output(
            OUTPUT_JSON,
            serde_json::to_string_pretty(self)
                .expect("every field of the report serializes to JSON"),
        )?;
        output(OUTPUT_MARKDOWN, self.markdown())?;
        output(OUTPUT_CHART, super::chart::render(self))?;
        Ok(())
    }

    /// Renders the figures as Markdown tables.
    pub fn markdown(&self) -> String {
        super::markdown::render(self)
    }
}

/// Formats a figure with thousands separators, with two decimals for a fraction below 100.
pub(super) fn number(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".to_owned();
    }
    if value.abs() < 100.0 && value.fract() != 0.0 {
        return format!("{value:.2}");
    }
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 {
        grouped.insert(0, '-');
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::number;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(number(10_000_000.0), "10,000,000");
        assert_eq!(number(999.4), "999");
        assert_eq!(number(1.256), "1.26");
    }
}

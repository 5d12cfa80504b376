//! The Markdown form of a bench report: one table per phase.

use std::fmt::Write as _;

use super::report::{number, BenchReport};

/// Renders the figures of `report` as Markdown tables.
pub fn render(report: &BenchReport) -> String {
    let mut text = String::new();
    header(&mut text, report);
    targets(&mut text, report);
    generation(&mut text, report);
    full_pass(&mut text, report);
    writer_overhead(&mut text, report);
    freshness(&mut text, report);
    catch_up(&mut text, report);
    crossover(&mut text, report);
    text
}

fn header(text: &mut String, report: &BenchReport) {
    let machine = &report.machine;
    let _ = writeln!(
        text,
        "# freight-kpi bench, {}\n",
        report.started_at.format("%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(text, "Command: `{}`\n", report.command);
    let _ = writeln!(
        text,
        "Machine: {} cores ({}), {} MiB memory, kernel {}; load average {} at start. {}; server on the same machine: {}. Settings: {}.\n",
        machine.cores,
        machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
        machine.memory_mib.map_or("unknown".to_owned(), |mib| mib.to_string()),
        machine.kernel.as_deref().unwrap_or("unknown"),
        machine.load_average_at_start.map_or("unknown".to_owned(), |load| format!("{load:.2}")),
        machine.postgres_version,
        if machine.postgres_on_same_machine { "yes" } else { "no" },
        machine
        .postgres_settings
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(", "),
    );
}

fn targets(text: &mut String, report: &BenchReport) {
    let _ = writeln!(
        text,
        "## Targets\n\n| Figure | Target | Measured | Met |\n| --- | --- | --- | --- |"
    );
    for check in &report.targets {
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} |",
            check.name,
            check.target,
            check.measured.map_or("n/a".to_owned(), |value| format!(
                "{} {}",
                number(value),
                check.unit
            )),
            if check.met { "yes" } else { "no" }
        );
    }
}

fn generation(text: &mut String, report: &BenchReport) {
    let generation = &report.generation;
    let _ = writeln!(
        text,
        "\n## 1. Generate\n\n| Loads | Ventures | Days | Largest venture | COPY | Loads/s | VACUUM ANALYZE | Loads/s with vacuum |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n| {} | {} | {} | {:.1}% | {:.1} s | {} | {:.1} s | {} |",
        number(generation.loads as f64),
        generation.ventures,
        generation.days,
        generation.largest_venture_share * 100.0,
        generation.copy_seconds,
        number(generation.loads_per_second),
        generation.vacuum_seconds,
        number(generation.loads_per_second_with_vacuum),
    );
}

fn full_pass(text: &mut String, report: &BenchReport) {
    let _ = writeln!(
        text,
        "\n## 2. Full pass\n\nMedians; peak resident memory {}.\n\n| Loads | Buckets | Bare aggregation | Reconcile cold | Ratio | Reconcile warm | Ratio |\n| --- | --- | --- | --- | --- | --- | --- |",
        report.full_pass.peak_rss_mib.map_or("n/a".to_owned(), |mib| format!("{mib:.1} MiB")),
    );
    for point in &report.full_pass.by_size {
        let _ = writeln!(
            text,
            "| {} | {} | {:.3} s | {:.3} s | {:.2} | {:.3} s | {:.2} |",
            number(point.loads as f64),
            number(point.buckets as f64),
            point.bare_seconds,
            point.reconcile_cold_seconds,
            point.cold_ratio,
            point.reconcile_warm_seconds,
            point.warm_ratio,
        );
    }
}

fn writer_overhead(text: &mut String, report: &BenchReport) {
    let overhead = &report.writer_overhead;
    let _ = writeln!(
        text,
        "\n## 3. Writer overhead\n\n{} writers, single-row updates and inserts at full speed.\n\n| Configuration | Transactions/s | Ratio |\n| --- | --- | --- |\n| without triggers | {} | 1.00 |\n| with triggers | {} | {:.2} |\n| with triggers and the service draining | {} | {:.2} |",
        overhead.writers,
        number(overhead.without_triggers_tps),
        number(overhead.with_triggers_tps),
        overhead.with_triggers_ratio,
        number(overhead.with_service_tps),
        overhead.with_service_ratio,
    );
}

fn freshness(text: &mut String, report: &BenchReport) {
    let freshness = &report.freshness;
    let _ = writeln!(
        text,
        "\n## 4. Freshness\n\nCommit to visible, measured by an observer polling every {} ms. Highest sustained rate: {} changes/s ({}).\n\n| Target rate | Achieved | Probes | p50 | p95 | p99 | max | Service p50 / p99 | Max queue | Sustained |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        freshness.poll_interval_ms,
        number(freshness.max_sustained_rate),
        freshness.ramp_ended_by,
    );
    let mut runs: Vec<_> = std::iter::once(&freshness.at_rate)
        .chain(&freshness.ramp)
        .collect();
    runs.sort_by(|a, b| a.target_rate.total_cmp(&b.target_rate));
    for run in runs {
        let _ = writeln!(
            text,
            "| {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} | {} |",
            number(run.target_rate),
            number(run.achieved_rate),
            number(run.probes_observed as f64),
            run.p50_ms,
            run.p95_ms,
            run.p99_ms,
            run.max_ms,
            match (run.service_p50_ms, run.service_p99_ms) {
                (Some(p50), Some(p99)) => format!("{p50:.0} / {p99:.0} ms"),
                _ => "n/a".to_owned(),
            },
            number(run.queue_depth_max as f64),
            if run.sustained {
                "yes".to_owned()
            } else {
                format!("no: {}", run.limited_by.as_deref().unwrap_or(""))
            },
        );
    }
}

fn catch_up(text: &mut String, report: &BenchReport) {
    let catch_up = &report.catch_up;
    let _ = writeln!(
        text,
        "\n## 5. Catch-up\n\n| Queued changes | Distinct buckets | Their loads | Drain | Changes/s | Batches | Buckets recomputed |\n| --- | --- | --- | --- | --- | --- | --- |\n| {} | {} | {} ({:.0}% of {}) | {:.2} s | {} | {} | {} |",
        number(catch_up.queued as f64),
        number(catch_up.distinct_buckets as f64),
        number(catch_up.loads_in_buckets as f64),
        100.0 * catch_up.loads_in_buckets as f64 / catch_up.loads_in_table.max(1) as f64,
        number(catch_up.loads_in_table as f64),
        catch_up.drain_seconds,
        number(catch_up.changes_per_second),
        catch_up.batches,
        number(catch_up.buckets_recomputed as f64),
    );
}

fn crossover(text: &mut String, report: &BenchReport) {
    let crossover = &report.crossover;
    let _ = writeln!(
        text,
        "\n## 6. Crossover\n\nOne full pass (warm reconcile): {:.3} s. Incremental database time per minute of writes, and how often a full pass could run for the same time:\n\n| Rate | Achieved | DB s/min | Full passes/min | Same cost as a full pass every | Batches |\n| --- | --- | --- | --- | --- | --- |",
        crossover.full_pass_seconds,
    );
    for point in &crossover.rates {
        let _ = writeln!(
            text,
            "| {} | {} | {:.2} | {:.2} | {:.1} min | {} |",
            number(point.target_rate),
            number(point.achieved_rate),
            point.db_seconds_per_minute,
            point.full_passes_per_minute,
            point.equal_cost_full_pass_every_minutes,
            point.batches,
        );
    }
    let _ = writeln!(
        text,
        "\nIncremental costs one full pass per minute at {}.\n\n| Share of buckets recomputed by key | Buckets | Time | vs full pass |\n| --- | --- | --- | --- |",
        match crossover.crossover_rate {
        Some(rate) if crossover.crossover_extrapolated => format!("about {} changes/s (extrapolated beyond the measured rates)", number(rate)),
        Some(rate) => format!("about {} changes/s", number(rate)),
        None => "no measured or extrapolated rate: at these table sizes the incremental path costs more than one full pass per minute even when idle".to_owned(),
        }
    );
    for point in &crossover.dirty_shares {
        let _ = writeln!(
            text,
            "| {:.0}% | {} | {:.3} s | {:.2} |",
            point.share * 100.0,
            number(point.buckets as f64),
            point.seconds,
            point.full_pass_ratio,
        );
    }
    let _ = writeln!(
        text,
        "\nBreak-even share: {}.\n\n## Final check\n\nA dry-run reconcile after the last phase found {} drifted buckets of {}.",
        crossover.break_even_share.map_or("not reached".to_owned(), |share| format!("{:.0}% of buckets", share * 100.0)),
        report.final_check.drifted_buckets,
        number(report.final_check.buckets as f64),
    );
}

//! `freight-kpi bench`: measures, on the user's own PostgreSQL, what the incremental
//! path costs and delivers next to a once-a-day full aggregation.
//!
//! Phases, all in one run against a scratch database: generate a dataset with `COPY`,
//! full pass against the bare aggregation, writer overhead of the triggers, freshness
//! at a steady rate and the highest sustained rate, catch-up of a queued backlog, and
//! the crossover between incremental and full recompute. The results go to a JSON
//! file, a Markdown table and an SVG chart.

mod catch_up;
mod chart;
mod command;
mod crossover;
mod dataset;
mod error;
mod freshness;
mod full_pass;
mod machine;
mod markdown;
mod memory;
mod options;
mod progress;
mod report;
mod runner;
mod service;
mod workload;
mod writer_overhead;

pub use command::execute;
pub use error::BenchError;
pub use options::BenchArgs;
pub use report::{BenchReport, OUTPUT_CHART, OUTPUT_JSON, OUTPUT_MARKDOWN};
pub use runner::run_bench;

//! The KPI definitions and the two ways of applying them to `"FreightKpiDaily"`: by
//! bucket key for the incremental path, and as one pass over a range for reconcile.

mod bucket_lock;
mod day;
mod definitions;
mod full_pass;
mod recompute;
mod table_check;

pub use bucket_lock::{lock_all_buckets, lock_buckets, BUCKET_LOCK_STRIPES};
pub use day::BucketDay;
pub use full_pass::{full_pass, BucketRange, FullPassSummary};
pub use recompute::{recompute_buckets, BucketOverflow, RecomputeOutcome};
pub use table_check::check_kpi_table;

/// A venture and a UTC calendar day: the unit of `"FreightKpiDaily"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Bucket {
    pub venture_id: i32,
    pub day: BucketDay,
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "venture {} day {}", self.venture_id, self.day)
    }
}

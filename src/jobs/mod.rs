//! Job bookkeeping: the `"JobRunLog"` rows every job run writes.

mod run_log;

pub use run_log::{finish_run, start_run, JobName, RunStatus};

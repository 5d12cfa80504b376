//! The change queue from the service's side: claiming batches of changed buckets,
//! recomputing them, and reporting the queue's depth and age.

mod drain;
mod queue;

pub use drain::{drain_queue, process_batch, BatchReport, DrainSettings};
pub use queue::{queue_health, BucketFailure, QueueHealth};

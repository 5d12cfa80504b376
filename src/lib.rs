//! freight-kpi keeps the daily KPI table `"FreightKpiDaily"` exact and fresh as rows of
//! `"Load"` change: triggers queue the touched (venture, UTC day) buckets, a listener
//! recomputes them within a fraction of a second, and a reconcile repairs any drift.

pub mod bench;
pub mod capture;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod config_file;
pub mod db;
pub mod demo;
pub mod error;
pub mod jobs;
pub mod kpi;
pub mod listen;
pub mod observe;
pub mod reconcile;
pub mod service;
pub mod status;

pub use error::{Error, Result};

/// First key of every two-key advisory lock this service takes ("FKPI" in ASCII).
/// Applications that use the single bigint form or other first keys never collide
/// with it.
pub const ADVISORY_LOCK_NAMESPACE: i32 = 0x464B_5049;

//! Options of `freight-kpi bench`, each with its documented default.

use std::path::PathBuf;
use std::time::Duration;

use super::error::BenchError;

/// Measure incremental against full aggregation on a scratch database.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct BenchArgs {
    /// Loads to generate.
    #[arg(long, default_value_t = 10_000_000)]
    pub loads: u64,
    /// Ventures the loads are spread over, a few large ones and a long tail.
    #[arg(long, default_value_t = 200)]
    pub ventures: u32,
    /// Days of history the loads are spread over, ending yesterday (UTC).
    #[arg(long, default_value_t = 730)]
    pub days: u32,
    /// Steady change rate of the freshness phase, in changes per second over all
    /// writers; the ramp and the crossover use multiples of it.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u32,
    /// Seconds of each timed phase: each writer-overhead configuration and the
    /// freshness run. Ramp steps and crossover rates run a third of it, at least 1 s.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Writer connections doing single-row updates and inserts on "Load".
    #[arg(long, default_value_t = 8)]
    pub writers: u32,
    /// Changes queued while the service is stopped, for the catch-up phase.
    #[arg(long, default_value_t = 1_000_000)]
    pub queued: u64,
    /// Repetitions of each full-pass measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
    /// Folder for bench.json, bench.md and bench.svg; created if missing.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Run even if "Load" contains loads that the bench did not generate. The bench still
    /// changes and deletes only its own loads, but its reconcile passes repair the KPI
    /// rows of every venture.
    #[arg(long)]
    pub force: bool,
}

impl Default for BenchArgs {
    fn default() -> Self {
        Self {
            loads: 10_000_000,
            ventures: 200,
            days: 730,
            rate: 2_000,
            duration: 30.0,
            writers: 8,
            queued: 1_000_000,
            repeats: 3,
            out: PathBuf::from("bench-results"),
            force: false,
        }
    }
}

/// Largest number of ventures: they must fit the venture-id range the bench owns.
pub const MAX_VENTURES: u32 = 100_000;

impl BenchArgs {
    /// Checks that every option is in range.
    ///
    /// # Errors
    ///
    /// [`BenchError::InvalidOption`] naming the first option out of range.
    pub fn validate(&self) -> Result<(), BenchError> {
        let invalid = |key: &'static str, value: String, allowed: &'static str| {
            Err(BenchError::InvalidOption {
                key,
                value,
                allowed,
            })
        };
        if self.loads < 1_000 {
            return invalid("--loads", self.loads.to_string(), "at least 1000");
        }
        if self.ventures == 0 || self.ventures > MAX_VENTURES {
            return invalid("--ventures", self.ventures.to_string(), "1 to 100000");
        }
        if self.days == 0 || self.days > 3_650 {
            return invalid("--days", self.days.to_string(), "1 to 3650");
        }
        if self.rate == 0 {
            return invalid(
                "--rate",
                self.rate.to_string(),
                "at least 1 change per second",
            );
        }
        if !self.duration.is_finite() || self.duration < 0.5 || self.duration > 3_600.0 {
            return invalid(
                "--duration",
                self.duration.to_string(),
                "0.5 to 3600 seconds",
            );
        }
        if self.writers == 0 || self.writers > 64 {
            return invalid("--writers", self.writers.to_string(), "1 to 64");
        }
        if self.queued == 0 {
            return invalid("--queued", self.queued.to_string(), "at least 1");
        }
        if self.repeats == 0 || self.repeats > 20 {
            return invalid("--repeats", self.repeats.to_string(), "1 to 20");
        }
        Ok(())
    }

    /// Length of the freshness run and of each writer-overhead configuration.
    pub fn phase_length(&self) -> Duration {
        Duration::from_secs_f64(self.duration)
    }

    /// Length of each ramp step and crossover rate: a third of `--duration`, at
    /// least 1 second.
    pub fn step_length(&self) -> Duration {
        Duration::from_secs_f64((self.duration / 3.0).max(1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(BenchArgs::default().validate().is_ok());
    }

    #[test]
    fn zero_writers_are_rejected() {
        let args = BenchArgs {
            writers: 0,
            ..BenchArgs::default()
        };
        assert!(matches!(
            args.validate(),
            Err(BenchError::InvalidOption {
                key: "--writers",
                ..
            })
        ));
    }

    #[test]
    fn step_length_has_floor_of_one_second() {
        let args = BenchArgs {
            duration: 1.0,
            ..BenchArgs::default()
        };
        assert_eq!(args.step_length(), Duration::from_secs(1));
    }
}

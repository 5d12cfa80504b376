//! Resident memory of this process, sampled on a thread of its own.
//!
//! The service runs inside the bench process, so the figures include the bench's own
//! writers and histograms: they are an upper bound of what `freight-kpi run` needs.
//! Linux only; elsewhere every reading is `None`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the sampler reads `/proc/self/status`. Short phases still get dozens of
/// samples, and a read costs a few microseconds.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// Peak resident set size since the last [`RssSampler::reset`].
pub struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RssSampler {
    /// Starts sampling.
    pub fn start() -> Self {
        let peak_kib = Arc::new(AtomicU64::new(current_rss_kib().unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let peak_kib = peak_kib.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("bench-rss".to_owned())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(rss) = current_rss_kib() {
                            peak_kib.fetch_max(rss, Ordering::Relaxed);
                        }
                        std::thread::sleep(SAMPLE_INTERVAL);
                    }
                })
                .ok()
        };
        Self {
            peak_kib,
            stop,
            thread,
        }
    }

    /// Starts a new measurement window at the current resident size.
    pub fn reset(&self) {
        self.peak_kib
            .store(current_rss_kib().unwrap_or(0), Ordering::Relaxed);
    }

    /// Returns the peak of the current window in MiB, or `None` where `/proc` is absent.
    pub fn peak_mib(&self) -> Option<f64> {
        current_rss_kib()?;
        Some(self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Returns the process's peak resident size since it started (`VmHWM`), in MiB.
pub fn lifetime_peak_mib() -> Option<f64> {
    read_status_kib("VmHWM:").map(|kib| kib as f64 / 1024.0)
}

fn current_rss_kib() -> Option<u64> {
    read_status_kib("VmRSS:")
}

fn read_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_reports_nonzero_peak_on_linux() {
        let sampler = RssSampler::start();
        let peak = sampler.peak_mib();
        if cfg!(target_os = "linux") {
            assert!(peak.is_some_and(|mib| mib > 0.0), "{peak:?}");
        }
    }
}

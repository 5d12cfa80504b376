//! Progress bars on standard error for the long phases. indicatif hides them when
//! standard error is not a terminal, so logs and CI output stay clean.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Creates a bar that counts items, such as generated loads.
pub fn counter(label: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{bar:32}] {human_pos}/{human_len} ({per_sec}, {eta} left) {msg}",
        )
        .expect("the template is constant and valid")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

/// Creates a bar that fills over a timed phase of known length.
pub fn timed(label: &str, length: Duration) -> ProgressBar {
    let bar = ProgressBar::new(length.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:32}] {elapsed} of {msg}")
            .expect("the template is constant and valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar.set_message(format!("{:.0} s", length.as_secs_f64()));
    bar
}

/// Creates a spinner for a step of unknown length, such as a full pass.
pub fn spinner(label: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} {spinner} {msg} {elapsed}")
            .expect("the template is constant and valid"),
    );
    bar.set_prefix(label.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

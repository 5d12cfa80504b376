//! The SVG chart: freshness percentiles against change rate, and full-pass time
//! against table size. Written by hand: two line charts do not need a plotting crate.

use std::fmt::Write as _;

use super::report::BenchReport;

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 420.0;
const PANEL_WIDTH: f64 = WIDTH / 2.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 50.0;
const MARGIN_BOTTOM: f64 = 60.0;
const COLORS: &[&str] = &["#1b9e77", "#d95f02", "#7570b3"];

/// A named line of (x, y) points.
struct Series<'a> {
    name: &'a str,
    points: Vec<(f64, f64)>,
}

/// Renders the chart of `report` as a standalone SVG document.
pub fn render(report: &BenchReport) -> String {
    let mut runs: Vec<_> = std::iter::once(&report.freshness.at_rate)
        .chain(&report.freshness.ramp)
        .collect();
    runs.sort_by(|a, b| a.achieved_rate.total_cmp(&b.achieved_rate));
    let freshness = [
        Series {
            name: "p50",
            points: runs
                .iter()
                .map(|run| (run.achieved_rate, run.p50_ms))
                .collect(),
        },
        Series {
            name: "p95",
            points: runs
                .iter()
                .map(|run| (run.achieved_rate, run.p95_ms))
                .collect(),
        },
        Series {
            name: "p99",
            points: runs
                .iter()
                .map(|run| (run.achieved_rate, run.p99_ms))
                .collect(),
        },
    ];

    let sizes = &report.full_pass.by_size;
    let full_pass = [
        Series {
            name: "bare aggregation",
            points: sizes
                .iter()
                .map(|p| (p.loads as f64, p.bare_seconds))
                .collect(),
        },
        Series {
            name: "reconcile, cold",
            points: sizes
                .iter()
                .map(|p| (p.loads as f64, p.reconcile_cold_seconds))
                .collect(),
        },
        Series {
            name: "reconcile, warm",
            points: sizes
                .iter()
                .map(|p| (p.loads as f64, p.reconcile_warm_seconds))
                .collect(),
        },
    ];

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    panel(
        &mut svg,
        0.0,
        "Freshness: commit to visible",
        "changes per second (achieved)",
        "milliseconds",
        &freshness,
    );
    panel(
        &mut svg,
        PANEL_WIDTH,
        "Full pass time against table size",
        "loads",
        "seconds",
        &full_pass,
    );
    svg.push_str("</svg>\n");
    svg
}

fn panel(
    svg: &mut String,
    left: f64,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) {
    let plot_left = left + MARGIN_LEFT;
    let plot_right = left + PANEL_WIDTH - MARGIN_RIGHT;
    let plot_top = MARGIN_TOP;
    let plot_bottom = HEIGHT - MARGIN_BOTTOM;

    let finite = |value: f64| value.is_finite();
    let x_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(x, _)| *x))
        .filter(|x| finite(*x))
        .fold(0.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(_, y)| *y))
        .filter(|y| finite(*y))
        .fold(0.0, f64::max);
    let (x_step, x_top) = axis(x_max);
    let (y_step, y_top) = axis(y_max);
    let to_x = |x: f64| plot_left + x / x_top * (plot_right - plot_left);
    let to_y = |y: f64| plot_bottom - y / y_top * (plot_bottom - plot_top);

    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        left + PANEL_WIDTH / 2.0,
        escape(title)
    );

    // Grid lines and tick labels.
    let mut tick = 0.0;
    while tick <= y_top + y_step / 2.0 {
        let y = to_y(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{plot_left}" y1="{y:.1}" x2="{plot_right}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            plot_left - 6.0,
            y + 4.0,
            label(tick)
        );
        tick += y_step;
    }
    let mut tick = 0.0;
    while tick <= x_top + x_step / 2.0 {
        let x = to_x(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{plot_top}" x2="{x:.1}" y2="{plot_bottom}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            plot_bottom + 16.0,
            label(tick)
        );
        tick += x_step;
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{plot_left}" y1="{plot_bottom}" x2="{plot_right}" y2="{plot_bottom}" stroke="#333"/><line x1="{plot_left}" y1="{plot_top}" x2="{plot_left}" y2="{plot_bottom}" stroke="#333"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (plot_left + plot_right) / 2.0,
        HEIGHT - 20.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
        left + 18.0,
        (plot_top + plot_bottom) / 2.0,
        left + 18.0,
        (plot_top + plot_bottom) / 2.0,
        escape(y_label)
    );

    for (index, line) in series.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let points: Vec<String> = line
            .points
            .iter()
            .filter(|(x, y)| finite(*x) && finite(*y))
            .map(|(x, y)| format!("{:.1},{:.1}", to_x(*x), to_y(*y)))
            .collect();
        if points.len() > 1 {
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
        }
        for point in &points {
            let (x, y) = point.split_once(',').expect("formatted as x,y above");
            let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="3.5" fill="{color}"/>"#);
        }
        let legend_y = plot_top + 8.0 + index as f64 * 18.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{legend_y:.1}" x2="{:.1}" y2="{legend_y:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            plot_left + 12.0,
            plot_left + 32.0,
            plot_left + 38.0,
            legend_y + 4.0,
            escape(line.name)
        );
    }
}

/// Returns a tick step of 1, 2 or 5 times a power of ten giving about five ticks, and
/// the axis end, a multiple of it at or above `max`.
fn axis(max: f64) -> (f64, f64) {
    if !max.is_finite() || max <= 0.0 {
        return (1.0, 5.0);
    }
    let rough = max / 5.0;
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|factor| factor * power)
        .find(|step| *step >= rough)
        .unwrap_or(10.0 * power);
    (step, (max / step).ceil() * step)
}

/// Formats a tick value briefly: 2.5, 40, 1.2k, 10M.
fn label(value: f64) -> String {
    let (scaled, suffix) = if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    let text = format!("{scaled:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{suffix}")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_ends_at_round_multiple_above_max() {
        assert_eq!(axis(87.0), (20.0, 100.0));
        assert_eq!(axis(10_500.0), (5_000.0, 15_000.0));
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(label(2_500.0), "2.5k");
        assert_eq!(label(10_000_000.0), "10M");
        assert_eq!(label(0.25), "0.25");
        assert_eq!(label(0.0), "0");
    }
}

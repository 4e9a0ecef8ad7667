//! `--plot`: a PNG of the latency distributions as percentile curves (HDR style: the x axis
//! spreads the tail, 0 % … 90 % … 99 % … 99.9 %; the y axis is logarithmic so sub-millisecond
//! round trips and multi-second queue waits fit one chart).
//!
//! Text is drawn with the DejaVu Sans font file that the project installs (Debian package
//! `fonts-dejavu-core`); without it the chart is refused with a clear error rather than drawn
//! without labels.

use crate::report::{Metric, Report};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// The font the chart's text is drawn with.
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const WIDTH: u32 = 1000;
const HEIGHT: u32 = 600;
/// The x axis runs to 99.9 % (three nines).
const NINES: f64 = 3.0;

/// Why the chart could not be written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlotError {
    #[error("cannot read the chart font {path}: {reason} (install the fonts-dejavu-core package)")]
    Font { path: String, reason: String },
    #[error("drawing the chart failed: {0}")]
    Draw(String),
}

/// Reads a font file for good (the plotting library keeps fonts for the whole process).
pub fn load_font(path: &str) -> Result<&'static [u8], PlotError> {
    let bytes = std::fs::read(path).map_err(|e| PlotError::Font {
        path: path.into(),
        reason: e.to_string(),
    })?;
    Ok(Box::leak(bytes.into_boxed_slice()))
}

fn ensure_font() -> Result<(), PlotError> {
    static FONT: OnceLock<Result<(), PlotError>> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = load_font(FONT_PATH)?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
            PlotError::Font {
                path: FONT_PATH.into(),
                reason: "not a TrueType font".into(),
            }
        })
    })
    .clone()
}

/// The metrics drawn, with their colours.
const SERIES: [(Metric, RGBColor); 4] = [
    (Metric::TimeToMatch, RGBColor(31, 119, 180)),
    (Metric::TimeToPlay, RGBColor(214, 39, 40)),
    (Metric::TimeToFirstState, RGBColor(44, 160, 44)),
    (Metric::GameRtt, RGBColor(148, 103, 189)),
];

/// The percentile for a position on the x axis: x = -log10(1 - q).
fn quantile_at(x: f64) -> f64 {
    1.0 - 10f64.powf(-x)
}

fn percent_label(x: &f64) -> String {
    let p = quantile_at(*x) * 100.0;
    let s = format!("{p:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// The (x, ms) points of one histogram's percentile curve.
fn curve(h: &hdrhistogram::Histogram<u64>) -> Vec<(f64, f64)> {
    (0..=300)
        .map(|i| {
            let x = i as f64 / 100.0;
            let q = quantile_at(x).min(0.999);
            (x, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect()
}

/// Writes the chart of `report`'s latencies to `path` (PNG).
pub fn write_png(report: &Report, path: &Path) -> Result<(), PlotError> {
    ensure_font()?;
    let draw = |e: &dyn std::fmt::Display| PlotError::Draw(e.to_string());
    let series: Vec<_> = SERIES
        .iter()
        .filter(|(m, _)| !report.histograms.get(*m).is_empty())
        .map(|(m, c)| (*m, *c, curve(report.histograms.get(*m))))
        .collect();
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    for (_, _, pts) in &series {
        for (_, y) in pts {
            lo = lo.min(*y);
            hi = hi.max(*y);
        }
    }
    if series.is_empty() {
        (lo, hi) = (0.1, 1000.0);
    }
    let lo = (lo * 0.7).max(0.001);
    let hi = (hi * 1.5).max(lo * 10.0);

    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let title = format!(
        "berth-sim latency: {} players, {} matches finished, {} failed",
        report.players, report.matches.finished, report.failed
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..NINES, (lo..hi).log_scale())
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms, log scale)")
        .x_labels(4)
        .x_label_formatter(&percent_label)
        .y_label_formatter(&|y| {
            let s = format!("{y:.3}");
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        })
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| draw(&e))?;
    for (metric, color, pts) in series.iter() {
        let n = report.histograms.get(*metric).len();
        let color = *color;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(format!("{} (n={n})", metric.name().trim_end_matches("_ms")))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
    }
    if series.is_empty() {
        root.draw(&Text::new(
            "no samples",
            ((WIDTH / 2 - 50) as i32, (HEIGHT / 2) as i32),
            ("sans-serif", 24),
        ))
        .map_err(|e| draw(&e))?;
    } else {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw(&e))?;
    }
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SwarmConfig;
    use crate::report::Histograms;
    use std::time::Duration;

    fn report_with(h: Histograms) -> Report {
        let mut r = crate::report::Report::assemble(
            SwarmConfig::default(),
            8,
            Duration::from_secs(10),
            Default::default(),
        );
        r.histograms = h;
        r
    }

    #[test]
    fn x_axis_labels_are_percentiles() {
        assert_eq!(percent_label(&0.0), "0%");
        assert_eq!(percent_label(&1.0), "90%");
        assert_eq!(percent_label(&2.0), "99%");
        assert_eq!(percent_label(&3.0), "99.9%");
    }

    #[test]
    fn a_missing_font_is_a_clear_error() {
        let e = load_font("/nonexistent/font.ttf").expect_err("missing");
        assert!(e.to_string().contains("fonts-dejavu-core"), "{e}");
    }

    #[test]
    fn the_chart_is_a_png() {
        if !Path::new(FONT_PATH).exists() {
            eprintln!("skipping: {FONT_PATH} is missing (install fonts-dejavu-core)");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Histograms::default();
        let mut rng = fastrand::Rng::with_seed(5);
        // (metric, least, spread, unit in µs)
        let spreads = [
            (Metric::TimeToMatch, 50, 400, 1000),
            (Metric::TimeToPlay, 300, 900, 1000),
            (Metric::TimeToFirstState, 100, 300, 1000),
            (Metric::GameRtt, 300, 5000, 1),
        ];
        for _ in 0..500 {
            for &(metric, least, spread, unit_us) in &spreads {
                let value = least + rng.u64(0..spread);
                h.record(metric, Duration::from_micros(value * unit_us));
            }
        }
        for (name, r) in [
            ("full.png", report_with(h)),
            ("empty.png", report_with(Histograms::default())),
        ] {
            let path = dir.path().join(name);
            write_png(&r, &path).expect("chart");
            let bytes = std::fs::read(&path).expect("written");
            assert!(bytes.len() > 1000, "{name}: {} bytes", bytes.len());
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name}: PNG signature");
        }
    }
}

//! A small SVG line chart against sequence length, one series per
//! implementation: throughput with the adapter's FMA ceiling as a dashed
//! line, or time on a log scale (for implementations that compute
//! different functions, where only cost compares).

use std::fmt::Write as _;

pub struct Series {
    pub label: String,
    /// (sequence length, value on the y axis)
    pub points: Vec<(f64, f64)>,
}

/// What the y axis shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YAxis {
    /// GFLOP/s, linear from 0.
    Throughput,
    /// Median milliseconds, log scale (powers of ten).
    Time,
}

impl YAxis {
    fn label(self) -> &'static str {
        match self {
            YAxis::Throughput => "GFLOP/s",
            YAxis::Time => "median time (ms, log scale)",
        }
    }
    fn unit(self) -> &'static str {
        match self {
            YAxis::Throughput => "GFLOP/s",
            YAxis::Time => "ms",
        }
    }
}

pub struct Chart {
    pub title: String,
    pub series: Vec<Series>,
    /// Horizontal reference line: (label, GFLOP/s).
    pub ceiling: Option<(String, f64)>,
    /// Join the points of a series (sweeps) or mark them only (suites,
    /// whose cases differ in more than length).
    pub connect: bool,
    pub y_axis: YAxis,
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// Escapes text for SVG.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" step for about `target` ticks over `span`.
fn tick_step(span: f64, target: f64) -> f64 {
    let raw = span / target;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    step.max(f64::MIN_POSITIVE)
}

pub fn render_svg(chart: &Chart) -> String {
    let points = chart.series.iter().flat_map(|s| s.points.iter());
    let (mut x_min, mut x_max) = (f64::INFINITY, 0.0f64);
    let (mut y_min, mut y_max) = (f64::INFINITY, 0.0f64);
    for &(x, y) in points {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if let Some((_, c)) = &chart.ceiling {
        y_max = y_max.max(*c);
    }
    if !x_min.is_finite() {
        (x_min, x_max) = (1.0, 2.0);
    }
    // Sequence lengths are spread over powers of two: log2 axis, padded
    // half an octave each side.
    let (lx_min, lx_max) = (x_min.log2() - 0.5, x_max.log2() + 0.5);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let px = |x: f64| LEFT + (x.log2() - lx_min) / (lx_max - lx_min) * plot_w;
    // Throughput: linear from 0. Time: log10, whole decades around the data.
    let (y_bottom, y_top) = match chart.y_axis {
        YAxis::Throughput => (0.0, if y_max > 0.0 { y_max * 1.1 } else { 1.0 }),
        YAxis::Time if y_max > 0.0 && y_min > 0.0 => (
            y_min.log10().floor(),
            y_max.log10().ceil().max(y_min.log10().floor() + 1.0),
        ),
        YAxis::Time => (0.0, 1.0),
    };
    let py = |y: f64| {
        let at = match chart.y_axis {
            YAxis::Throughput => y,
            YAxis::Time => y.max(f64::MIN_POSITIVE).log10(),
        };
        TOP + plot_h - (at - y_bottom) / (y_top - y_bottom) * plot_h
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        LEFT + plot_w / 2.0,
        esc(&chart.title)
    );
    // Axes, y grid and ticks.
    let ticks: Vec<(f64, String)> = match chart.y_axis {
        YAxis::Throughput => {
            let step = tick_step(y_top, 6.0);
            let decimals = (-step.log10().floor()).max(0.0) as usize;
            let count = (y_top / step + 1e-9).floor() as usize;
            (0..=count)
                .map(|i| {
                    let y = i as f64 * step;
                    (y, format!("{y:.decimals$}"))
                })
                .collect()
        }
        YAxis::Time => (y_bottom as i32..=y_top as i32)
            .map(|decade| {
                let y = 10f64.powi(decade);
                (y, format!("{y}"))
            })
            .collect(),
    };
    for (y, label) in ticks {
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{right}" y1="{at:.1}" y2="{at:.1}" stroke="#ddd"/><text x="{label_x}" y="{label_y:.1}" text-anchor="end">{label}</text>"##,
            right = LEFT + plot_w,
            at = py(y),
            label_x = LEFT - 6.0,
            label_y = py(y) + 4.0,
        );
    }
    let mut octave = x_min.log2().ceil();
    while octave <= x_max.log2().floor() {
        let x = 2f64.powf(octave);
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="#999"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
            px(x),
            TOP + plot_h,
            TOP + plot_h + 5.0,
            TOP + plot_h + 18.0,
            x
        );
        octave += 1.0;
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">sequence length (keys)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        chart.y_axis.label()
    );
    let mut legend_y = TOP + 10.0;
    let legend_x = LEFT + plot_w + 15.0;
    if let Some((label, c)) = &chart.ceiling {
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{right}" y1="{at:.1}" y2="{at:.1}" stroke="#555" stroke-dasharray="6 4"/>"##,
            right = LEFT + plot_w,
            at = py(*c)
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{legend_x}" x2="{}" y1="{legend_y}" y2="{legend_y}" stroke="#555" stroke-dasharray="6 4"/><text x="{}" y="{}">{}</text>"##,
            legend_x + 20.0,
            legend_x + 26.0,
            legend_y + 4.0,
            esc(label)
        );
        legend_y += 20.0;
    }
    for (index, series) in chart.series.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let mut sorted = series.points.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        if chart.connect && sorted.len() > 1 {
            let path: Vec<String> = sorted
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                path.join(" ")
            );
        }
        for &(x, y) in &sorted {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"><title>{}: {x} keys, {y:.2} {}</title></circle>"#,
                px(x),
                py(y),
                esc(&series.label),
                chart.y_axis.unit()
            );
        }
        let _ = writeln!(
            svg,
            r#"<circle cx="{}" cy="{legend_y}" r="4" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            legend_x + 10.0,
            legend_x + 26.0,
            legend_y + 4.0,
            esc(&series.label)
        );
        legend_y += 20.0;
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_every_series_point_and_the_ceiling() {
        let chart = Chart {
            title: "t <&>".into(),
            series: vec![
                Series {
                    label: "flash".into(),
                    points: vec![(512.0, 10.0), (1024.0, 12.0), (2048.0, 13.0)],
                },
                Series {
                    label: "naive".into(),
                    points: vec![(512.0, 4.0), (1024.0, 3.0)],
                },
            ],
            ceiling: Some(("FMA ceiling".into(), 60.0)),
            connect: true,
            y_axis: YAxis::Throughput,
        };
        let svg = render_svg(&chart);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        // 5 points plus 2 legend markers; 2 polylines; the dashed ceiling
        // twice (plot and legend).
        assert_eq!(svg.matches("<circle").count(), 7);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("stroke-dasharray").count(), 2);
        assert!(svg.contains("t &lt;&amp;&gt;"));
        // x ticks at each power of two in range.
        for label in [">512<", ">1024<", ">2048<"] {
            assert!(svg.contains(label), "missing tick {label}");
        }
    }

    #[test]
    fn time_charts_have_decade_ticks() {
        let chart = Chart {
            title: "crossover".into(),
            series: vec![Series {
                label: "linear".into(),
                points: vec![(512.0, 3.0), (16384.0, 95.0)],
            }],
            ceiling: None,
            connect: true,
            y_axis: YAxis::Time,
        };
        let svg = render_svg(&chart);
        for label in [
            ">1<",
            ">10<",
            ">100<",
            "median time (ms, log scale)",
            "95.00 ms",
        ] {
            assert!(svg.contains(label), "missing {label}");
        }
        assert!(!svg.contains(">1000<"));
    }

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(tick_step(66.0, 6.0), 20.0);
        assert_eq!(tick_step(9.0, 6.0), 2.0);
        assert!((tick_step(0.5, 6.0) - 0.1).abs() < 1e-12);
    }
}

//! The SVG plots written by `--out`: latency against output throughput (p50
//! and p99 of TTFT and of ITL, one point per level) and the TTFT and ITL
//! CDFs (one line per level). Drawn with plotters' SVG backend, which emits
//! `<text>` elements and needs no system fonts.

use crate::report::LevelReport;
use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

/// A point: (output tok/s, p50, p99, level label).
type Point = (f64, Option<f64>, Option<f64>, String);
/// A named series: legend text, colour, and the value it plots.
type Series = (&'static str, RGBColor, fn(&Point) -> Option<f64>);

/// Distinct, legible line colours for CDF levels (cycled).
const LEVEL_COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
    RGBColor(127, 127, 127),
];

fn nice_max(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v * 1.15
    } else {
        1.0
    }
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    pts: &[Point],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let xmax = nice_max(pts.iter().map(|p| p.0).fold(0.0, f64::max));
    let ymax = nice_max(
        pts.iter()
            .flat_map(|p| [p.1, p.2])
            .flatten()
            .fold(0.0, f64::max),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("output tokens/s")
        .y_desc("latency (ms)")
        .draw()
        .map_err(err)?;
    let mut sorted: Vec<&Point> = pts.iter().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let series: [Series; 2] = [("p50", BLUE, |p| p.1), ("p99", RED, |p| p.2)];
    for (name, color, get) in series {
        let line: Vec<(f64, f64)> = sorted
            .iter()
            .filter_map(|p| get(p).map(|y| (p.0, y)))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                line.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .map_err(err)?;
    }
    chart
        .draw_series(
            sorted
                .iter()
                .filter_map(|p| p.2.or(p.1).map(|y| (p.0, y, p.3.clone())))
                .map(|(x, y, label)| Text::new(label, (x, y), ("sans-serif", 12))),
        )
        .map_err(err)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// `latency_vs_throughput.svg`: TTFT (left) and ITL (right), p50 and p99,
/// against output tokens/s, one point per level.
pub fn latency_vs_throughput(levels: &[LevelReport]) -> Result<String> {
    let ttft: Vec<Point> = levels
        .iter()
        .map(|l| {
            let d = l.stats.ttft_ms.as_ref();
            (
                l.stats.output_tok_s,
                d.map(|d| d.p50),
                d.map(|d| d.p99),
                l.label.clone(),
            )
        })
        .collect();
    let itl: Vec<Point> = levels
        .iter()
        .map(|l| {
            let d = l.stats.itl_ms.as_ref();
            (
                l.stats.output_tok_s,
                d.map(|d| d.p50),
                d.map(|d| d.p99),
                l.label.clone(),
            )
        })
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(600);
        panel(&left, "TTFT vs output throughput", &ttft)?;
        panel(&right, "ITL (per token) vs output throughput", &itl)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// A CDF plot with one line per level.
pub fn cdf(
    levels: &[LevelReport],
    what: &str,
    get: fn(&LevelReport) -> &Vec<(f64, f64)>,
) -> Result<String> {
    let xmax = nice_max(
        levels
            .iter()
            .flat_map(|l| get(l).iter().map(|p| p.0))
            .fold(0.0, f64::max),
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{what} CDF"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..xmax, 0f64..1.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(format!("{what} (ms)"))
            .y_desc("fraction of samples <= x")
            .draw()
            .map_err(err)?;
        let mut any = false;
        for (i, l) in levels.iter().enumerate() {
            let pts = get(l);
            if pts.is_empty() {
                continue;
            }
            any = true;
            let color = LEVEL_COLOURS[i % LEVEL_COLOURS.len()];
            let mut line = vec![(pts[0].0, 0.0)];
            line.extend(pts.iter().copied());
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(err)?
                .label(l.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        if any {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        } else {
            root.draw(&Text::new("no samples", (360, 240), ("sans-serif", 16)))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

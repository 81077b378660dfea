//! The per-layer plot of a sweep (metric against layer, the chosen layer highlighted), as SVG
//! and PNG.
//!
//! Text in the PNG is rasterised from a font compiled into the binary (a Latin subset of DejaVu
//! Sans, `stages/data/fonts/`), so plots render the same on a CI runner without system fonts.
//! The PNG is encoded with the `png` crate from plotters' RGB buffer.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use thiserror::Error;

/// Plot size in pixels (SVG user units).
const SIZE: (u32, u32) = (960, 540);

static FONT: &[u8] = include_bytes!("../../data/fonts/DejaVuSans-subset.ttf");

/// Why a plot could not be drawn or written.
#[derive(Debug, Error)]
pub enum PlotError {
    /// The values do not match the layers.
    #[error("plot: {values} values for {layers} layers")]
    Shape {
        /// Number of layer labels.
        layers: usize,
        /// Number of values.
        values: usize,
    },
    /// The drawing library failed (message passed through).
    #[error("drawing the plot failed: {0}")]
    Draw(String),
    /// Encoding the PNG failed.
    #[error("encoding the PNG failed: {0}")]
    Png(String),
    /// Writing a file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What to plot: one value per layer (missing ones marked), the chosen layer highlighted.
#[derive(Clone, Copy, Debug)]
pub struct MetricPlot<'a> {
    /// Layer labels; when all are integers they are the x coordinates, otherwise x is the
    /// position and the label is printed as the tick.
    pub layers: &'a [String],
    /// Metric per layer; `None` (or non-finite) is drawn as a grey cross on the x axis.
    pub values: &'a [Option<f64>],
    /// Metric name (axis label and title).
    pub metric: &'a str,
    /// Index of the highlighted layer.
    pub chosen: Option<usize>,
}

fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font("sans-serif", FontStyle::Normal, FONT)
                .map_err(|_| "the embedded font could not be parsed".to_string())
        })
        .clone()
        .map_err(PlotError::Draw)
}

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    p: &MetricPlot,
) -> Result<(), PlotError> {
    if p.layers.len() != p.values.len() {
        return Err(PlotError::Shape {
            layers: p.layers.len(),
            values: p.values.len(),
        });
    }
    let numeric: Option<Vec<f64>> = p
        .layers
        .iter()
        .map(|l| l.parse::<i64>().ok().map(|v| v as f64))
        .collect();
    let xs: Vec<f64> = numeric
        .clone()
        .unwrap_or_else(|| (0..p.layers.len()).map(|i| i as f64).collect());
    let finite = |i: usize| p.values.get(i).copied().flatten().filter(|v| v.is_finite());

    let (x_lo, x_hi) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let (x_lo, x_hi) = if x_lo.is_finite() {
        (x_lo - 0.5, x_hi + 0.5)
    } else {
        (0.0, 1.0)
    };
    let present: Vec<f64> = (0..xs.len()).filter_map(finite).collect();
    let (y_lo, y_hi) = present
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| {
            (a.min(y), b.max(y))
        });
    let (y_lo, y_hi) = if !y_lo.is_finite() {
        (0.0, 1.0)
    } else {
        let pad = ((y_hi - y_lo) * 0.08).max(y_hi.abs().max(1e-3) * 0.01);
        (y_lo - pad, y_hi + pad)
    };

    root.fill(&WHITE).map_err(draw_err)?;
    let title = match p.chosen.and_then(|c| finite(c).map(|v| (c, v))) {
        Some((c, v)) => format!(
            "{} per layer (best: layer {} = {v:.4})",
            p.metric, p.layers[c]
        ),
        None => format!("{} per layer", p.metric),
    };
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(draw_err)?;
    let labels = p.layers;
    let is_numeric = numeric.is_some();
    let x_fmt = move |x: &f64| -> String {
        if is_numeric {
            format!("{x:.0}")
        } else {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        }
    };
    chart
        .configure_mesh()
        .x_desc("layer")
        .y_desc(p.metric)
        .x_labels(if is_numeric { 12 } else { labels.len().min(12) })
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&|y: &f64| format!("{y:.3}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(draw_err)?;

    // Points in x order; the line breaks where a layer is missing.
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for &i in &order {
        match finite(i) {
            Some(v) => runs.last_mut().map(|r| r.push((xs[i], v))).unwrap_or(()),
            None => runs.push(Vec::new()),
        }
    }
    let line = RGBColor(31, 119, 180);
    for run in runs.into_iter().filter(|r| !r.is_empty()) {
        chart
            .draw_series(LineSeries::new(run, line.stroke_width(2)))
            .map_err(draw_err)?;
    }
    chart
        .draw_series(
            order
                .iter()
                .filter_map(|&i| finite(i).map(|v| Circle::new((xs[i], v), 3, line.filled()))),
        )
        .map_err(draw_err)?;
    let grey = RGBColor(140, 140, 140);
    chart
        .draw_series(
            order
                .iter()
                .filter(|&&i| finite(i).is_none())
                .map(|&i| Cross::new((xs[i], y_lo), 5, grey.stroke_width(2))),
        )
        .map_err(draw_err)?;
    if let Some((c, v)) = p.chosen.and_then(|c| finite(c).map(|v| (c, v))) {
        let red = RGBColor(214, 39, 40);
        chart
            .draw_series([Circle::new((xs[c], v), 7, red.stroke_width(3))])
            .map_err(draw_err)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

/// The plot as an SVG document.
pub fn render_svg(p: &MetricPlot) -> Result<String, PlotError> {
    ensure_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, p)?;
    }
    Ok(svg)
}

/// The plot as PNG bytes (8-bit RGB).
pub fn render_png(p: &MetricPlot) -> Result<Vec<u8>, PlotError> {
    ensure_font()?;
    let (w, h) = SIZE;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw(&root, p)?;
    }
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc
        .write_header()
        .map_err(|e| PlotError::Png(e.to_string()))?;
    writer
        .write_image_data(&rgb)
        .map_err(|e| PlotError::Png(e.to_string()))?;
    writer.finish().map_err(|e| PlotError::Png(e.to_string()))?;
    Ok(out)
}

/// Renders the plot and writes it to `out_svg` and `out_png`.
pub fn plot_metric(p: &MetricPlot, out_svg: &Path, out_png: &Path) -> Result<(), PlotError> {
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes).map_err(|source| PlotError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    write(out_svg, render_svg(p)?.as_bytes())?;
    write(out_png, &render_png(p)?)
}

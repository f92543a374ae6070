//! PNG charts for the report, drawn with `plotters` (bitmap backend, text through `ab_glyph`
//! with the DejaVu Sans font embedded from assets/fonts, so no system font library is needed)
//! and encoded with the `png` crate (deflate-compressed).
//!
//! Anti-aliasing: plotters anti-aliases text but fills lines wider than one pixel as hard-edged
//! polygons, so every chart is drawn at `SUPERSAMPLE` times its size and box-filtered down.

use anyhow::{anyhow, ensure, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// An RGB colour.
pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
/// Axis lines and text: near-black so they are never confused with a series colour.
pub const INK: Rgb = [40, 40, 40];
/// Grid lines at the ticks.
pub const GRID: Rgb = [225, 225, 225];
/// Dashed marker lines (stage boundaries).
pub const MARKER: Rgb = [130, 130, 130];

/// Okabe–Ito colour-blind-friendly palette (black left out: it is the axis colour; yellow last
/// because it is faint on white). Series `i` uses `PALETTE[i % PALETTE.len()]`.
pub const PALETTE: [Rgb; 7] = [
    [0, 114, 178],   // blue
    [213, 94, 0],    // vermillion
    [0, 158, 115],   // bluish green
    [230, 159, 0],   // orange
    [204, 121, 167], // reddish purple
    [86, 180, 233],  // sky blue
    [240, 228, 66],  // yellow
];

/// Drawing scale before the box filter: 2 gives each output pixel 4 samples.
pub const SUPERSAMPLE: u32 = 2;

/// The family name the embedded font is registered under.
const FONT: &str = "pocl-sans";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn rgb(c: Rgb) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// A font size in output pixels, scaled for the supersampled canvas.
fn font(size: u32, c: Rgb) -> TextStyle<'static> {
    (FONT, (size * SUPERSAMPLE) as f64)
        .into_font()
        .color(&rgb(c))
}

/// Plotters' errors carry the backend's error type; charts only need their message.
fn drawing<T, E: std::fmt::Display>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| anyhow!("drawing a chart: {e}"))
}

/// Draws with `paint` on a white supersampled canvas of `width`x`height` output pixels and
/// returns the box-filtered RGB8 image.
fn render(
    width: u32,
    height: u32,
    paint: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<Vec<u8>> {
    ensure!(
        width >= 160 && height >= 120,
        "chart too small: {width}x{height} (at least 160x120)"
    );
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // The font is compiled in and tested, so a failure here is a build defect.
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
            .unwrap_or_else(|_| panic!("embedded font assets/fonts/DejaVuSans.ttf is invalid"));
    });
    let (w, h) = (width * SUPERSAMPLE, height * SUPERSAMPLE);
    let mut big = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut big, (w, h)).into_drawing_area();
        paint(&root)?;
        drawing(root.present())?;
    }
    Ok(downsample(&big, width, height, SUPERSAMPLE))
}

/// Averages each k×k block of an RGB8 image of (width·k)×(height·k) pixels, rounding to nearest.
pub fn downsample(big: &[u8], width: u32, height: u32, k: u32) -> Vec<u8> {
    let (w, k) = (width as usize, k as usize);
    let stride = w * k * 3;
    let mut out = vec![0u8; w * height as usize * 3];
    for (i, px) in out.chunks_exact_mut(3).enumerate() {
        let (x, y) = (i % w, i / w);
        for (ch, v) in px.iter_mut().enumerate() {
            let mut sum = 0usize;
            for dy in 0..k {
                for dx in 0..k {
                    sum += big[(y * k + dy) * stride + (x * k + dx) * 3 + ch] as usize;
                }
            }
            *v = ((sum + k * k / 2) / (k * k)) as u8;
        }
    }
    out
}

/// Encodes 8-bit RGB pixels (row-major, `width * height * 3` bytes) as a compressed PNG.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::High);
    let mut writer = enc.write_header().context("encoding PNG")?;
    writer.write_image_data(rgb).context("encoding PNG")?;
    writer.finish().context("encoding PNG")?;
    Ok(out)
}

/// Writes PNG bytes atomically (see [`crate::write_atomic`]).
pub fn write_png(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::write_atomic(path, bytes)
}

/// A finite, non-degenerate range: equal bounds are padded so a flat series sits mid-axis.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) || lo > hi {
        return (0.0, 1.0);
    }
    if hi - lo > f64::EPSILON * lo.abs().max(hi.abs()).max(1e-300) * 16.0 {
        return (lo, hi);
    }
    let pad = if lo == 0.0 { 0.5 } else { lo.abs() * 0.1 };
    (lo - pad, hi + pad)
}

/// The range of `values` (non-finite ones skipped), padded as [`padded`] does.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    padded(lo, hi)
}

/// A tick label on an axis spanning `span`: enough decimals to tell ticks apart (plotters puts
/// at most ~10 on an axis), trailing zeros dropped ("50", "0.25"); scientific for extremes.
pub fn tick_label(v: f64, span: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { v.to_string() };
    }
    if v.abs() >= 1e6 || span < 1e-4 {
        return format!("{v:.1e}");
    }
    let decimals = (-(span / 100.0).log10().floor()).max(0.0) as usize;
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// Title, axis labels, light grid at the labelled ticks; returns the chart to draw data on.
fn axes<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    title: &str,
    (x_label, y_label): (&str, &str),
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
) -> Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let s = SUPERSAMPLE;
    let (x_span, y_span) = (x.end - x.start, y.end - y.start);
    let x_fmt = move |v: &f64| tick_label(*v, x_span);
    let y_fmt = move |v: &f64| tick_label(*v, y_span);
    drawing(root.fill(&WHITE_RGB))?;
    let mut chart = drawing(
        ChartBuilder::on(root)
            .caption(title, font(17, INK))
            .margin(10 * s)
            .x_label_area_size(42 * s)
            .y_label_area_size(58 * s)
            .build_cartesian_2d(x, y),
    )?;
    drawing(
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(font(12, INK))
            .axis_desc_style(font(13, INK))
            .axis_style(rgb(INK).stroke_width(s))
            .bold_line_style(rgb(GRID).stroke_width(s))
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_labels(8)
            .y_labels(7)
            .set_all_tick_mark_size(4 * s)
            .draw(),
    )?;
    Ok(chart)
}

const WHITE_RGB: RGBColor = RGBColor(255, 255, 255);

/// Legend box with a swatch per labelled series, in the corner of the plot area that holds the
/// fewest data points (`points`, in data coordinates), so it hides as little as possible.
fn legend<'a, 'b: 'a>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    points: &[(f64, f64)],
) -> Result<()> {
    let (xr, yr) = (chart.x_range(), chart.y_range());
    let (xm, ym) = ((xr.start + xr.end) / 2.0, (yr.start + yr.end) / 2.0);
    let in_corner = |right: bool, top: bool| {
        points
            .iter()
            .filter(|p| (p.0 >= xm) == right && (p.1 >= ym) == top)
            .count()
    };
    // min_by_key keeps the first minimum, so ties prefer the conventional top-right corner.
    let corners = [
        (SeriesLabelPosition::UpperRight, in_corner(true, true)),
        (SeriesLabelPosition::UpperLeft, in_corner(false, true)),
        (SeriesLabelPosition::LowerRight, in_corner(true, false)),
        (SeriesLabelPosition::LowerLeft, in_corner(false, false)),
    ];
    let pos = corners.into_iter().min_by_key(|c| c.1).unwrap().0;
    drawing(
        chart
            .configure_series_labels()
            .position(pos)
            .margin(8 * SUPERSAMPLE)
            .legend_area_size(24 * SUPERSAMPLE)
            .label_font(font(12, INK))
            .background_style(WHITE_RGB.mix(0.9))
            .border_style(RGBColor(170, 170, 170).stroke_width(SUPERSAMPLE))
            .draw(),
    )
}

/// A legend swatch: a short thick line of `col` at the legend's anchor.
fn swatch(col: Rgb) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    let s = SUPERSAMPLE as i32;
    move |(x, y)| {
        PathElement::new(
            vec![(x, y), (x + 18 * s, y)],
            rgb(col).stroke_width(3 * s as u32),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Line chart

/// One curve: `points` are (x, y); non-finite points are skipped and break the line.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, Default)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Dashed vertical lines with a small label, e.g. curriculum stage boundaries.
    pub markers: Vec<(f64, String)>,
}

fn finite(p: &(f64, f64)) -> bool {
    p.0.is_finite() && p.1.is_finite()
}

/// Renders `chart` as a PNG. Series without a finite point are left out (also from the
/// legend); a chart with no finite point at all still gets axes over [0, 1].
pub fn line_chart_png(chart: &LineChart, width: u32, height: u32) -> Result<Vec<u8>> {
    encode_png(width, height, &line_chart_rgb(chart, width, height)?)
}

/// [`line_chart_png`] before encoding: RGB8 pixels, row-major.
pub fn line_chart_rgb(chart: &LineChart, width: u32, height: u32) -> Result<Vec<u8>> {
    let pts: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(finite)
        .collect();
    let markers: Vec<&(f64, String)> = chart.markers.iter().filter(|m| m.0.is_finite()).collect();
    let (x_lo, x_hi) = range(pts.iter().map(|p| p.0).chain(markers.iter().map(|m| m.0)));
    let (y_lo, y_hi) = range(pts.iter().map(|p| p.1));
    // A little headroom so the curves do not run along the frame.
    let pad = (y_hi - y_lo) * 0.04;
    render(width, height, |root| {
        let mut c = axes(
            root,
            &chart.title,
            (&chart.x_label, &chart.y_label),
            (x_lo..x_hi, y_lo - pad..y_hi + pad),
        )?;
        let s = SUPERSAMPLE;
        // Marker labels sit at the top of the plot area; a label that would overlap the
        // previous one drops to a second row.
        let (mut last_right, mut row) = (i32::MIN, 0);
        for (x, label) in markers {
            let dash = vec![(*x, y_lo - pad), (*x, y_hi + pad)];
            drawing(c.draw_series(DashedLineSeries::new(
                dash,
                5 * s,
                4 * s,
                rgb(MARKER).stroke_width(s),
            )))?;
            let style = font(11, MARKER);
            let (px, _) = c.backend_coord(&(*x, y_hi));
            let w = drawing(root.estimate_text_size(label, &style))?.0 as i32;
            let left = px + 3 * s as i32;
            row = if left <= last_right + 4 * s as i32 {
                1 - row
            } else {
                0
            };
            last_right = left + w;
            let at = (3 * s as i32, (3 + 14 * row) * s as i32);
            drawing(c.draw_series(std::iter::once(
                EmptyElement::at((*x, y_hi + pad)) + Text::new(label.clone(), at, style),
            )))?;
        }
        let visible = chart.series.iter().filter(|s| s.points.iter().any(finite));
        for (i, series) in visible.enumerate() {
            let col = PALETTE[i % PALETTE.len()];
            let runs = series
                .points
                .split(|p| !finite(p))
                .filter(|r| !r.is_empty());
            for (j, run) in runs.enumerate() {
                let line = drawing(c.draw_series(LineSeries::new(
                    run.iter().copied(),
                    rgb(col).stroke_width(2 * s),
                )))?;
                if j == 0 {
                    line.label(series.label.clone()).legend(swatch(col));
                }
            }
            // Dots make sparse series (and single points, which have no segment) visible.
            let dots: Vec<(f64, f64)> = series.points.iter().copied().filter(finite).collect();
            if dots.len() <= 40 {
                drawing(
                    c.draw_series(
                        dots.into_iter()
                            .map(|p| Circle::new(p, 3 * s, rgb(col).filled())),
                    ),
                )?;
            }
        }
        legend(&mut c, &pts)
    })
}

// ---------------------------------------------------------------------------------------------
// Histogram

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    pub title: String,
    pub x_label: String,
    /// (label, values), e.g. one group per curriculum bucket; non-finite values are skipped.
    pub groups: Vec<(String, Vec<f64>)>,
    /// Number of bins shared by all groups (0 is treated as 1).
    pub bins: usize,
}

/// Per-group counts over `bins` equal-width bins spanning all finite values; returns
/// (lo, hi, counts[group][bin]).
pub fn histogram_counts(h: &Histogram) -> (f64, f64, Vec<Vec<usize>>) {
    let bins = h.bins.max(1);
    let (lo, hi) = range(h.groups.iter().flat_map(|g| g.1.iter().copied()));
    let counts = h
        .groups
        .iter()
        .map(|(_, vals)| {
            let mut c = vec![0usize; bins];
            for v in vals.iter().filter(|v| v.is_finite()) {
                // The maximum lands in the last bin (closed right edge).
                let b = (((v - lo) / (hi - lo)) * bins as f64).floor() as usize;
                c[b.min(bins - 1)] += 1;
            }
            c
        })
        .collect();
    (lo, hi, counts)
}

/// Renders a histogram with the groups' bars side by side within each bin (so each bar's height
/// reads directly as that group's count), per-group colours and a legend.
pub fn histogram_png(h: &Histogram, width: u32, height: u32) -> Result<Vec<u8>> {
    encode_png(width, height, &histogram_rgb(h, width, height)?)
}

/// [`histogram_png`] before encoding: RGB8 pixels, row-major.
pub fn histogram_rgb(h: &Histogram, width: u32, height: u32) -> Result<Vec<u8>> {
    let bins = h.bins.max(1);
    let (lo, hi, counts) = histogram_counts(h);
    let max_count = counts.iter().flatten().copied().max().unwrap_or(0).max(1);
    render(width, height, |root| {
        // Headroom above the tallest bar for the legend, which would otherwise cover bars.
        let y_hi = max_count as f64 * (1.08 + 0.08 * counts.len().min(6) as f64);
        let mut c = axes(root, &h.title, (&h.x_label, "count"), (lo..hi, 0.0..y_hi))?;
        let groups = counts.len().max(1);
        let bin_w = (hi - lo) / bins as f64;
        // Each bin keeps a small gap on each side and splits the rest evenly among the groups.
        let gap = bin_w * 0.04;
        let slot = (bin_w - 2.0 * gap) / groups as f64;
        let mut bars = Vec::new();
        for (g, gc) in counts.iter().enumerate() {
            let col = PALETTE[g % PALETTE.len()];
            let rects = gc.iter().enumerate().filter(|b| *b.1 > 0).map(|(b, &n)| {
                let x0 = lo + b as f64 * bin_w + gap + g as f64 * slot;
                bars.push((x0 + slot / 2.0, n as f64));
                Rectangle::new([(x0, 0.0), (x0 + slot, n as f64)], rgb(col).filled())
            });
            let drawn = drawing(c.draw_series(rects.collect::<Vec<_>>()))?;
            drawn.label(h.groups[g].0.clone()).legend(swatch(col));
        }
        // Bars count as data where they reach: sample each bar over its height.
        let pts: Vec<(f64, f64)> = bars
            .iter()
            .flat_map(|&(x, n)| (0..=4).map(move |k| (x, n * k as f64 / 4.0)))
            .collect();
        legend(&mut c, &pts)
    })
}

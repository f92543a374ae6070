//! Dependency-free PNG charts for the report: a tiny RGB canvas, an embedded bitmap font and
//! a hand-written PNG encoder.
//!
//! The PNG uses zlib *stored* (uncompressed) deflate blocks: no compression crate is needed and
//! an 800×480 chart is ~1.1 MiB, which is acceptable for a report. Charts are drawn at fixed
//! pixel sizes, so the 5×7 font (8 rows with a descender row) scaled 1× or 2× stays legible.

use anyhow::{ensure, Result};
use std::path::Path;

/// An RGB colour.
pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
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

/// Width of a glyph in font pixels; the advance adds one pixel of spacing.
pub const GLYPH_W: u32 = 5;
/// Height of a glyph cell in font pixels: 7 rows for capitals and digits plus a descender row.
pub const GLYPH_H: u32 = 8;
const ADVANCE: u32 = GLYPH_W + 1;

/// A width×height RGB8 image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug)]
pub struct Canvas {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl Canvas {
    /// A canvas filled with `bg`.
    pub fn new(width: u32, height: u32, bg: Rgb) -> Self {
        let mut c = Canvas {
            width,
            height,
            pixels: vec![0; width as usize * height as usize * 3],
        };
        c.fill(bg);
        c
    }

    pub fn fill(&mut self, c: Rgb) {
        for px in self.pixels.chunks_exact_mut(3) {
            px.copy_from_slice(&c);
        }
    }

    /// The pixel at (x, y), or `None` outside the canvas.
    pub fn get(&self, x: i64, y: i64) -> Option<Rgb> {
        self.index(x, y)
            .map(|i| [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]])
    }

    fn index(&self, x: i64, y: i64) -> Option<usize> {
        (x >= 0 && y >= 0 && x < self.width as i64 && y < self.height as i64)
            .then(|| (y as usize * self.width as usize + x as usize) * 3)
    }

    /// Sets one pixel; coordinates outside the canvas are clipped silently, so callers can draw
    /// shapes that stick out without bounds checks of their own.
    pub fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if let Some(i) = self.index(x, y) {
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Filled axis-aligned rectangle with its top-left corner at (x, y).
    pub fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        let (x0, x1) = (x.max(0), (x + w).min(self.width as i64));
        let (y0, y1) = (y.max(0), (y + h).min(self.height as i64));
        for yy in y0..y1 {
            for xx in x0..x1 {
                self.set(xx, yy, c);
            }
        }
    }

    /// Bresenham line; `thickness` > 1 stamps a square brush at each step, which is enough for
    /// 1–2 px chart lines without antialiasing.
    pub fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb, thickness: u32) {
        let t = thickness.max(1) as i64;
        let off = (t - 1) / 2;
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        // Cap the walk so a pathological far-off-canvas endpoint cannot spin for billions of
        // steps (chart data is always mapped inside the canvas, so this never truncates there).
        let max_steps = dx.max(-dy).min(1 << 22);
        for _ in 0..=max_steps {
            self.fill_rect(x - off, y - off, t, t, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Vertical dashed line from y0 to y1 (inclusive): `dash` pixels on, `gap` pixels off.
    pub fn dashed_vline(&mut self, x: i64, y0: i64, y1: i64, dash: u32, gap: u32, c: Rgb) {
        let (a, b) = (y0.min(y1), y0.max(y1));
        let period = (dash + gap).max(1) as i64;
        for y in a..=b {
            if (y - a) % period < dash as i64 {
                self.set(x, y, c);
            }
        }
    }

    /// Draws `s` with its top-left corner at (x, y); each font pixel becomes a scale×scale block.
    /// Returns the advance width in pixels.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: u32, c: Rgb) -> u32 {
        let k = scale.max(1) as i64;
        for (i, ch) in s.chars().enumerate() {
            let gx = x + i as i64 * ADVANCE as i64 * k;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..GLYPH_W as i64 {
                    if bits & (0x10 >> col) != 0 {
                        self.fill_rect(gx + col * k, y + row as i64 * k, k, k, c);
                    }
                }
            }
        }
        text_width(s, scale)
    }

    /// Draws `s` rotated 90° counter-clockwise (reading bottom to top), as used for a y-axis
    /// label; (x, y) is the bottom-left corner of the rotated text.
    pub fn text_up(&mut self, x: i64, y: i64, s: &str, scale: u32, c: Rgb) {
        let k = scale.max(1) as i64;
        for (i, ch) in s.chars().enumerate() {
            let base = y - i as i64 * ADVANCE as i64 * k;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..GLYPH_W as i64 {
                    if bits & (0x10 >> col) != 0 {
                        self.fill_rect(x + row as i64 * k, base - (col + 1) * k, k, k, c);
                    }
                }
            }
        }
    }

    /// Draws `s` horizontally centred on `cx`.
    pub fn text_centered(&mut self, cx: i64, y: i64, s: &str, scale: u32, c: Rgb) {
        self.text(cx - text_width(s, scale) as i64 / 2, y, s, scale, c);
    }

    /// Encodes the canvas as a PNG file.
    pub fn to_png(&self) -> Vec<u8> {
        encode_png(self.width, self.height, &self.pixels)
    }
}

/// Width in pixels of `s` drawn at `scale` (no trailing spacing column).
pub fn text_width(s: &str, scale: u32) -> u32 {
    let n = s.chars().count() as u32;
    (n * ADVANCE).saturating_sub(1) * scale.max(1)
}

/// The 8-row bitmap of `ch` (bit 4 is the leftmost column). Printable ASCII and '±' have
/// glyphs; anything else is drawn as '?' so a stray character is visible, not silently lost.
pub fn glyph(ch: char) -> &'static [u8; 8] {
    match ch {
        ' '..='~' => &FONT[ch as usize - 32],
        '±' => &FONT[95],
        _ => &FONT['?' as usize - 32],
    }
}

// ---------------------------------------------------------------------------------------------
// PNG encoding

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
}

/// CRC-32 (ISO-HDLC, as used by PNG chunks), table built at compile time.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = crc_table();
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Adler-32, the zlib stream checksum.
pub fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 is the largest run for which the sums cannot overflow u32 before the reduction.
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// A zlib stream holding `data` in stored deflate blocks of at most 65535 bytes each.
pub fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 65535 * 5 + 16);
    // CMF 0x78 (deflate, 32K window), FLG 0x01: (0x78 * 256 + 0x01) is a multiple of 31.
    out.extend_from_slice(&[0x78, 0x01]);
    let mut blocks = data.chunks(65535).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]); // one empty final block
    }
    while let Some(block) = blocks.next() {
        let last = blocks.peek().is_none();
        let len = block.len() as u16;
        out.push(last as u8); // BFINAL, BTYPE = 00 (stored); byte-aligned by construction
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

fn push_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]); // the CRC covers the type and the data, not the length
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Encodes 8-bit RGB pixels (row-major, `width * height * 3` bytes) as a PNG file.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    let row = width as usize * 3;
    assert_eq!(rgb.len(), row * height as usize, "pixel buffer size");
    let mut raw = Vec::with_capacity((row + 1) * height as usize);
    for line in rgb.chunks_exact(row.max(1)).take(height as usize) {
        raw.push(0); // filter type 0 (None): the data is stored uncompressed anyway
        raw.extend_from_slice(line);
    }
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    push_chunk(&mut out, b"IHDR", &ihdr);
    push_chunk(&mut out, b"IDAT", &zlib_stored(&raw));
    push_chunk(&mut out, b"IEND", &[]);
    out
}

/// Writes PNG bytes atomically (see [`crate::write_atomic`]).
pub fn write_png(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::write_atomic(path, bytes)
}

// ---------------------------------------------------------------------------------------------
// Axes

/// A "nice" step (1, 2 or 5 times a power of ten) giving roughly `target` intervals over `span`.
pub fn nice_step(span: f64, target: usize) -> f64 {
    let raw = (span / target.max(1) as f64).abs();
    if !raw.is_finite() || raw == 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Tick values `k * step` inside [lo, hi] (with a little tolerance for rounding).
fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let eps = step * 1e-6;
    let first = (lo / step - 1e-6).ceil() as i64;
    let last = (hi / step + 1e-6).floor() as i64;
    if last < first || last - first > 1000 {
        return Vec::new();
    }
    (first..=last)
        .map(|k| {
            let v = k as f64 * step;
            // Avoid "-0" and 0.30000000000000004-style labels.
            if v.abs() < eps {
                0.0
            } else {
                v
            }
        })
        .collect()
}

/// Tick label with as many decimals as the step needs; scientific notation for extremes.
pub fn format_tick(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v.abs() >= 1e6 || step < 1e-4 {
        return format!("{v:.1e}");
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
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

/// Pixel rectangle of the plot area.
#[derive(Clone, Copy, Debug)]
struct Frame {
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
}

impl Frame {
    fn layout(width: u32, height: u32) -> Result<Self> {
        ensure!(
            width >= 160 && height >= 120,
            "chart too small: {width}x{height} (at least 160x120)"
        );
        // Room on the left for y tick labels and the rotated y label, at the top for the 2x
        // title, at the bottom for x tick labels and the x label.
        Ok(Frame {
            left: 72,
            top: 36,
            right: width as i64 - 18,
            bottom: height as i64 - 46,
        })
    }
    fn w(&self) -> f64 {
        (self.right - self.left) as f64
    }
    fn h(&self) -> f64 {
        (self.bottom - self.top) as f64
    }
}

/// Linear map from data to pixels along one axis.
#[derive(Clone, Copy, Debug)]
struct Scale {
    lo: f64,
    hi: f64,
    p0: f64,
    p1: f64,
}

impl Scale {
    fn px(&self, v: f64) -> f64 {
        self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)
    }
    /// Rounded pixel coordinate.
    fn py(&self, v: f64) -> i64 {
        self.px(v).round() as i64
    }
}

/// Title, axis labels, grid lines, tick labels and the axis lines.
fn draw_axes(
    c: &mut Canvas,
    f: Frame,
    title: &str,
    x_label: &str,
    y_label: &str,
    (xs, x_step, x_ticks): (Scale, f64, &[f64]),
    (ys, y_step, y_ticks): (Scale, f64, &[f64]),
) {
    c.text_centered((f.left + f.right) / 2, 8, title, 2, INK);
    for &t in x_ticks {
        let x = xs.px(t).round() as i64;
        c.line(x, f.top, x, f.bottom, GRID, 1);
        c.line(x, f.bottom, x, f.bottom + 4, INK, 1);
        c.text_centered(x, f.bottom + 8, &format_tick(t, x_step), 1, INK);
    }
    for &t in y_ticks {
        let y = ys.py(t);
        c.line(f.left, y, f.right, y, GRID, 1);
        c.line(f.left - 4, y, f.left, y, INK, 1);
        let s = format_tick(t, y_step);
        c.text(f.left - 7 - text_width(&s, 1) as i64, y - 3, &s, 1, INK);
    }
    c.line(f.left, f.top, f.left, f.bottom, INK, 1);
    c.line(f.left, f.bottom, f.right, f.bottom, INK, 1);
    c.text_centered((f.left + f.right) / 2, f.bottom + 24, x_label, 1, INK);
    let label_h = text_width(y_label, 1) as i64;
    c.text_up(8, (f.top + f.bottom) / 2 + label_h / 2, y_label, 1, INK);
}

/// Draws a legend box in whichever corner of the plot area covers the fewest data pixels, so
/// it hides as little of the curves as possible.
fn draw_legend(c: &mut Canvas, f: Frame, entries: &[(String, Rgb)]) {
    if entries.is_empty() {
        return;
    }
    let swatch = 18;
    let row_h = 12;
    let label_w = entries
        .iter()
        .map(|(s, _)| text_width(s, 1) as i64)
        .max()
        .unwrap_or(0);
    let w = (8 + swatch + 6 + label_w + 8).min(f.w() as i64 - 8);
    let h = (entries.len() as i64 * row_h + 8).min(f.h() as i64 - 8);
    let inset = 6;
    let corners = [
        (f.right - w - inset, f.top + inset),
        (f.left + inset + 1, f.top + inset),
        (f.right - w - inset, f.bottom - h - inset),
        (f.left + inset + 1, f.bottom - h - inset),
    ];
    let covered = |c: &Canvas, (x, y): (i64, i64)| {
        let mut n = 0usize;
        for yy in y..y + h {
            for xx in x..x + w {
                if let Some(p) = c.get(xx, yy) {
                    n += (p != WHITE && p != GRID) as usize;
                }
            }
        }
        n
    };
    // min_by_key keeps the first minimum, so ties prefer the conventional top-right corner.
    let (x, y) = *corners.iter().min_by_key(|&&p| covered(c, p)).unwrap();
    c.fill_rect(x, y, w, h, WHITE);
    for (x0, y0, x1, y1) in [
        (x, y, x + w - 1, y),
        (x, y + h - 1, x + w - 1, y + h - 1),
        (x, y, x, y + h - 1),
        (x + w - 1, y, x + w - 1, y + h - 1),
    ] {
        c.line(x0, y0, x1, y1, [170, 170, 170], 1);
    }
    for (i, (label, col)) in entries.iter().enumerate() {
        let ry = y + 4 + i as i64 * row_h;
        if ry + row_h > y + h + 4 {
            break;
        }
        c.fill_rect(x + 8, ry + 3, swatch, 3, *col);
        c.text(x + 8 + swatch + 6, ry, label, 1, INK);
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

/// Renders `chart` as a PNG. Empty series are left out (also from the legend); a chart with no
/// finite point at all still gets axes over [0, 1].
pub fn line_chart_png(chart: &LineChart, width: u32, height: u32) -> Result<Vec<u8>> {
    Ok(line_chart_canvas(chart, width, height)?.to_png())
}

/// [`line_chart_png`] before encoding.
pub fn line_chart_canvas(chart: &LineChart, width: u32, height: u32) -> Result<Canvas> {
    let f = Frame::layout(width, height)?;
    let pts = || {
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| finite(p))
    };
    let marker_xs = chart.markers.iter().map(|m| m.0).filter(|x| x.is_finite());
    let (mut x_lo, mut x_hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in pts().map(|p| p.0).chain(marker_xs) {
        x_lo = x_lo.min(x);
        x_hi = x_hi.max(x);
    }
    let (mut y_lo, mut y_hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for p in pts() {
        y_lo = y_lo.min(p.1);
        y_hi = y_hi.max(p.1);
    }
    let (x_lo, x_hi) = padded(x_lo, x_hi);
    let (y_lo, y_hi) = padded(y_lo, y_hi);
    // Extend the axes to whole ticks so the first and last gridlines frame the data.
    let x_step = nice_step(x_hi - x_lo, ((f.w() / 90.0) as usize).clamp(2, 10));
    let y_step = nice_step(y_hi - y_lo, ((f.h() / 50.0) as usize).clamp(2, 10));
    let (x_lo, x_hi) = (
        (x_lo / x_step).floor() * x_step,
        (x_hi / x_step).ceil() * x_step,
    );
    let (y_lo, y_hi) = (
        (y_lo / y_step).floor() * y_step,
        (y_hi / y_step).ceil() * y_step,
    );
    let xs = Scale {
        lo: x_lo,
        hi: x_hi,
        p0: f.left as f64,
        p1: f.right as f64,
    };
    let ys = Scale {
        lo: y_lo,
        hi: y_hi,
        p0: f.bottom as f64,
        p1: f.top as f64,
    };

    let mut c = Canvas::new(width, height, WHITE);
    let xt = ticks(x_lo, x_hi, x_step);
    let yt = ticks(y_lo, y_hi, y_step);
    draw_axes(
        &mut c,
        f,
        &chart.title,
        &chart.x_label,
        &chart.y_label,
        (xs, x_step, &xt),
        (ys, y_step, &yt),
    );

    // Marker labels go just above the plot area's top edge; a label that would overlap the
    // previous one drops to a second row inside the plot.
    let mut last_right = i64::MIN;
    let mut row = 0;
    for (x, label) in chart.markers.iter().filter(|m| m.0.is_finite()) {
        let px = xs.px(*x).round() as i64;
        c.dashed_vline(px, f.top, f.bottom - 1, 4, 3, MARKER);
        let w = text_width(label, 1) as i64;
        let lx = (px + 3).min(f.right - w);
        row = if lx <= last_right + 4 { 1 - row } else { 0 };
        c.text(lx, f.top + 3 + row * 10, label, 1, MARKER);
        last_right = lx + w;
    }

    let mut legend = Vec::new();
    let visible = chart.series.iter().filter(|s| s.points.iter().any(finite));
    for (i, s) in visible.enumerate() {
        let col = PALETTE[i % PALETTE.len()];
        let to_px = |p: &(f64, f64)| (xs.px(p.0).round() as i64, ys.py(p.1));
        let mut prev: Option<(i64, i64)> = None;
        for p in &s.points {
            if !finite(p) {
                prev = None;
                continue;
            }
            let q = to_px(p);
            if let Some(a) = prev {
                c.line(a.0, a.1, q.0, q.1, col, 2);
            }
            prev = Some(q);
        }
        // Dots make sparse series (and single points, which have no segment) visible.
        let n = s.points.iter().filter(|p| finite(p)).count();
        if n <= 40 {
            for q in s.points.iter().filter(|p| finite(p)).map(to_px) {
                c.fill_rect(q.0 - 2, q.1 - 2, 5, 5, col);
            }
        }
        legend.push((s.label.clone(), col));
    }
    draw_legend(&mut c, f, &legend);
    Ok(c)
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
    let all = || {
        h.groups
            .iter()
            .flat_map(|g| g.1.iter())
            .filter(|v| v.is_finite())
    };
    let lo = all().copied().fold(f64::INFINITY, f64::min);
    let hi = all().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = padded(lo, hi);
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
    Ok(histogram_canvas(h, width, height)?.to_png())
}

/// [`histogram_png`] before encoding.
pub fn histogram_canvas(h: &Histogram, width: u32, height: u32) -> Result<Canvas> {
    let f = Frame::layout(width, height)?;
    let bins = h.bins.max(1);
    let (lo, hi, counts) = histogram_counts(h);
    let max_count = counts.iter().flatten().copied().max().unwrap_or(0).max(1);
    let y_step = nice_step(max_count as f64, ((f.h() / 50.0) as usize).clamp(2, 10)).max(1.0);
    let y_hi = (max_count as f64 / y_step).ceil() * y_step;
    let x_step = nice_step(hi - lo, ((f.w() / 90.0) as usize).clamp(2, 10));
    let xs = Scale {
        lo,
        hi,
        p0: f.left as f64 + 1.0,
        p1: f.right as f64,
    };
    let ys = Scale {
        lo: 0.0,
        hi: y_hi,
        p0: f.bottom as f64,
        p1: f.top as f64,
    };

    let mut c = Canvas::new(width, height, WHITE);
    let xt = ticks(lo, hi, x_step);
    let yt = ticks(0.0, y_hi, y_step);
    draw_axes(
        &mut c,
        f,
        &h.title,
        &h.x_label,
        "count",
        (xs, x_step, &xt),
        (ys, y_step, &yt),
    );

    let groups = counts.len().max(1);
    let bin_w = (hi - lo) / bins as f64;
    let mut legend = Vec::new();
    for (g, gc) in counts.iter().enumerate() {
        let col = PALETTE[g % PALETTE.len()];
        for (b, &n) in gc.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let x0 = xs.px(lo + b as f64 * bin_w);
            let x1 = xs.px(lo + (b + 1) as f64 * bin_w);
            // Leave a 1 px gap between bins, then split the bin evenly among the groups.
            let slot = ((x1 - x0) - 1.0).max(1.0) / groups as f64;
            let bx = (x0 + 1.0 + g as f64 * slot).round() as i64;
            let bw = ((slot).round() as i64).max(1);
            let top = ys.py(n as f64);
            c.fill_rect(bx, top, bw, f.bottom - top, col);
        }
        legend.push((h.groups[g].0.clone(), col));
    }
    c.line(f.left, f.bottom, f.right, f.bottom, INK, 1);
    draw_legend(&mut c, f, &legend);
    Ok(c)
}

// ---------------------------------------------------------------------------------------------
// Font

/// 5×7 ASCII font (rows top to bottom, bit 4 = leftmost column) with an eighth descender row
/// for g, j, p, q, y and the comma; entries 0..=94 are ' '..='~', entry 95 is '±'.
#[rustfmt::skip]
const FONT: [[u8; 8]; 96] = [
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // (space)
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04, 0x00], // !
    [0x0a, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // "
    [0x0a, 0x0a, 0x1f, 0x0a, 0x1f, 0x0a, 0x0a, 0x00], // #
    [0x04, 0x0f, 0x14, 0x0e, 0x05, 0x1e, 0x04, 0x00], // $
    [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03, 0x00], // %
    [0x0c, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0d, 0x00], // &
    [0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00], // '
    [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02, 0x00], // (
    [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08, 0x00], // )
    [0x00, 0x04, 0x15, 0x0e, 0x15, 0x04, 0x00, 0x00], // *
    [0x00, 0x04, 0x04, 0x1f, 0x04, 0x04, 0x00, 0x00], // +
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08], // ,
    [0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00, 0x00], // -
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c, 0x00], // .
    [0x01, 0x02, 0x02, 0x04, 0x08, 0x08, 0x10, 0x00], // /
    [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e, 0x00], // 0
    [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e, 0x00], // 1
    [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f, 0x00], // 2
    [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e, 0x00], // 3
    [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02, 0x00], // 4
    [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e, 0x00], // 5
    [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e, 0x00], // 6
    [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08, 0x00], // 7
    [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e, 0x00], // 8
    [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c, 0x00], // 9
    [0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00, 0x00], // :
    [0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x04, 0x08, 0x00], // ;
    [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02, 0x00], // <
    [0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00, 0x00], // =
    [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08, 0x00], // >
    [0x0e, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04, 0x00], // ?
    [0x0e, 0x11, 0x01, 0x0d, 0x15, 0x15, 0x0e, 0x00], // @
    [0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11, 0x00], // A
    [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e, 0x00], // B
    [0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e, 0x00], // C
    [0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c, 0x00], // D
    [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f, 0x00], // E
    [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10, 0x00], // F
    [0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f, 0x00], // G
    [0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11, 0x00], // H
    [0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e, 0x00], // I
    [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c, 0x00], // J
    [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11, 0x00], // K
    [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f, 0x00], // L
    [0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11, 0x00], // M
    [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x00], // N
    [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e, 0x00], // O
    [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10, 0x00], // P
    [0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d, 0x00], // Q
    [0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11, 0x00], // R
    [0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e, 0x00], // S
    [0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00], // T
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e, 0x00], // U
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04, 0x00], // V
    [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a, 0x00], // W
    [0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11, 0x00], // X
    [0x11, 0x11, 0x0a, 0x04, 0x04, 0x04, 0x04, 0x00], // Y
    [0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f, 0x00], // Z
    [0x0e, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0e, 0x00], // [
    [0x10, 0x08, 0x08, 0x04, 0x02, 0x02, 0x01, 0x00], // \
    [0x0e, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0e, 0x00], // ]
    [0x04, 0x0a, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00], // ^
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1f, 0x00], // _
    [0x08, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // `
    [0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f, 0x00], // a
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1e, 0x00], // b
    [0x00, 0x00, 0x0e, 0x10, 0x10, 0x11, 0x0e, 0x00], // c
    [0x01, 0x01, 0x0d, 0x13, 0x11, 0x11, 0x0f, 0x00], // d
    [0x00, 0x00, 0x0e, 0x11, 0x1f, 0x10, 0x0e, 0x00], // e
    [0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08, 0x00], // f
    [0x00, 0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x0e], // g
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00], // h
    [0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x0e, 0x00], // i
    [0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x12, 0x0c], // j
    [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12, 0x00], // k
    [0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e, 0x00], // l
    [0x00, 0x00, 0x1a, 0x15, 0x15, 0x15, 0x15, 0x00], // m
    [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00], // n
    [0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e, 0x00], // o
    [0x00, 0x00, 0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10], // p
    [0x00, 0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x01], // q
    [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10, 0x00], // r
    [0x00, 0x00, 0x0e, 0x10, 0x0e, 0x01, 0x1e, 0x00], // s
    [0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06, 0x00], // t
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0d, 0x00], // u
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x0a, 0x04, 0x00], // v
    [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0a, 0x00], // w
    [0x00, 0x00, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x00], // x
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x0f, 0x01, 0x0e], // y
    [0x00, 0x00, 0x1f, 0x02, 0x04, 0x08, 0x1f, 0x00], // z
    [0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02, 0x00], // {
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00], // |
    [0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08, 0x00], // }
    [0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00, 0x00], // ~
    [0x04, 0x04, 0x1f, 0x04, 0x04, 0x00, 0x1f, 0x00], // ±
];

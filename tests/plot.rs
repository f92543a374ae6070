//! PNG charts for the report: the files are checked with a decoder written here (chunk CRCs by a
//! bitwise CRC-32, zlib inflate by miniz_oxide, all five scanline filters undone by hand), then
//! by their pixels.

use pocl::report::plot::*;

/// A decoded RGB image.
struct Image {
    w: u32,
    h: u32,
    rgb: Vec<u8>,
}

impl Image {
    fn px(&self, x: u32, y: u32) -> Rgb {
        let i = (y as usize * self.w as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
    /// Pixels in [x0, x1) x [y0, y1) within `tol` of `col` in every channel.
    fn count_near(&self, col: Rgb, tol: u8, (x0, y0, x1, y1): (u32, u32, u32, u32)) -> usize {
        let mut n = 0;
        for y in y0..y1.min(self.h) {
            for x in x0..x1.min(self.w) {
                let p = self.px(x, y);
                n += (0..3).all(|c| p[c].abs_diff(col[c]) <= tol) as usize;
            }
        }
        n
    }
    fn all(&self) -> (u32, u32, u32, u32) {
        (0, 0, self.w, self.h)
    }
    /// Longest vertical run of exactly `col` in column x.
    fn run(&self, col: Rgb, x: u32) -> usize {
        let (mut best, mut cur) = (0, 0);
        for y in 0..self.h {
            cur = if self.px(x, y) == col { cur + 1 } else { 0 };
            best = best.max(cur);
        }
        best
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// Reference CRC-32, bit by bit.
fn crc_bitwise(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The Paeth predictor of the PNG specification (section 9.4).
fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = a as i16 + b as i16 - c as i16;
    let (pa, pb, pc) = (
        (p - a as i16).abs(),
        (p - b as i16).abs(),
        (p - c as i16).abs(),
    );
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}

/// Validates and decodes an 8-bit RGB, non-interlaced PNG; also returns whether the first
/// deflate block is compressed (BTYPE 1 or 2) rather than stored.
fn decode(png: &[u8]) -> (Image, bool) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "signature");
    let mut pos = 8;
    let (mut ihdr, mut idat, mut kinds) = (None, Vec::new(), Vec::new());
    while pos < png.len() {
        let len = be32(&png[pos..]) as usize;
        let kind = &png[pos + 4..pos + 8];
        let data = &png[pos + 8..pos + 8 + len];
        let crc = be32(&png[pos + 8 + len..]);
        assert_eq!(
            crc,
            crc_bitwise(&png[pos + 4..pos + 8 + len]),
            "CRC of chunk {kind:?}"
        );
        match kind {
            b"IHDR" => ihdr = Some(data.to_vec()),
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        kinds.push(kind.to_vec());
        pos += 12 + len;
    }
    assert_eq!(pos, png.len(), "trailing bytes");
    assert_eq!(kinds.first().unwrap(), b"IHDR");
    assert_eq!(kinds.last().unwrap(), b"IEND");
    let ihdr = ihdr.unwrap();
    assert_eq!(ihdr.len(), 13);
    let (w, h) = (be32(&ihdr), be32(&ihdr[4..]));
    assert_eq!(&ihdr[8..], &[8, 2, 0, 0, 0], "8-bit RGB, no interlace");

    assert_eq!(idat[0] & 0x0f, 8, "CM = deflate");
    assert_eq!((idat[0] as u32 * 256 + idat[1] as u32) % 31, 0, "FCHECK");
    let compressed = (idat[2] >> 1) & 3 != 0;
    // Checks the Adler-32 trailer too.
    let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&idat).expect("valid zlib stream");

    let stride = 3 * w as usize;
    assert_eq!(
        raw.len(),
        h as usize * (1 + stride),
        "height x (1 + 3 width)"
    );
    let mut rgb = vec![0u8; h as usize * stride];
    for (y, line) in raw.chunks_exact(1 + stride).enumerate() {
        let (filter, line) = (line[0], &line[1..]);
        for i in 0..stride {
            let a = if i >= 3 { rgb[y * stride + i - 3] } else { 0 };
            let b = if y > 0 { rgb[(y - 1) * stride + i] } else { 0 };
            let c = if y > 0 && i >= 3 {
                rgb[(y - 1) * stride + i - 3]
            } else {
                0
            };
            let pred = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => ((a as u16 + b as u16) / 2) as u8,
                4 => paeth(a, b, c),
                f => panic!("filter type {f}"),
            };
            rgb[y * stride + i] = line[i].wrapping_add(pred);
        }
    }
    (Image { w, h, rgb }, compressed)
}

fn image(png: &[u8]) -> Image {
    decode(png).0
}

#[test]
fn png_round_trips_pixels_and_compresses() {
    let rgb: Vec<u8> = (0..3 * 7 * 5).map(|i| (i * 13 % 256) as u8).collect();
    let img = image(&encode_png(7, 5, &rgb).unwrap());
    assert_eq!((img.w, img.h), (7, 5));
    assert_eq!(img.rgb, rgb);
    // Smooth gradients make the encoder pick the predicting filters, which must undo exactly.
    let grad: Vec<u8> = (0..64 * 64)
        .flat_map(|i| {
            [
                (i % 64 * 4) as u8,
                (i / 64 * 4) as u8,
                (i % 64 + i / 64) as u8,
            ]
        })
        .collect();
    let (img, compressed) = decode(&encode_png(64, 64, &grad).unwrap());
    assert_eq!(img.rgb, grad);
    assert!(compressed);
    // A plain 400x400 image is 480 kB raw.
    let png = encode_png(400, 400, &vec![200; 400 * 400 * 3]).unwrap();
    assert!(png.len() < 5_000, "{} bytes", png.len());
    assert!(image(&png).rgb.iter().all(|&v| v == 200));
}

#[test]
fn tick_labels_show_the_digits_that_matter() {
    assert_eq!(tick_label(50.0, 200.0), "50");
    assert_eq!(tick_label(2000.0, 9000.0), "2000");
    assert_eq!(tick_label(0.25, 2.0), "0.25");
    assert_eq!(tick_label(0.5, 2.0), "0.5");
    assert_eq!(tick_label(0.30000000000000004, 1.0), "0.3");
    assert_eq!(tick_label(-0.0001, 1.0), "0");
    assert_eq!(tick_label(0.0, 1.0), "0");
    assert_eq!(tick_label(3.0e9, 4e9), "3.0e9");
    assert_eq!(tick_label(1.5e-9, 1e-9), "1.5e-9");
}

#[test]
fn downsample_averages_blocks_with_rounding() {
    // A 4x2 RGB image reduced by 2 to 2x1: each output channel is the rounded mean of 4 values.
    #[rustfmt::skip]
    let big = [
        0, 0, 0,   255, 255, 255,   10, 20, 30,  10, 20, 30,
        0, 0, 0,   255, 255, 255,   11, 21, 31,  12, 22, 32,
    ];
    // (0 + 255 + 0 + 255) / 4 = 127.5 -> 128; (10 + 10 + 11 + 12) / 4 = 10.75 -> 11
    assert_eq!(downsample(&big, 2, 1, 2), vec![128, 128, 128, 11, 21, 31]);
    assert_eq!(downsample(&big, 4, 2, 1), big.to_vec());
}

fn loss_chart() -> LineChart {
    let curve = |f: fn(f64) -> f64| (0..200).map(|i| (i as f64, f(i as f64))).collect();
    LineChart {
        title: "Distillation loss".into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        series: vec![
            Series {
                label: "POCL".into(),
                points: curve(|x| 3.0 * (-x / 60.0).exp() + 0.5),
            },
            Series {
                label: "random order".into(),
                points: curve(|x| 3.2 * (-x / 80.0).exp() + 0.6),
            },
            Series {
                label: "anti-curriculum".into(),
                points: curve(|x| 2.5 / (1.0 + x / 40.0) + 0.7),
            },
        ],
        markers: vec![(66.0, "stage 2".into()), (133.0, "stage 3".into())],
    }
}

fn save(name: &str, png: &[u8]) {
    if let Ok(dir) = std::env::var("POCL_PLOT_DIR") {
        write_png(&std::path::Path::new(&dir).join(name), png).unwrap();
    }
}

/// Pixels that lie on the blend between `col` and white, strictly between the two: what an
/// anti-aliased edge of a `col` line leaves, and what a hard-edged one does not.
fn blends(img: &Image, col: Rgb) -> usize {
    img.rgb
        .chunks_exact(3)
        .filter(|p| {
            // t = how much of `col`, from the channel where col is furthest from white.
            let c = (0..3).max_by_key(|&c| 255 - col[c] as i32).unwrap();
            let t = (255.0 - p[c] as f64) / (255.0 - col[c] as f64);
            (0.2..0.8).contains(&t)
                && (0..3).all(|k| {
                    let want = 255.0 - t * (255.0 - col[k] as f64);
                    (p[k] as f64 - want).abs() <= 6.0
                })
        })
        .count()
}

#[test]
fn line_chart_draws_series_markers_text_anti_aliased_and_compressed() {
    let png = line_chart_png(&loss_chart(), 800, 480).unwrap();
    save("loss.png", &png);
    let (img, compressed) = decode(&png);
    assert_eq!((img.w, img.h), (800, 480));
    assert!(compressed);
    // Raw pixels are 1.15 MB; the hand-written encoder wrote them stored.
    assert!(png.len() < 120_000, "{} bytes", png.len());
    for (i, col) in PALETTE.iter().take(3).enumerate() {
        let n = img.count_near(*col, 30, img.all());
        assert!(n > 400, "series {i}: only {n} pixels");
        // Smooth edges: plotters' own polygon edges give ~0.3 blended pixels per solid one
        // (visibly jagged 2 px lines); drawn supersampled, ~0.6.
        let b = blends(&img, *col);
        assert!(
            b as f64 > 0.45 * n as f64,
            "series {i}: {b} blended, {n} solid pixels"
        );
    }
    assert!(img.count_near(MARKER, 20, img.all()) > 50, "stage markers");
    assert!(img.count_near(WHITE, 0, img.all()) > (img.w * img.h / 2) as usize);
    // Text: the title band (top 30 rows) holds dark glyph pixels only when there is a title.
    let ink = |img: &Image| img.count_near(INK, 60, (0, 0, img.w, 30));
    let untitled = image(
        &line_chart_png(
            &LineChart {
                title: String::new(),
                ..loss_chart()
            },
            800,
            480,
        )
        .unwrap(),
    );
    assert!(
        ink(&img) > 150 + ink(&untitled),
        "{} vs {}",
        ink(&img),
        ink(&untitled)
    );
}

#[test]
fn histogram_bar_heights_are_proportional_to_counts() {
    // Group 0: 12 values in bin 0 and 4 in bin 1; group 1: 6 values in bin 1.
    let mut a = vec![0.1; 12];
    a.extend([0.9; 4]);
    let h = Histogram {
        title: "Difficulty".into(),
        x_label: "score".into(),
        groups: vec![("easy".into(), a), ("hard".into(), vec![0.8; 6])],
        bins: 2,
    };
    let (_, _, counts) = histogram_counts(&h);
    assert_eq!(counts, vec![vec![12, 4], vec![0, 6]]);
    let img = image(&histogram_png(&h, 640, 400).unwrap());
    // Bars are filled with their exact colour; runs shorter than 10 px are legend swatches.
    let bars = |col: Rgb| -> Vec<(u32, usize)> {
        (0..img.w)
            .map(|x| (x, img.run(col, x)))
            .filter(|b| b.1 >= 10)
            .collect()
    };
    let (g0, g1) = (bars(PALETTE[0]), bars(PALETTE[1]));
    let tall = g0.iter().map(|b| b.1).max().unwrap();
    let short = g0.iter().map(|b| b.1).min().unwrap();
    let other = g1.iter().map(|b| b.1).max().unwrap();
    assert!(tall > 150, "tallest bar {tall} px");
    let close = |px: usize, count: f64| (px as f64 - tall as f64 * count / 12.0).abs() <= 2.0;
    assert!(close(short, 4.0), "{short} vs {tall}");
    assert!(close(other, 6.0), "{other} vs {tall}");
    // Group 1's only bar stands right of group 0's tall bar (bin 0 has none of group 1).
    let tall_right = g0.iter().filter(|b| b.1 + 2 >= tall).map(|b| b.0).max();
    assert!(g1.iter().all(|b| Some(b.0) > tall_right));
    if std::env::var("POCL_PLOT_DIR").is_ok() {
        let many = Histogram {
            title: "Difficulty by curriculum bucket".into(),
            x_label: "difficulty score".into(),
            groups: (0..3)
                .map(|g| {
                    let vals = (0..300)
                        .map(|i| g as f64 + ((i * 37 % 101) as f64 / 50.0))
                        .collect();
                    (format!("bucket {}", g + 1), vals)
                })
                .collect(),
            bins: 20,
        };
        save("hist.png", &histogram_png(&many, 800, 480).unwrap());
    }
}

#[test]
fn edge_cases_render_without_panicking() {
    let s = |label: &str, points: Vec<(f64, f64)>| Series {
        label: label.into(),
        points,
    };
    let cases = vec![
        vec![],
        vec![s("empty", vec![])],
        vec![s("one", vec![(3.0, 1.5)])],
        vec![s("flat", vec![(0.0, 2.0), (1.0, 2.0), (2.0, 2.0)])],
        vec![s("zero", vec![(0.0, 0.0), (0.0, 0.0)])],
        vec![s(
            "nan",
            vec![(0.0, 1.0), (1.0, f64::NAN), (f64::NAN, 2.0), (3.0, 0.5)],
        )],
        vec![
            s("all nan", vec![(f64::NAN, f64::NAN)]),
            s("inf", vec![(f64::INFINITY, 1.0)]),
        ],
        vec![
            s("tiny", vec![(0.0, 1e-9), (1.0, 2e-9)]),
            s("huge", vec![(0.0, 1e9), (1.0, -3e9)]),
        ],
    ];
    for series in cases {
        let chart = LineChart {
            title: "t".into(),
            series: series.clone(),
            markers: vec![(1.0, "m".into()), (f64::NAN, "nan".into())],
            ..Default::default()
        };
        let img = image(&line_chart_png(&chart, 320, 200).unwrap());
        assert_eq!((img.w, img.h), (320, 200));
        // A lone finite point still shows as a dot in its series colour.
        if series.len() == 1 && series[0].label == "one" {
            assert!(img.count_near(PALETTE[0], 30, img.all()) >= 9);
        }
    }
    let hists = vec![
        vec![],
        vec![("empty".to_string(), vec![])],
        vec![("one".to_string(), vec![1.0])],
        vec![
            ("same".to_string(), vec![2.0; 5]),
            ("nan".to_string(), vec![f64::NAN, 2.0]),
        ],
    ];
    for groups in hists {
        for bins in [0, 1, 7] {
            let h = Histogram {
                title: "h".into(),
                x_label: "x".into(),
                groups: groups.clone(),
                bins,
            };
            image(&histogram_png(&h, 320, 200).unwrap());
        }
    }
    let err = line_chart_png(&LineChart::default(), 10, 10).unwrap_err();
    assert!(err.to_string().contains("too small"), "{err}");
}

#[test]
fn write_png_writes_the_bytes() {
    let dir = std::env::temp_dir().join(format!("pocl-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.png");
    let png = encode_png(4, 4, &[9; 48]).unwrap();
    write_png(&path, &png).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), png);
    std::fs::remove_dir_all(&dir).unwrap();
}

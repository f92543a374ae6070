//! PNG charts for the report: the files are checked with an independent decoder written here
//! (chunk CRCs, stored-block inflate, Adler-32, IHDR, scanline layout) and by their pixels.

use pocl::report::plot::*;

/// A decoded RGB image.
struct Image {
    w: u32,
    h: u32,
    rgb: Vec<u8>,
    /// Number of stored deflate blocks seen, to check the 65535-byte split.
    blocks: usize,
}

impl Image {
    fn px(&self, x: u32, y: u32) -> Rgb {
        let i = (y as usize * self.w as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
    fn count(&self, col: Rgb, x0: u32, y0: u32, x1: u32, y1: u32) -> usize {
        let mut n = 0;
        for y in y0..y1.min(self.h) {
            for x in x0..x1.min(self.w) {
                n += (self.px(x, y) == col) as usize;
            }
        }
        n
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// Reference CRC-32, bit by bit (independent of the table-driven one under test).
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

/// Validates and decodes a PNG as produced by the plot module (8-bit RGB, stored blocks).
fn decode(png: &[u8]) -> Image {
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

    // zlib header, then stored deflate blocks, then Adler-32.
    let z = &idat;
    assert_eq!(z[0] & 0x0f, 8, "CM = deflate");
    assert_eq!((z[0] as u32 * 256 + z[1] as u32) % 31, 0, "FCHECK");
    assert_eq!(z[1] & 0x20, 0, "no preset dictionary");
    let (mut p, mut raw, mut blocks) = (2, Vec::new(), 0);
    loop {
        let hdr = z[p];
        assert_eq!((hdr >> 1) & 3, 0, "only stored blocks expected");
        let len = u16::from_le_bytes([z[p + 1], z[p + 2]]);
        let nlen = u16::from_le_bytes([z[p + 3], z[p + 4]]);
        assert_eq!(nlen, !len, "NLEN");
        raw.extend_from_slice(&z[p + 5..p + 5 + len as usize]);
        p += 5 + len as usize;
        blocks += 1;
        if hdr & 1 == 1 {
            break;
        }
    }
    assert_eq!(p + 4, z.len(), "Adler-32 ends the stream");
    let mut a = 1u32;
    let mut b = 0u32;
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    assert_eq!(be32(&z[p..]), (b << 16) | a, "Adler-32");

    let stride = 1 + 3 * w as usize;
    assert_eq!(
        raw.len(),
        h as usize * stride,
        "height x (1 + 3 width) bytes"
    );
    let mut rgb = Vec::with_capacity(raw.len());
    for row in raw.chunks_exact(stride) {
        assert_eq!(row[0], 0, "filter type 0");
        rgb.extend_from_slice(&row[1..]);
    }
    Image { w, h, rgb, blocks }
}

#[test]
fn checksums_match_known_vectors() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(crc32(b"IEND"), 0xae42_6082);
    assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    assert_eq!(adler32(b""), 1);
    // Long input exercises the deferred modulo.
    let long: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &long {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    assert_eq!(adler32(&long), (b << 16) | a);
}

#[test]
fn png_round_trips_pixels() {
    let rgb: Vec<u8> = (0..3 * 2 * 3).map(|i| (i * 13) as u8).collect();
    let img = decode(&encode_png(3, 2, &rgb));
    assert_eq!((img.w, img.h), (3, 2));
    assert_eq!(img.rgb, rgb);
    assert_eq!(img.blocks, 1);
}

#[test]
fn png_splits_large_data_into_stored_blocks() {
    // 200x200 RGB is 120,200 raw bytes: two blocks of at most 65535.
    let c = Canvas::new(200, 200, [1, 2, 3]);
    let img = decode(&c.to_png());
    assert_eq!(img.blocks, 2);
    assert!(img.rgb.chunks(3).all(|p| p == [1, 2, 3]));
    // A 1x1 image and an empty stream decode too.
    assert_eq!(decode(&Canvas::new(1, 1, WHITE).to_png()).rgb, vec![255; 3]);
    assert_eq!(
        zlib_stored(&[]),
        vec![0x78, 0x01, 1, 0, 0, 0xff, 0xff, 0, 0, 0, 1]
    );
}

#[test]
fn text_rendering_draws_pixels() {
    let mut c = Canvas::new(200, 40, WHITE);
    let s = "Loss (x) = 0.5 +- 1%";
    let w = c.text(2, 2, s, 1, BLACK);
    assert_eq!(w, text_width(s, 1));
    let inked = |c: &Canvas| c.pixels.chunks(3).filter(|p| *p == BLACK).count();
    let n1 = inked(&c);
    assert!(n1 > 50, "{n1} pixels");
    // Everything lies inside the text box.
    for y in 0..40 {
        for x in 0..200 {
            if c.get(x, y) == Some(BLACK) {
                assert!((2..2 + w as i64).contains(&x) && (2..2 + GLYPH_H as i64).contains(&y));
            }
        }
    }
    // Scale 2 draws each font pixel as a 2x2 block.
    let mut c2 = Canvas::new(400, 40, WHITE);
    c2.text(2, 2, s, 2, BLACK);
    assert_eq!(inked(&c2), 4 * n1);
    // Rotated text draws the same number of pixels.
    let mut c3 = Canvas::new(40, 200, WHITE);
    c3.text_up(2, 190, s, 1, BLACK);
    assert_eq!(inked(&c3), n1);
}

#[test]
fn font_covers_printable_ascii_with_distinct_glyphs() {
    let mut seen = std::collections::HashMap::new();
    for ch in '!'..='~' {
        let g = glyph(ch);
        assert!(g.iter().any(|&r| r != 0), "{ch:?} is blank");
        assert!(g.iter().all(|&r| r < 32), "{ch:?} wider than 5 px");
        if let Some(other) = seen.insert(*g, ch) {
            panic!("{ch:?} and {other:?} share a glyph");
        }
    }
    assert!(glyph(' ').iter().all(|&r| r == 0));
    assert_ne!(glyph('±'), glyph('?'));
    assert_eq!(
        glyph('\u{2603}'),
        glyph('?'),
        "unknown characters fall back to '?'"
    );
}

#[test]
fn canvas_primitives_clip_and_draw() {
    let mut c = Canvas::new(20, 10, WHITE);
    c.line(-5, -5, 30, 30, BLACK, 2); // sticks out on both ends
    c.line(0, 9, 19, 9, BLACK, 1);
    assert_eq!(c.get(0, 9), Some(BLACK));
    assert_eq!(c.get(19, 9), Some(BLACK));
    assert_eq!(c.get(5, 5), Some(BLACK));
    assert_eq!(c.get(20, 0), None);
    c.fill_rect(15, -3, 10, 5, [9, 9, 9]);
    assert_eq!(c.get(19, 1), Some([9, 9, 9]));
    let mut d = Canvas::new(5, 20, WHITE);
    d.dashed_vline(2, 0, 19, 4, 3, BLACK);
    let col: Vec<bool> = (0..20).map(|y| d.get(2, y) == Some(BLACK)).collect();
    assert_eq!(col.iter().filter(|&&b| b).count(), 12); // 0-3, 7-10, 14-17
    assert!(col[0] && col[3] && !col[4] && !col[6] && col[7]);
}

#[test]
fn nice_ticks_use_1_2_5_steps() {
    assert_eq!(nice_step(10.0, 5), 2.0);
    assert_eq!(nice_step(1.0, 5), 0.2);
    assert_eq!(nice_step(7.0, 5), 2.0);
    assert_eq!(nice_step(20.0, 4), 5.0);
    assert_eq!(nice_step(900.0, 10), 100.0);
    assert!((nice_step(0.03, 5) - 0.01).abs() < 1e-12);
    assert_eq!(nice_step(0.0, 5), 1.0);
    assert_eq!(format_tick(0.30000000000000004, 0.1), "0.3");
    assert_eq!(format_tick(2000.0, 500.0), "2000");
    assert_eq!(format_tick(0.0, 0.1), "0");
    assert_eq!(format_tick(1.25, 0.05), "1.25");
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

/// Plot area of a chart (inside the axes, away from the tick labels).
fn plot_area(img: &Image) -> (u32, u32, u32, u32) {
    (74, 38, img.w - 20, img.h - 48)
}

#[test]
fn line_chart_draws_every_series_colour_in_the_plot_area() {
    let png = line_chart_png(&loss_chart(), 800, 480).unwrap();
    let img = decode(&png);
    assert_eq!((img.w, img.h), (800, 480));
    let (x0, y0, x1, y1) = plot_area(&img);
    for (i, col) in PALETTE.iter().take(3).enumerate() {
        let n = img.count(*col, x0, y0, x1, y1);
        assert!(n > 200, "series {i}: only {n} pixels");
    }
    // Dashed markers and dark axis/text pixels are there, the rest is mostly background.
    assert!(img.count(MARKER, x0, y0, x1, y1) > 50);
    assert!(img.count(INK, 0, 0, img.w, img.h) > 500);
    assert!(img.count(WHITE, 0, 0, img.w, img.h) > (img.w * img.h / 2) as usize);
    if let Ok(dir) = std::env::var("POCL_PLOT_DIR") {
        write_png(&std::path::Path::new(&dir).join("loss.png"), &png).unwrap();
    }
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
    let img = decode(&histogram_png(&h, 640, 400).unwrap());
    let (x0, _, x1, _) = plot_area(&img);
    let mid = (x0 + x1) / 2;
    // Height of the tallest bar of `col` in the columns [xa, xb): the run of that colour going
    // up from just above the x axis (so a legend swatch higher up is not counted).
    let base = img.h - 47;
    let bar = |col: Rgb, xa: u32, xb: u32| {
        (xa..xb)
            .map(|x| {
                (0..=base)
                    .rev()
                    .take_while(|&y| img.px(x, y) == col)
                    .count()
            })
            .max()
            .unwrap()
    };
    let (tall, short) = (bar(PALETTE[0], x0, mid), bar(PALETTE[0], mid, x1));
    let other = bar(PALETTE[1], mid, x1);
    assert!(tall > 100, "tallest bar {tall} px");
    let close = |px: usize, count: f64| (px as f64 - tall as f64 * count / 12.0).abs() <= 2.0;
    assert!(close(short, 4.0), "{short} vs {tall}");
    assert!(close(other, 6.0), "{other} vs {tall}");
    assert_eq!(bar(PALETTE[1], x0, mid), 0, "group 1 is empty in bin 0");
    if let Ok(dir) = std::env::var("POCL_PLOT_DIR") {
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
        let png = histogram_png(&many, 800, 480).unwrap();
        write_png(&std::path::Path::new(&dir).join("hist.png"), &png).unwrap();
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
        let img = decode(&line_chart_png(&chart, 320, 200).unwrap());
        assert_eq!((img.w, img.h), (320, 200));
        // A lone finite point still shows in its series colour.
        if series.len() == 1 && series[0].label == "one" {
            let (x0, y0, x1, y1) = plot_area(&img);
            assert!(img.count(PALETTE[0], x0, y0, x1, y1) >= 9);
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
            decode(&histogram_png(&h, 320, 200).unwrap());
        }
    }
    assert!(
        line_chart_png(&LineChart::default(), 10, 10).is_err(),
        "too small is an error"
    );
}

#[test]
fn write_png_writes_the_bytes() {
    let dir = std::env::temp_dir().join(format!("pocl-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.png");
    let png = Canvas::new(4, 4, WHITE).to_png();
    write_png(&path, &png).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), png);
    std::fs::remove_dir_all(&dir).unwrap();
}

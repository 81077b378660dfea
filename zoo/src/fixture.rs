//! A synthetic stand-in for the emoji-datasource package, for tests that must not touch the
//! network: same file names and formats (`package/emoji.json`, `package/img/{style}/sheets/32.png`
//! with 34 px cells), with simple generated drawings instead of emoji art (so no licence is
//! involved). Each class gets its own colour and shape; the two styles differ slightly, as real
//! art styles do.

use std::fs;
use std::io::BufWriter;
use std::path::Path;

use super::ZooError;
use super::classes::mapping;
use super::emoji::{FREE_STYLES, SHEET_EMOJI_SIZE};

fn draw(class: usize, n: usize, style: usize) -> Vec<u8> {
    let s = SHEET_EMOJI_SIZE;
    let mut img = vec![0u8; s * s * 4];
    // Distinct hue per class; the second style is a little darker with an outline.
    let hue = class as f32 / n.max(1) as f32;
    let rgb = |h: f32| {
        let f = |o: f32| {
            let x = ((h + o).fract() * 6.0 - 3.0).abs() - 1.0;
            (x.clamp(0.0, 1.0) * 255.0) as u8
        };
        [f(0.0), f(2.0 / 3.0), f(1.0 / 3.0)]
    };
    let mut colour = rgb(hue);
    if style == 1 {
        colour = colour.map(|c| (c as f32 * 0.8) as u8);
    }
    let shape = class % 4;
    let r = 6.0 + (class % 3) as f32 * 3.0;
    let c = (s as f32 - 1.0) / 2.0;
    for y in 0..s {
        for x in 0..s {
            let (dx, dy) = (x as f32 - c, y as f32 - c);
            let inside = match shape {
                0 => dx * dx + dy * dy <= r * r,
                1 => dx.abs() <= r && dy.abs() <= r,
                2 => dy >= -r && dy <= r && dx.abs() <= (dy + r) / 2.0,
                _ => {
                    let d = (dx * dx + dy * dy).sqrt();
                    d <= r && d >= r - 4.0
                }
            };
            let edge = style == 1 && inside && {
                let d = (dx.abs()).max(dy.abs());
                d >= r - 1.0
            };
            if inside {
                let p = (y * s + x) * 4;
                let px = if edge { [0, 0, 0] } else { colour };
                img[p..p + 3].copy_from_slice(&px);
                img[p + 3] = 255;
            }
        }
    }
    img
}

/// Writes a fixture package with the first `n_classes` classes of the mapping table (plus one
/// emoji outside it) under `dir/package/`, and returns the CIFAR names used.
pub fn write_fixture_package(dir: &Path, n_classes: usize) -> Result<Vec<String>, ZooError> {
    let table = mapping()?;
    let picked: Vec<_> = table.iter().take(n_classes).collect();
    let root = dir.join("package");
    let cell = SHEET_EMOJI_SIZE + 2;
    let grid = ((picked.len() + 1) as f64).sqrt().ceil() as usize;
    let side = grid * cell;
    let mut entries = Vec::new();
    for (i, m) in picked.iter().enumerate() {
        entries.push(serde_json::json!({
            "name": m.short_name.to_uppercase(),
            "unified": m.unified,
            "short_name": m.short_name,
            "short_names": [m.short_name],
            "sheet_x": i % grid,
            "sheet_y": i / grid,
            "category": "Animals & Nature",
            "has_img_google": true,
            "has_img_twitter": true,
            "has_img_apple": true,
            "has_img_facebook": false,
        }));
    }
    let decoy = picked.len();
    entries.push(serde_json::json!({
        "name": "DECOY",
        "unified": "1F9FF",
        "short_name": "decoy_not_in_table",
        "short_names": ["decoy_not_in_table"],
        "sheet_x": decoy % grid,
        "sheet_y": decoy / grid,
        "category": "Objects",
        "has_img_google": true,
        "has_img_twitter": false,
    }));
    fs::create_dir_all(&root).map_err(|e| ZooError::io(&root, e))?;
    let index = root.join("emoji.json");
    fs::write(&index, serde_json::Value::Array(entries).to_string())
        .map_err(|e| ZooError::io(&index, e))?;
    for (style_i, style) in FREE_STYLES.iter().enumerate() {
        let mut sheet = vec![0u8; side * side * 4];
        for i in 0..=decoy {
            let img = draw(i, picked.len() + 1, style_i);
            let (x0, y0) = ((i % grid) * cell + 1, (i / grid) * cell + 1);
            for y in 0..SHEET_EMOJI_SIZE {
                let dst = ((y0 + y) * side + x0) * 4;
                let src = y * SHEET_EMOJI_SIZE * 4;
                sheet[dst..dst + SHEET_EMOJI_SIZE * 4]
                    .copy_from_slice(&img[src..src + SHEET_EMOJI_SIZE * 4]);
            }
        }
        let dir = root.join("img").join(style).join("sheets");
        fs::create_dir_all(&dir).map_err(|e| ZooError::io(&dir, e))?;
        let path = dir.join(format!("{SHEET_EMOJI_SIZE}.png"));
        let file = fs::File::create(&path).map_err(|e| ZooError::io(&path, e))?;
        let mut enc = png::Encoder::new(BufWriter::new(file), side as u32, side as u32);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let png_err = |e: png::EncodingError| ZooError::Data {
            path: path.display().to_string(),
            message: format!("writing the fixture PNG: {e}"),
        };
        let mut w = enc.write_header().map_err(png_err)?;
        w.write_image_data(&sheet).map_err(png_err)?;
    }
    Ok(picked.iter().map(|m| m.cifar.to_string()).collect())
}

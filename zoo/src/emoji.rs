//! Reads the emoji artwork of the `emoji-datasource` npm package: `emoji.json` and the 32 px
//! sprite sheets `img/{style}/sheets/32.png` (a grid of 34 px cells, one emoji per cell at
//! `(sheet_x * 34 + 1, sheet_y * 34 + 1)`).
//!
//! Only the Google (Apache-2.0) and Twitter (CC-BY-4.0) styles are accepted; Apple and Facebook
//! art is not freely licensed and is refused.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ZooError;
use super::classes::{ClassMapping, mapping};

/// Styles whose artwork may be used (and derived data shipped): Google Noto (Apache-2.0) and
/// Twitter Twemoji (CC-BY-4.0).
pub const FREE_STYLES: [&str; 2] = ["google", "twitter"];

/// Side of one emoji in the sheets read here.
pub const SHEET_EMOJI_SIZE: usize = 32;

/// One entry of `emoji.json` (only the fields the zoo uses).
#[derive(Clone, Debug, Deserialize)]
pub struct EmojiEntry {
    /// Unicode name (`RED APPLE`).
    #[serde(default)]
    pub name: Option<String>,
    /// Code points (`1F34E`).
    pub unified: String,
    /// All short names (`["apple"]`).
    pub short_names: Vec<String>,
    /// Column in the sheets.
    pub sheet_x: usize,
    /// Row in the sheets.
    pub sheet_y: usize,
    /// Category (`Food & Drink`).
    #[serde(default)]
    pub category: Option<String>,
    /// Whether the Google sheet has this emoji.
    #[serde(default)]
    pub has_img_google: bool,
    /// Whether the Twitter sheet has this emoji.
    #[serde(default)]
    pub has_img_twitter: bool,
}

impl EmojiEntry {
    fn has_style(&self, style: &str) -> bool {
        match style {
            "google" => self.has_img_google,
            "twitter" => self.has_img_twitter,
            _ => false,
        }
    }
}

/// One class of the zoo's dataset: its name and one RGBA image per style.
#[derive(Clone, Debug)]
pub struct ImageClass {
    /// Class name: the CIFAR-100 name, or the emoji short name for emoji-named classes.
    pub name: String,
    /// Class id stored in LoRA metadata: the emoji's code points (`1F34E`).
    pub id: String,
    /// `(style, 32*32*4 RGBA bytes)`.
    pub images: Vec<(String, Vec<u8>)>,
}

/// The classes found in a package, plus what could not be used.
#[derive(Clone, Debug)]
pub struct ImageSet {
    /// Classes with at least one image, in name order.
    pub classes: Vec<ImageClass>,
    /// Mapped classes missing from this package or its sheets (name: reason).
    pub missing: Vec<String>,
}

/// The folder holding `emoji.json`: `dir` itself or `dir/package` (how an npm archive unpacks).
pub fn package_root(dir: &Path) -> Result<PathBuf, ZooError> {
    for candidate in [dir.to_path_buf(), dir.join("package")] {
        if candidate.join("emoji.json").is_file() {
            return Ok(candidate);
        }
    }
    Err(ZooError::Data {
        path: dir.display().to_string(),
        message: "no emoji.json here or in package/: point at the unpacked emoji-datasource \
                  package (npm pack emoji-datasource@16.0.0, then unpack)"
            .into(),
    })
}

/// Parses `emoji.json`.
pub fn read_index(root: &Path) -> Result<Vec<EmojiEntry>, ZooError> {
    let path = root.join("emoji.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ZooError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| ZooError::Data {
        path: path.display().to_string(),
        message: format!("not the emoji-datasource index: {e}"),
    })
}

fn check_styles(styles: &[String]) -> Result<(), ZooError> {
    if styles.is_empty() {
        return Err(ZooError::Config(
            "`styles` is empty: name at least one of google, twitter".into(),
        ));
    }
    for s in styles {
        if !FREE_STYLES.contains(&s.as_str()) {
            return Err(ZooError::Config(format!(
                "style `{s}` is not allowed: use google and/or twitter (Apple and Facebook \
                 emoji art is not freely licensed)"
            )));
        }
    }
    Ok(())
}

/// A decoded sprite sheet, RGBA8.
pub struct Sheet {
    width: usize,
    height: usize,
    rgba: Vec<u8>,
}

impl Sheet {
    /// Decodes a PNG of any colour type into RGBA8.
    pub fn read(path: &Path) -> Result<Sheet, ZooError> {
        let bad = |message: String| ZooError::Data {
            path: path.display().to_string(),
            message,
        };
        let file = File::open(path).map_err(|e| ZooError::io(path, e))?;
        let mut decoder = png::Decoder::new(BufReader::new(file));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder
            .read_info()
            .map_err(|e| bad(format!("not a readable PNG: {e}")))?;
        let size = reader
            .output_buffer_size()
            .ok_or_else(|| bad("PNG too large".into()))?;
        let mut buf = vec![0u8; size];
        let info = reader
            .next_frame(&mut buf)
            .map_err(|e| bad(format!("corrupt PNG: {e}")))?;
        let (width, height) = (info.width as usize, info.height as usize);
        let px = width * height;
        let rgba = match info.color_type {
            png::ColorType::Rgba => buf[..px * 4].to_vec(),
            png::ColorType::Rgb => buf[..px * 3]
                .chunks_exact(3)
                .flat_map(|c| [c[0], c[1], c[2], 255])
                .collect(),
            png::ColorType::GrayscaleAlpha => buf[..px * 2]
                .chunks_exact(2)
                .flat_map(|c| [c[0], c[0], c[0], c[1]])
                .collect(),
            png::ColorType::Grayscale => buf[..px].iter().flat_map(|&g| [g, g, g, 255]).collect(),
            other => return Err(bad(format!("unsupported PNG colour type {other:?}"))),
        };
        Ok(Sheet {
            width,
            height,
            rgba,
        })
    }

    /// The `size`-pixel emoji in cell `(x, y)` of a grid of `size + 2` pixel cells.
    pub fn crop(&self, x: usize, y: usize, size: usize) -> Option<Vec<u8>> {
        let (x0, y0) = (x * (size + 2) + 1, y * (size + 2) + 1);
        if x0 + size > self.width || y0 + size > self.height {
            return None;
        }
        let mut out = Vec::with_capacity(size * size * 4);
        for row in y0..y0 + size {
            let start = (row * self.width + x0) * 4;
            out.extend_from_slice(&self.rgba[start..start + size * 4]);
        }
        Some(out)
    }
}

fn load_sheets(root: &Path, styles: &[String]) -> Result<HashMap<String, Sheet>, ZooError> {
    let mut sheets = HashMap::new();
    for s in styles {
        let path = root
            .join("img")
            .join(s)
            .join("sheets")
            .join(format!("{SHEET_EMOJI_SIZE}.png"));
        sheets.insert(s.clone(), Sheet::read(&path)?);
    }
    Ok(sheets)
}

fn images_of(
    entry: &EmojiEntry,
    styles: &[String],
    sheets: &HashMap<String, Sheet>,
) -> Vec<(String, Vec<u8>)> {
    styles
        .iter()
        .filter(|s| entry.has_style(s))
        .filter_map(|s| {
            let sheet = sheets.get(s)?;
            let img = sheet.crop(entry.sheet_x, entry.sheet_y, SHEET_EMOJI_SIZE)?;
            // A fully transparent cell is a hole in the sheet, not an image.
            img.chunks_exact(4)
                .any(|p| p[3] > 0)
                .then(|| (s.clone(), img))
        })
        .collect()
}

/// The CIFAR-100-named classes of the shipped mapping table, with their images in `styles`.
pub fn load_cifar_classes(dir: &Path, styles: &[String]) -> Result<ImageSet, ZooError> {
    check_styles(styles)?;
    let root = package_root(dir)?;
    let index = read_index(&root)?;
    let sheets = load_sheets(&root, styles)?;
    let table = mapping()?;
    let mut by_short: HashMap<&str, &EmojiEntry> = HashMap::new();
    for e in &index {
        for s in &e.short_names {
            by_short.insert(s.as_str(), e);
        }
    }
    let mut classes = Vec::new();
    let mut missing = Vec::new();
    for ClassMapping {
        cifar,
        short_name,
        unified,
        ..
    } in table
    {
        let Some(entry) = by_short.get(short_name) else {
            missing.push(format!("{cifar}: emoji `{short_name}` not in emoji.json"));
            continue;
        };
        if !entry.unified.eq_ignore_ascii_case(unified) {
            missing.push(format!(
                "{cifar}: emoji `{short_name}` is {} here, the table says {unified}",
                entry.unified
            ));
            continue;
        }
        let images = images_of(entry, styles, &sheets);
        if images.is_empty() {
            missing.push(format!(
                "{cifar}: no image of `{short_name}` in the chosen styles"
            ));
            continue;
        }
        classes.push(ImageClass {
            name: cifar.to_string(),
            id: entry.unified.clone(),
            images,
        });
    }
    Ok(ImageSet { classes, missing })
}

/// Emoji categories whose emoji depict things (not faces, symbols or flags).
pub const OBJECT_CATEGORIES: [&str; 5] = [
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
];

/// Every emoji of [`OBJECT_CATEGORIES`] with an image in every one of `styles`, named by its
/// first short name, in name order: a larger class pool for LoRA trees.
pub fn load_object_classes(dir: &Path, styles: &[String]) -> Result<ImageSet, ZooError> {
    check_styles(styles)?;
    let root = package_root(dir)?;
    let index = read_index(&root)?;
    let sheets = load_sheets(&root, styles)?;
    let mut classes = Vec::new();
    for e in &index {
        let in_category = e
            .category
            .as_deref()
            .is_some_and(|c| OBJECT_CATEGORIES.contains(&c));
        if !in_category || !styles.iter().all(|s| e.has_style(s)) {
            continue;
        }
        let Some(name) = e.short_names.first() else {
            continue;
        };
        let images = images_of(e, styles, &sheets);
        if images.len() == styles.len() {
            classes.push(ImageClass {
                name: name.clone(),
                id: e.unified.clone(),
                images,
            });
        }
    }
    classes.sort_by(|a, b| a.name.cmp(&b.name));
    classes.dedup_by(|a, b| a.name == b.name);
    Ok(ImageSet {
        classes,
        missing: Vec::new(),
    })
}

//! Layer selection: best-by-metric, ties, missing layers, errors, and the per-layer plot.

use probex_stages::select::{
    Direction, LayerScore, SelectError, metric_value, render_png, render_svg, select_best,
};
use serde_json::{Value, json};

fn row(layer: &str, metrics: Value) -> LayerScore {
    LayerScore::new(layer, metrics)
}

/// A row of a grid: layer `layer` trained with `setting`.
fn cell(layer: &str, setting: &str, v: f64) -> LayerScore {
    LayerScore {
        layer: layer.to_string(),
        setting: setting.to_string(),
        metrics: json!({"val": {"accuracy": v}}),
    }
}

fn acc(layer: &str, v: f64) -> LayerScore {
    row(layer, json!({"val": {"accuracy": v, "loss": 1.0 - v}}))
}

#[test]
fn picks_the_best_in_either_direction() {
    let rows = [acc("0", 0.61), acc("1", 0.88), acc("2", 0.75)];
    let s = select_best(&rows, "val.accuracy", Direction::Max).unwrap();
    assert_eq!((s.chosen, s.chosen_layer(), s.best_value()), (1, "1", 0.88));
    assert_eq!(s.values, vec![Some(0.61), Some(0.88), Some(0.75)]);
    let s = select_best(&rows, "val.loss", Direction::Min).unwrap();
    assert_eq!(s.chosen_layer(), "1");
}

#[test]
fn ties_go_to_the_lowest_layer_whatever_the_order() {
    // "10" and "9" tie; numeric order says 9 < 10 although "10" < "9" as strings.
    let rows = [acc("10", 0.9), acc("3", 0.5), acc("9", 0.9)];
    assert_eq!(
        select_best(&rows, "val.accuracy", Direction::Max)
            .unwrap()
            .chosen_layer(),
        "9"
    );
    let reversed = [acc("9", 0.9), acc("3", 0.5), acc("10", 0.9)];
    assert_eq!(
        select_best(&reversed, "val.accuracy", Direction::Max)
            .unwrap()
            .chosen_layer(),
        "9"
    );
    let rows = [acc("b", 0.4), acc("a", 0.4)];
    assert_eq!(
        select_best(&rows, "val.accuracy", Direction::Min)
            .unwrap()
            .chosen_layer(),
        "a"
    );
}

/// Over a grid (layer x lr x standardize) a row is a layer and a setting: the same layer
/// under several settings is no duplicate, the best (layer, setting) pair wins, and ties go to
/// the lowest layer, then the setting's text, whatever the order the probes arrive in.
#[test]
fn grids_select_a_layer_and_a_setting() {
    let grid = [
        cell("0", "lr=0.001, standardize=false", 0.70),
        cell("0", "lr=0.002, standardize=true", 0.74),
        cell("2", "lr=0.001, standardize=false", 0.78),
        cell("2", "lr=0.002, standardize=true", 0.80),
        cell("2", "lr=0.002, standardize=false", 0.79),
    ];
    let s = select_best(&grid, "val.accuracy", Direction::Max).unwrap();
    assert_eq!(
        (s.chosen_layer(), s.chosen_setting(), s.best_value()),
        ("2", "lr=0.002, standardize=true", 0.80)
    );
    assert!(s.has_settings());
    assert_eq!(s.settings.len(), grid.len());

    // Ties: the lowest layer first, then the setting's text; input order does not matter.
    let tied = [
        cell("2", "lr=0.001, standardize=true", 0.8),
        cell("1", "lr=0.002, standardize=false", 0.8),
        cell("1", "lr=0.001, standardize=true", 0.8),
        cell("0", "lr=0.001, standardize=false", 0.5),
    ];
    for rows in [tied.to_vec(), tied.iter().rev().cloned().collect()] {
        let s = select_best(&rows, "val.accuracy", Direction::Max).unwrap();
        assert_eq!(
            (s.chosen_layer(), s.chosen_setting()),
            ("1", "lr=0.001, standardize=true")
        );
    }

    // The same (layer, setting) twice is an error naming both.
    let dup = [cell("1", "lr=0.001", 0.5), cell("1", "lr=0.001", 0.6)];
    assert_eq!(
        select_best(&dup, "val.accuracy", Direction::Max),
        Err(SelectError::DuplicateLayer("1 (lr=0.001)".into()))
    );

    // The table and CSV carry the setting; the plot shows each layer's best setting.
    assert!(
        s_table(&grid)
            .contains("| **2** | **lr=0.002, standardize=true** | **0.8000** | selected |"),
        "{}",
        s_table(&grid)
    );
    let csv = select_best(&grid, "val.accuracy", Direction::Max)
        .unwrap()
        .csv();
    assert!(
        csv.starts_with("layer,setting,val.accuracy,selected\n"),
        "{csv}"
    );
    assert!(
        csv.contains("2,\"lr=0.002, standardize=true\",0.8,true\n"),
        "{csv}"
    );
    let (layers, values, chosen) = s.per_layer();
    assert_eq!(layers, ["0", "2"]);
    assert_eq!(values, [Some(0.74), Some(0.80)]);
    assert_eq!(chosen, 1);

    // A selection over a grid reads back from JSON; one over layers alone has no settings.
    let back: probex_stages::select::Selection =
        serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.validate(), Ok(()));
    let plain = select_best(&[acc("0", 0.5)], "val.accuracy", Direction::Max).unwrap();
    assert!(!plain.has_settings() && plain.chosen_setting().is_empty());
    assert!(!serde_json::to_string(&plain).unwrap().contains("settings"));
}

fn s_table(rows: &[LayerScore]) -> String {
    select_best(rows, "val.accuracy", Direction::Max)
        .unwrap()
        .markdown_table()
}

#[test]
fn missing_layers_are_recorded_and_never_chosen() {
    let rows = [
        acc("0", 0.7),
        row("1", json!({"val": {"loss": 0.1}})),
        row("2", json!({"val": {"accuracy": null}})),
        acc("5", 0.6),
    ];
    let s = select_best(&rows, "val.accuracy", Direction::Max).unwrap();
    assert_eq!(s.chosen_layer(), "0");
    assert_eq!(s.values, vec![Some(0.7), None, None, Some(0.6)]);
    assert_eq!(s.missing, vec!["1".to_string(), "2".to_string()]);
    let csv = s.csv();
    assert_eq!(
        csv,
        "layer,val.accuracy,selected\n0,0.7,true\n1,,false\n2,,false\n5,0.6,false\n"
    );
    assert!(
        s.markdown_table()
            .contains("| **0** | **0.7000** | selected |\n| 1 | missing | |")
    );
}

#[test]
fn errors_name_the_problem() {
    let rows = [acc("0", 0.7), acc("1", 0.8)];
    match select_best(&rows, "val.acc", Direction::Max) {
        Err(SelectError::MetricMissing { metric, available }) => {
            assert_eq!(metric, "val.acc");
            assert_eq!(
                available,
                vec!["val.accuracy".to_string(), "val.loss".to_string()]
            );
        }
        other => panic!("expected MetricMissing, got {other:?}"),
    }
    let msg = select_best(&rows, "val.acc", Direction::Max)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("\"val.acc\"") && msg.contains("val.accuracy"),
        "{msg}"
    );
    assert_eq!(
        select_best(&[], "val.accuracy", Direction::Max),
        Err(SelectError::Empty)
    );
    assert_eq!(
        select_best(
            &[acc("3", 0.1), acc("3", 0.2)],
            "val.accuracy",
            Direction::Max
        ),
        Err(SelectError::DuplicateLayer("3".into()))
    );
    let bad = [row("0", json!({"val": {"accuracy": "high"}}))];
    assert!(matches!(
        select_best(&bad, "val.accuracy", Direction::Max),
        Err(SelectError::NotANumber { ref layer, .. }) if layer == "0"
    ));
    assert!("maximum".parse::<Direction>().is_err());
    assert_eq!("min".parse::<Direction>(), Ok(Direction::Min));
}

#[test]
fn metric_paths_accept_dotted_keys() {
    let m = json!({"val.accuracy": 0.5, "test": {"top1": 0.25, "holdout.top1": 0.125}});
    assert_eq!(metric_value(&m, "val.accuracy"), Ok(Some(0.5)));
    assert_eq!(metric_value(&m, "test.top1"), Ok(Some(0.25)));
    assert_eq!(metric_value(&m, "test.holdout.top1"), Ok(Some(0.125)));
    assert_eq!(metric_value(&m, "test.top5"), Ok(None));
    assert!(metric_value(&m, "test").is_err());
}

#[test]
fn selection_round_trips_as_json() {
    let s = select_best(
        &[acc("0", 0.5), acc("1", 0.25)],
        "val.accuracy",
        Direction::Max,
    )
    .unwrap();
    let text = serde_json::to_string(&s).unwrap();
    assert!(text.contains("\"direction\":\"max\""));
    let back: probex_stages::select::Selection = serde_json::from_str(&text).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.validate(), Ok(()));
    let broken = text.replace("\"chosen\":0", "\"chosen\":7");
    let broken: probex_stages::select::Selection = serde_json::from_str(&broken).unwrap();
    assert!(broken.validate().unwrap_err().contains("chosen row 7"));
    assert_eq!(broken.chosen_layer(), "");
    assert!(broken.best_value().is_nan());
}

#[test]
fn plots_render_with_text() {
    let rows: Vec<LayerScore> = (0..20)
        .filter(|&l| l != 7)
        .map(|l| acc(&l.to_string(), 0.5 + (l as f64 * 0.7).sin() * 0.2))
        .chain([row("7", json!({}))])
        .collect();
    let s = select_best(&rows, "val.accuracy", Direction::Max).unwrap();
    let svg = render_svg(&s.plot()).unwrap();
    assert!(svg.starts_with("<svg"));
    let title = format!(
        "val.accuracy per layer (best: layer {} = {:.4})",
        s.chosen_layer(),
        s.best_value()
    );
    assert!(svg.contains(&title), "SVG lacks the title {title:?}");

    let png_bytes = render_png(&s.plot()).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (960, 540));
    // The title band (top 40 rows) holds only text: dark pixels there mean the font rendered.
    let row_bytes = info.line_size;
    let dark = buf[..40 * row_bytes]
        .chunks(3)
        .filter(|p| p.iter().all(|&c| c < 128))
        .count();
    assert!(
        dark > 100,
        "only {dark} dark pixels in the title band: the font did not render"
    );
}

#[test]
fn plots_of_non_numeric_layers_and_bad_shapes() {
    let rows = [acc("attn.q", 0.3), acc("attn.k", 0.4)];
    let s = select_best(&rows, "val.accuracy", Direction::Max).unwrap();
    let svg = render_svg(&s.plot()).unwrap();
    assert!(svg.contains("attn.k"));
    let mut p = s.plot();
    p.values = &p.values[..1];
    assert!(render_svg(&p).is_err());
    let dir = tempfile::tempdir().unwrap();
    let (svg_path, png_path) = (dir.path().join("m.svg"), dir.path().join("m.png"));
    probex_stages::select::plot_metric(&s.plot(), &svg_path, &png_path).unwrap();
    assert!(svg_path.metadata().unwrap().len() > 0 && png_path.metadata().unwrap().len() > 0);
    let err = probex_stages::select::plot_metric(
        &s.plot(),
        &dir.path().join("no/such/dir.svg"),
        &png_path,
    );
    assert!(err.unwrap_err().to_string().contains("no/such/dir.svg"));
}

/// An attribute probe as a user writes it: which metrics exist depends on the label kind, and
/// a name that does not fit (`val.accuracy` on a category probe, whose metric is `val.top1`)
/// is an error when the experiment is loaded, before anything trains, naming the valid ones;
/// so is an expectation on a metric the probe will not report. Fitting names load.
#[test]
fn selection_and_expectation_metrics_are_checked_against_the_label_kind_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let exp = |label: &str, by: &str, expect: &str| {
        let text = format!(
            r#"
[stage.models]
kind = "fetch"
source = "dir"
path = "models"

[stage.layers]
kind = "extract"
from = "models"
layers = "all"
label = {label}

[stage.probe]
kind = "train"
from = "layers"
for_each = "layer"
model = "probex"

[stage.best]
kind = "select"
from = "probe"
by = "{by}"

[stage.report]
kind = "evaluate"
from = ["best"]

[expect]
{expect}
"#
        );
        let path = dir.path().join("attr.toml");
        std::fs::write(&path, text).unwrap();
        probex_engine::load(&path, &probex_stages::registry(probex_hub::connect)).map(|_| ())
    };
    let scheduler = r#"{ key = "lr_scheduler", kind = "category" }"#;
    let lr = r#"{ key = "learning_rate", kind = "numeric", transform = "log10" }"#;

    let e = exp(scheduler, "val.accuracy", "").unwrap_err().to_string();
    assert!(
        e.contains("`by = \"val.accuracy\"`")
            && e.contains("class probes")
            && e.contains("`val` has no `accuracy`")
            && e.contains("`top1`")
            && e.contains("`majority`"),
        "{e}"
    );
    let e = exp(lr, "val.top1", "").unwrap_err().to_string();
    assert!(e.contains("regression probes") && e.contains("`r2`"), "{e}");

    let e = exp(
        scheduler,
        "val.top1",
        r#""report.best.test.accuracy" = "> 0.5""#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("expectation on `report.best.test.accuracy`") && e.contains("`top1`"),
        "{e}"
    );
    let e = exp(lr, "val.r2", r#""best.tset.r2" = "> 0""#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no `tset`") && e.contains("`test`"), "{e}");
    // A comparison's right-hand side is checked too.
    let e = exp(
        scheduler,
        "val.top1",
        r#""best.test.top1" = "> best.test.majorty""#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`best.test.majorty`"), "{e}");

    exp(
        scheduler,
        "val.top1",
        r#""report.best.test.top1" = "> report.best.test.majority"
"best.layer" = ">= 0"
"report.best.downstream.knn.top1" = "> 0""#,
    )
    .unwrap();
    exp(lr, "val.r2", r#""best.test.r2" = "> 0""#).unwrap();
    let flag = r#"{ key = "random_flip", kind = "bool" }"#;
    exp(flag, "val.top1", r#""best.val.majority" = "< 1""#).unwrap();
}

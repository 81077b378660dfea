//! Report rendering against golden files written by hand in the paper's layout
//! (`golden/report.md`, `golden/table.csv`).

use probex_stages::evaluate::{Block, Column, MethodRow, Report, Section, render_table, table_csv};
use probex_stages::select::{Direction, LayerScore, select_best};
use serde_json::json;

fn golden(name: &str) -> String {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The poster's zero-shot table: rows = methods grouped by subset, a random baseline without
/// parameters.
fn zero_shot_rows() -> Vec<MethodRow> {
    let row = |subset: &str, method: &str, params: Option<u64>, ind: f64, zs: f64| {
        MethodRow::new(method, params)
            .in_group(subset)
            .with("test.top1", ind)
            .with("test_holdout.top1", zs)
    };
    vec![
        row("SD_200", "random", None, 0.006, 0.033),
        row("SD_200", "Dense", Some(32_000_000), 0.801, 0.706),
        row("SD_200", "ProbeX", Some(2_500_000), 0.973, 0.898),
        row("SD_1k", "random", None, 0.001, 0.006),
        row("SD_1k", "Dense", Some(210_000_000), 0.382, 0.343),
        row("SD_1k", "ProbeX", Some(2_500_000), 0.296, 0.505),
    ]
}

fn zero_shot_columns() -> Vec<Column> {
    vec![
        Column::new("test.top1", "In-dist. top-1"),
        Column::new("test_holdout.top1", "Zero-shot top-1"),
    ]
}

#[test]
fn report_matches_golden() {
    // Columns = subsets; one ProbeX row with mean ± std over seeds, a StatNN row missing MAE.
    let trees = ["ResNet", "DINO", "MAE", "SupViT"];
    let columns: Vec<Column> = trees.iter().map(|t| Column::new(*t, *t)).collect();
    let probex = [
        (0.816, 0.013),
        (0.725, 0.002),
        (0.771, 0.001),
        (0.881, 0.004),
    ]
    .iter()
    .zip(trees)
    .fold(
        MethodRow::new("ProbeX", Some(2_306_788)),
        |r, (&(m, s), t)| r.with(t, m).with(format!("{t}.std"), s),
    );
    let statnn = MethodRow::new("StatNN", Some(5_300))
        .with("ResNet", 0.55)
        .with("DINO", 0.548)
        .with("SupViT", 0.561);
    let sweep: Vec<LayerScore> = [
        ("58", 0.861),
        ("59", 0.885),
        ("60", 0.885),
        ("61", f64::NAN),
    ]
    .iter()
    .map(|&(l, v)| {
        LayerScore::new(
            l,
            if v.is_nan() {
                json!({"val": {}})
            } else {
                json!({"val": {"accuracy": v}})
            },
        )
    })
    .collect();
    let sel = select_best(&sweep, "val.accuracy", Direction::Max).unwrap();
    let downstream = MethodRow::new("ProbeX", None)
        .with("occ_knn", 0.91234)
        .with("occ_ledoit", 0.93456)
        .with("knn", 0.8)
        .with("retrieval", f64::NAN);
    let report = Report {
        title: "supvit: ProbeX on Model-J SupViT".into(),
        intro: vec![Block::Text(
            "Training-category prediction from one layer.".into(),
        )],
        sections: vec![
            Section {
                heading: "Results".into(),
                blocks: vec![
                    Block::Table {
                        rows: vec![probex, statnn],
                        columns,
                    },
                    Block::Table {
                        rows: zero_shot_rows(),
                        columns: zero_shot_columns(),
                    },
                ],
            },
            Section {
                heading: "Layer selection".into(),
                blocks: vec![
                    Block::Facts(vec![
                        ("metric".into(), "val.accuracy (max)".into()),
                        ("selected layer".into(), sel.chosen_layer().into()),
                        ("tie rule".into(), "lowest layer | first".into()),
                    ]),
                    Block::Markdown(sel.markdown_table()),
                    Block::Image {
                        alt: "val.accuracy per layer".into(),
                        path: "select/val.accuracy.svg".into(),
                    },
                ],
            },
            Section {
                heading: "Downstream tasks".into(),
                blocks: vec![Block::Table {
                    rows: vec![downstream],
                    columns: vec![
                        Column::new("occ_knn", "OCC kNN AUC").digits(4),
                        Column::new("occ_ledoit", "OCC Ledoit-Wolf AUC").digits(4),
                        Column::new("knn", "kNN acc.").digits(4),
                        Column::new("retrieval", "Retrieval"),
                        Column::new("absent", "Absent"),
                    ],
                }],
            },
        ],
    };
    assert_eq!(report.render(), golden("report.md"));
}

#[test]
fn csv_matches_golden() {
    assert_eq!(
        table_csv(&zero_shot_rows(), &zero_shot_columns()),
        golden("table.csv")
    );
}

#[test]
fn tables_without_groups_or_params_drop_those_columns() {
    let t = render_table(
        &[MethodRow::new("kNN", None).with("a", 0.5)],
        &[Column::new("a", "A").digits(1)],
    );
    assert_eq!(t, "| Method | A |\n|---|---:|\n| kNN | 0.5 |\n");
}

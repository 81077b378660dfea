//! The safetensors reader, layer listing and selectors, on fixture files written here.

mod files;

use files::*;
use probex_weights::reader::{MAX_HEADER_LEN, parse_bytes, read_header};
use probex_weights::shapes;
use probex_weights::{
    Architecture, LayerError, LayerIndex, LayerList, LayerMode, LayerSelector, Safetensors,
    SafetensorsFile, SelectorError, Transform, describe_layers, format_layer_table, layer_index,
    layer_rows, list_layers,
};

fn err_of(bytes: Vec<u8>) -> String {
    match Safetensors::from_bytes("fixture.safetensors", bytes) {
        Ok(_) => panic!("hostile file accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tensors_mode_keeps_the_sorted_name_position_of_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    // Written in a scrambled order; `layer.10` must sort before `layer.2` (byte order).
    write_model(
        &p,
        &[
            f32t("layer.2.weight", &[2, 2], &[1.0; 4]),
            f32t("layer.10.weight", &[3, 2], &[2.0; 6]),
            f32t("classifier.weight", &[5, 2], &[3.0; 10]),
            f32t("layer.1.weight", &[2, 2], &[4.0; 4]),
            i64t("position_ids", &[1, 4], &[0, 1, 2, 3]),
        ],
        &[],
    );
    // `mode = "tensors"`: what indices meant before the paper's lists, kept as an opt-in.
    let rows = list_layers(&p, LayerMode::Tensors).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "classifier.weight",
            "layer.1.weight",
            "layer.10.weight",
            "layer.2.weight",
            "position_ids"
        ]
    );
    assert_eq!(
        rows.iter().map(|r| r.index).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(rows[2].shape, [3, 2]);
    assert_eq!(rows[2].dtype, "F32");
    assert_eq!(rows[2].matrix, Some([3, 2]));
    assert_eq!(rows[4].matrix, None);
    assert!(rows[4].note.as_deref().unwrap().contains("I64"));

    let table = format_layer_table(&describe_layers(&p, LayerMode::Tensors).unwrap());
    let lines: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.is_empty())
        .skip(1)
        .collect();
    assert!(
        table.starts_with("layer list: tensors (5 layers of 5 tensors)"),
        "{table}"
    );
    assert_eq!(lines.len(), 6, "{table}");
    assert!(lines[0].starts_with("tensor  layer  name"), "{table}");
    assert!(
        lines[3].starts_with("     2      2  layer.10.weight")
            && lines[3].contains("3 x 2 (squeeze)"),
        "{table}"
    );
    assert!(
        lines[5].contains("I64 is not a floating-point weight"),
        "{table}"
    );

    let pick = |s: &str| s.parse::<LayerSelector>().unwrap().resolve(&rows);
    assert_eq!(pick("2").unwrap(), [2]);
    assert_eq!(pick("layer.10.weight").unwrap(), [2]);
    assert_eq!(pick("layer.*").unwrap(), [1, 2, 3]);
    assert_eq!(pick("glob:layer.1?.weight").unwrap(), [2]);
    assert_eq!(pick(r"re:layer\.\d\.").unwrap(), [1, 3]);
    assert_eq!(pick("1..3").unwrap(), [1, 2]);
    assert_eq!(pick("1..=3").unwrap(), [1, 2, 3]);
    // `all` leaves out what cannot be a probe input; naming it is an error saying why.
    assert_eq!(pick("all").unwrap(), [0, 1, 2, 3]);
    let e = pick("4").unwrap_err();
    assert!(
        matches!(&e, SelectorError::NotAnInput { index: 4, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("I64"), "{e}");
    assert_eq!(
        pick("9").unwrap_err(),
        SelectorError::OutOfRange { index: 9, count: 5 }
    );
    assert!(pick("9").unwrap_err().to_string().contains("5 layers"));
    let e = pick("layer.3.weight").unwrap_err();
    assert!(
        matches!(&e, SelectorError::NoSuchLayer { name, .. } if name == "layer.3.weight"),
        "{e:?}"
    );
    assert!(e.to_string().contains("no layer is named"), "{e}");
    let e = pick("re:nothing").unwrap_err();
    assert_eq!(e, SelectorError::SelectsNothing("re:nothing".into()));
    assert!(e.to_string().contains("selects no layer"), "{e}");
    assert!(matches!(
        "re:(".parse::<LayerSelector>(),
        Err(SelectorError::BadRegex { .. })
    ));
    assert_eq!(
        "3..1".parse::<LayerSelector>(),
        Err(SelectorError::EmptyRange("3..1".into()))
    );

    #[derive(serde::Deserialize)]
    struct W {
        layers: LayerSelector,
    }
    let w: W = toml::from_str("layers = [0, \"layer.2.weight\", \"1..2\"]").unwrap();
    assert_eq!(w.layers.resolve(&rows).unwrap(), [0, 1, 3]);
    let w: W = toml::from_str("layers = 59").unwrap();
    assert_eq!(w.layers, LayerSelector::Index(59));
}

#[test]
fn lora_layers_are_the_sorted_down_names() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lora.safetensors");
    let t = |n: &str, s: &[usize]| f32t(n, s, &vec![0.5; s.iter().product()]);
    write_model(
        &p,
        &[
            t("unet.b.10.to_q.lora.down.weight", &[4, 8]),
            t("unet.b.10.to_q.lora.up.weight", &[6, 4]),
            t("unet.b.2.to_q.lora.down.weight", &[4, 8]),
            t("unet.b.2.to_q.lora.up.weight", &[6, 4]),
            t("unet.a.conv.lora.down.weight", &[4, 3, 3, 3]),
            t("unet.a.conv.lora.up.weight", &[5, 4, 1, 1]),
        ],
        &[],
    );
    let rows = list_layers(&p, LayerMode::Auto).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "unet.a.conv.lora.down.weight",
            "unet.b.10.to_q.lora.down.weight",
            "unet.b.2.to_q.lora.down.weight"
        ]
    );
    assert_eq!(rows[0].matrix, Some([5, 27]));
    assert_eq!(rows[1].matrix, Some([6, 8]));
    assert_eq!(rows[1].transform, Some(Transform::LoraProduct));
    assert_eq!(
        rows[1].lora_up.as_deref(),
        Some("unet.b.10.to_q.lora.up.weight")
    );
    // The same file in plain mode lists every tensor.
    assert_eq!(list_layers(&p, LayerMode::Tensors).unwrap().len(), 6);

    // A down factor without its up factor is an error naming both.
    let q = dir.path().join("broken.safetensors");
    write_model(&q, &[t("x.lora.down.weight", &[2, 2])], &[]);
    let e = list_layers(&q, LayerMode::Auto).unwrap_err().to_string();
    assert!(
        e.contains("x.lora.up.weight") && e.contains("broken.safetensors"),
        "{e}"
    );
}

#[test]
fn header_reader_and_mapped_reader_agree() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    write_model(
        &p,
        &[
            f32t("b", &[2], &[1.0, 2.0]),
            f16t("a", &[3], &[0.5, -1.0, 2.0]),
        ],
        &[("k", "v")],
    );
    let st = SafetensorsFile::open(&p).unwrap();
    assert_eq!(read_header(&p).unwrap(), *st.header());
    assert_eq!(st.metadata()["k"], "v");
    let a = st.entry("a").unwrap();
    assert_eq!(st.to_f32(a).unwrap(), [0.5, -1.0, 2.0]);
    let e = st.entry("zzz").unwrap_err().to_string();
    assert!(e.contains("m.safetensors") && e.contains("`zzz`") && e.contains("not in this file"));
}

#[test]
fn hostile_files_give_clear_errors() {
    let ok_header = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    let good = raw(ok_header, &[0u8; 16]);
    assert!(Safetensors::from_bytes("good", good.clone()).is_ok());

    // Truncated: too short for the length prefix, and cut inside the data.
    assert!(err_of(good[..5].to_vec()).contains("8-byte header length"));
    let e = err_of(good[..good.len() - 3].to_vec());
    assert!(
        e.contains("beyond the data section") && e.contains("re-download"),
        "{e}"
    );

    // Header length beyond the file, and beyond the cap (no giant allocation is attempted).
    let mut b = good.clone();
    b[..8].copy_from_slice(&(1_000_000u64).to_le_bytes());
    assert!(err_of(b).contains("beyond the end of the file"));
    let mut b = good.clone();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err_of(b).contains("limit"));
    const { assert!(MAX_HEADER_LEN <= 100_000_000) };

    // Header not JSON / not UTF-8 / wrong JSON shape.
    assert!(err_of(raw("this is not json", &[])).contains("not valid safetensors JSON"));
    let mut b = raw(r#"{"__metadata__":{"k":"AB"}}"#, &[]);
    let at = b.iter().position(|&c| c == b'A').unwrap();
    b[at] = 0xff;
    assert!(err_of(b).contains("not valid safetensors JSON"));
    assert!(err_of(raw(r#"[1,2]"#, &[])).contains("not valid safetensors JSON"));
    let e = err_of(raw(r#"{"__metadata__":{"k":5}}"#, &[]));
    assert!(e.contains("string"), "{e}");
    let e = err_of(raw(
        r#"{"w":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    ));
    assert!(e.contains("tensor `w`"), "{e}");

    // Offsets out of bounds, backwards, overlapping.
    let e = err_of(raw(
        r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,32]}}"#,
        &[0; 16],
    ));
    assert!(e.contains("`w`") && e.contains("beyond"), "{e}");
    let e = err_of(raw(
        r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#,
        &[0; 16],
    ));
    assert!(e.contains("backwards"), "{e}");
    let e = err_of(raw(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        &[0; 16],
    ));
    assert!(
        e.contains("overlap") && e.contains("`a`") && e.contains("`b`"),
        "{e}"
    );
    let e = err_of(raw(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    ));
    assert!(e.contains("twice"), "{e}");

    // Shape/dtype byte count mismatch, and shapes whose product overflows.
    let e = err_of(raw(
        r#"{"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}}"#,
        &[0; 16],
    ));
    assert!(e.contains("needs 8 bytes") && e.contains("hold 16"), "{e}");
    let e = err_of(raw(
        r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#,
        &[0; 16],
    ));
    assert!(e.contains("overflows"), "{e}");
    let e = err_of(raw(
        r#"{"w":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,16]}}"#,
        &[0; 16],
    ));
    assert!(e.contains("not valid safetensors JSON"), "{e}");
}

#[test]
fn giant_metadata_is_read_within_the_cap_and_errors_stay_short() {
    let big = "x".repeat(5_000_000);
    let header = format!(r#"{{"__metadata__":{{"note":"{big}","t":"['apple'"}}}}"#);
    let h = parse_bytes(&raw(&header, &[])).unwrap();
    assert_eq!(h.metadata["note"].len(), 5_000_000);
    // A label error about a huge value quotes only an excerpt.
    let l = probex_weights::labels::Labeler::new(probex_weights::labels::LabelSpec::new(
        "note",
        probex_weights::labels::LabelKind::MultiLabel,
    ))
    .unwrap();
    let e = l.read(&h.metadata).unwrap_err();
    let e = e.to_string();
    assert!(e.len() < 400, "error of {} bytes", e.len());
    assert!(e.contains("5000000 bytes"), "{e}");
}

#[test]
fn files_on_disk_report_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("short.safetensors");
    std::fs::write(&p, b"abc").unwrap();
    let e = SafetensorsFile::open(&p).err().unwrap().to_string();
    assert!(
        e.contains("short.safetensors") && e.contains("8-byte"),
        "{e}"
    );
    let e = read_header(&p).unwrap_err().to_string();
    assert!(e.contains("short.safetensors"), "{e}");
    let e = SafetensorsFile::open(&dir.path().join("missing.safetensors"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
    let e = SafetensorsFile::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

/// The header of a generated model at its real names and shapes (no file: a ViT-B is 343 MB).
fn header_of(specs: &[shapes::TensorSpec]) -> probex_weights::Header {
    shapes::header(specs, safetensors::Dtype::F32, &Default::default()).unwrap()
}

#[test]
fn vit_b16_layers_are_the_papers_74() {
    let h = header_of(&shapes::vit_b16(100));
    assert_eq!(h.tensors.len(), 200);
    let list = LayerList::of(&h, LayerMode::Auto).unwrap();
    assert_eq!(list.architecture, Architecture::Vit);
    assert_eq!(list.rows.len(), 74);
    let name = |i: usize| list.rows[i].name.as_str();
    assert_eq!(name(0), "classifier.weight");
    assert_eq!(name(1), "vit.embeddings.position_embeddings");
    assert_eq!(
        name(59),
        "vit.encoder.layer.7.attention.output.dense.weight"
    );
    assert_eq!(
        name(64),
        "vit.encoder.layer.8.attention.attention.value.weight"
    );
    assert_eq!(list.rows[1].matrix, Some([197, 768]));
    assert_eq!(list.rows[59].matrix, Some([768, 768]));
    // `all` is the 74: no bias, norm, cls_token or patch embedding.
    assert_eq!(
        list.select(&LayerSelector::All).unwrap(),
        (0..74).collect::<Vec<_>>()
    );
    for r in &list.rows {
        assert!(
            r.name.ends_with(".weight") || r.name.ends_with("position_embeddings"),
            "{}",
            r.name
        );
        assert!(!r.name.contains("layernorm") && !r.name.contains("patch_embeddings"));
    }
    // Patterns pick inside the list too.
    let picked = list.select(&"*.weight".parse().unwrap()).unwrap();
    assert_eq!(picked.len(), 73);
    // The check extraction runs on every model counts the same way.
    assert_eq!(layer_index(&h, name(59), Architecture::Vit), Ok(Some(59)));
    assert_eq!(layer_index(&h, name(64), Architecture::Vit), Ok(Some(64)));
    let bias = "vit.encoder.layer.7.attention.output.dense.bias";
    assert_eq!(layer_index(&h, bias, Architecture::Vit), Ok(None));
    // Naming a tensor that is not a layer says so, and how to get it.
    let e = list.select(&bias.parse().unwrap()).unwrap_err();
    assert!(
        matches!(&e, LayerError::NotALayer { name, architecture: Architecture::Vit, .. } if name == bias),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(
        e.contains("not a layer") && e.contains("mode = \"tensors\""),
        "{e}"
    );
    // Asking for the ViT list by name gives the same list.
    assert_eq!(LayerList::of(&h, LayerMode::Vit).unwrap(), list);
    // Every tensor (the old meaning, on request): there the paper's 59 is 157, and 59 is
    // another tensor.
    let every = LayerList::of(&h, LayerMode::Tensors).unwrap();
    assert_eq!(every.rows.len(), 200);
    assert_eq!(every.rows[157].name, name(59));
    assert_eq!(
        every.rows[59].name,
        "vit.encoder.layer.11.attention.attention.value.weight"
    );
    // The fallback on the same file would add the patch embedding conv.
    assert_eq!(
        LayerList::of(&h, LayerMode::Matrices).unwrap().rows.len(),
        75
    );
    // Other sizes: the blocks the file has (ViT-L: 24 blocks, 146 layers).
    let large = shapes::vit(&shapes::VitConfig {
        hidden: 1024,
        blocks: 24,
        intermediate: 4096,
        ..shapes::VitConfig::b16(10)
    });
    assert_eq!(
        layer_rows(&header_of(&large), LayerMode::Auto)
            .unwrap()
            .len(),
        146
    );
}

#[test]
fn resnet101_layers_are_the_papers_105() {
    let h = header_of(&shapes::resnet101(100));
    let list = LayerList::of(&h, LayerMode::Auto).unwrap();
    assert_eq!(list.architecture, Architecture::Resnet);
    assert_eq!(list.rows.len(), 105);
    let name = |i: usize| list.rows[i].name.as_str();
    assert_eq!(name(0), "classifier.1.weight");
    assert_eq!(name(1), "resnet.embedder.embedder.convolution.weight");
    assert_eq!(
        name(59),
        "resnet.encoder.stages.2.layers.19.layer.0.convolution.weight"
    );
    // [256, 1024, 1, 1] squeezes to a matrix; the stem [64, 3, 7, 7] is reshaped.
    assert_eq!(list.rows[59].matrix, Some([256, 1024]));
    assert_eq!(list.rows[1].matrix, Some([3 * 7 * 7, 64]));
    assert!(list.rows.iter().all(|r| !r.name.contains("normalization")));
    assert_eq!(
        layer_index(&h, name(59), Architecture::Resnet),
        Ok(Some(59))
    );
    // Every tensor: batch norms (4 statistics and the I64 counter per convolution) too.
    assert_eq!(layer_rows(&h, LayerMode::Tensors).unwrap().len(), 626);
}

#[test]
fn sd1_lora_layers_are_the_128_down_factors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pytorch_lora_weights.safetensors");
    let specs = shapes::sd1_lora(4);
    shapes::write_safetensors(&p, &specs, safetensors::Dtype::F16, &Default::default(), 1).unwrap();
    let rows = list_layers(&p, LayerMode::Auto).unwrap();
    assert_eq!(rows.len(), 128);
    assert_eq!(
        rows[46].name,
        "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q.lora.down.weight"
    );
    assert_eq!(rows[46].matrix, Some([1280, 1280]));
    assert_eq!(rows[46].transform, Some(Transform::LoraProduct));
    // attn2.to_k reads the 768-wide text states.
    assert_eq!(
        rows[44].name,
        "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.lora.down.weight"
    );
    assert_eq!(rows[44].matrix, Some([1280, 768]));
    let listing = describe_layers(&p, LayerMode::Auto).unwrap();
    assert_eq!(listing.architecture, Architecture::SdLora);
    assert_eq!((listing.layers, listing.tensors.len()), (128, 256));
    let up = listing
        .tensors
        .iter()
        .find(|t| {
            t.name.ends_with("attn2.to_q.lora.up.weight")
                && t.name.contains("down_blocks.2.attentions.1")
        })
        .unwrap();
    assert_eq!(up.layer, None);
    assert_eq!(up.note.as_deref(), Some("LoRA up factor of layer 46"));
}

#[test]
fn unknown_architectures_fall_back_to_the_weight_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mlp.safetensors");
    let t = |n: &str, s: &[usize]| f32t(n, s, &vec![0.5; s.iter().product()]);
    write_model(
        &p,
        &[
            t("encoder.0.weight", &[8, 4]),
            t("encoder.0.bias", &[8]),
            t("norm.weight", &[8]),
            t("norm.bias", &[8]),
            t("head.weight", &[3, 8]),
            t("head.bias", &[3]),
            t("conv.weight", &[4, 2, 3, 3]),
            t("scale", &[]),
            t("token", &[1, 1, 8]),
            i64t("steps", &[2, 2], &[0, 1, 2, 3]),
        ],
        &[],
    );
    let rows = list_layers(&p, LayerMode::Auto).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["conv.weight", "encoder.0.weight", "head.weight"]);
    let pick = |s: &str| s.parse::<LayerSelector>().unwrap().resolve(&rows);
    assert_eq!(pick("all").unwrap(), [0, 1, 2]);
    // `norm.weight` is a vector, so no layer.
    assert_eq!(pick("*.weight").unwrap(), [0, 1, 2]);

    // The rule used is said, and each tensor shows both numbers.
    let listing = describe_layers(&p, LayerMode::Auto).unwrap();
    assert_eq!(listing.architecture, Architecture::Matrices);
    let table = format_layer_table(&listing);
    assert!(
        table.starts_with("layer list: matrices (3 layers of 10 tensors)")
            && table.contains("fallback"),
        "{table}"
    );
    let line = |n: &str| {
        table
            .lines()
            .find(|l| l.contains(&format!(" {n} ")))
            .unwrap()
            .to_string()
    };
    // Sorted: conv.weight, encoder.0.bias, encoder.0.weight, head.bias, head.weight, ...
    assert!(
        line("encoder.0.weight").starts_with("     2      1  "),
        "{table}"
    );
    assert!(
        line("encoder.0.bias").starts_with("     1      -  "),
        "{table}"
    );
    assert!(
        line("head.weight").starts_with("     4      2  "),
        "{table}"
    );

    // Naming a bias is an error that says why and what to do.
    let header = probex_weights::reader::read_header(&p).unwrap();
    let e = LayerList::of(&header, LayerMode::Auto)
        .unwrap()
        .select(&"encoder.0.bias".parse().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a layer") && e.contains("fallback"), "{e}");
}

#[test]
fn a_vit_that_lacks_part_of_its_list_is_an_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vit.safetensors");
    let mut specs = shapes::vit(&shapes::VitConfig {
        hidden: 4,
        blocks: 3,
        intermediate: 8,
        patch: 2,
        image: 4,
        channels: 1,
        classes: 2,
    });
    specs.retain(|s| s.name != "vit.encoder.layer.1.intermediate.dense.weight");
    shapes::write_safetensors(&p, &specs, safetensors::Dtype::F32, &Default::default(), 0).unwrap();
    let e = list_layers(&p, LayerMode::Auto).unwrap_err().to_string();
    assert!(
        e.contains("vit.safetensors")
            && e.contains("vit.encoder.layer.1.intermediate.dense.weight")
            && e.contains("mode = \"matrices\""),
        "{e}"
    );
    // Asked for, the fallback reads it.
    assert_eq!(
        list_layers(&p, LayerMode::Matrices).unwrap().len(),
        2 + 1 + 6 * 3 - 1
    );
    // The ViT list on a file that is no ViT is the same error.
    let q = dir.path().join("mlp.safetensors");
    write_model(&q, &[f32t("fc.weight", &[2, 2], &[1.0; 4])], &[]);
    let e = list_layers(&q, LayerMode::Vit).unwrap_err().to_string();
    assert!(e.contains("classifier.weight"), "{e}");
}

/// The per-file index extraction uses answers as `layer_index` does, for every tensor of every
/// architecture's real names, in every list.
#[test]
fn a_files_layer_index_agrees_with_layer_index_for_every_tensor() {
    let all = [
        Architecture::Vit,
        Architecture::Resnet,
        Architecture::SdLora,
        Architecture::Matrices,
        Architecture::AllTensors,
    ];
    for specs in [
        shapes::vit_b16(100),
        shapes::resnet101(100),
        shapes::sd1_lora(16),
    ] {
        let h = header_of(&specs);
        let index = LayerIndex::new(&h);
        let mut listed = 0;
        for arch in all {
            for t in &h.tensors {
                let want = layer_index(&h, &t.name, arch).unwrap();
                listed += usize::from(want.is_some());
                assert_eq!(
                    index.index(&t.name, arch).unwrap(),
                    want,
                    "{} {arch:?}",
                    t.name
                );
            }
        }
        assert!(listed > h.tensors.len(), "the lists hold tensors");
        assert_eq!(
            index.index("no.such.tensor", Architecture::AllTensors),
            Ok(None)
        );
    }
}

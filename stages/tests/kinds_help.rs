//! `probex kinds KIND` is generated from the definitions the engine validates params with:
//! every param a kind accepts is documented and shown, nothing else is, and the defaults come
//! from the params types themselves.

use probex_engine::Registry;

fn registry() -> Registry {
    probex_stages::registry(probex_hub::connect)
}

#[test]
fn every_param_of_every_kind_is_documented_and_shown_and_nothing_else() {
    let reg = registry();
    assert!(reg.names().len() >= 8, "{:?}", reg.names());
    for kind in reg.names() {
        let fields = reg
            .param_fields(kind)
            .unwrap_or_else(|| panic!("{kind}: params are not a plain struct"));
        let doc = reg.params_doc(kind).unwrap();
        let documented: Vec<&str> = doc.params.iter().map(|(n, _)| *n).collect();
        let mut a = fields.clone();
        let mut b = documented.clone();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "{kind}: accepted params (left) vs documented (right)");
        for (name, line) in doc.params {
            assert!(!line.trim().is_empty(), "{kind}.{name} has an empty doc");
        }
        let help = reg
            .help(kind)
            .unwrap()
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let shown: Vec<&str> = help.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(shown, fields, "{kind}: shown params, in declaration order");
        let text = probex_engine::params::render(&help);
        for name in &fields {
            assert!(
                text.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{name} ")) || l.trim() == *name),
                "{kind}: `{name}` missing from\n{text}"
            );
        }
    }
}

#[test]
fn defaults_come_from_the_params_types() {
    let reg = registry();
    let param = |kind: &str, name: &str| {
        reg.help(kind)
            .unwrap()
            .unwrap()
            .params
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{kind}.{name}"))
    };
    // Required params are found by leaving them out, and shown with the example's value.
    let model = param("train", "model");
    assert!(model.required);
    assert_eq!(model.default.as_deref(), Some("\"probex\""));
    // The defaults of the probe named in the example (TrainConfig's own).
    let lr = param("train", "lr");
    assert!(!lr.required);
    assert_eq!(lr.default.as_deref(), Some("0.001"));
    assert_eq!(param("train", "epochs").default.as_deref(), Some("500"));
    assert_eq!(
        param("select", "by").default.as_deref(),
        Some("\"val.accuracy\"")
    );
    assert_eq!(param("evaluate", "k").default.as_deref(), Some("2"));
    // Unset optional params have no default.
    assert_eq!(param("evaluate", "title").default, None);
    // `threads` is the engine's key, not train's param.
    assert!(
        reg.param_fields("train")
            .unwrap()
            .iter()
            .all(|f| *f != "threads")
    );
}

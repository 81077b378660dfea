//! Malformed experiment files: each must give a short error (under 25 lines) naming the file,
//! line and column (`--> file:L:C`) with a caret under the offending text, and nothing may
//! panic.

mod kinds;
mod support;

use std::panic::{AssertUnwindSafe, catch_unwind};

use support::Bench;

/// (file stem, text, line, column, a fragment of the message).
type Case = (&'static str, &'static str, usize, usize, &'static str);

const CASES: &[Case] = &[
    (
        "syntax_header",
        "[stage.a\nkind = \"const\"\n",
        1,
        9,
        "unclosed table",
    ),
    (
        "syntax_value",
        "[stage.a]\nkind = \"const\"\nvalue = \n",
        3,
        9,
        "expected",
    ),
    (
        "unknown_table",
        "[stages.a]\nkind = \"const\"\n",
        1,
        2,
        "unknown table `stages`",
    ),
    (
        "unknown_header_key",
        "[experiment]\nnmae = \"x\"\n",
        2,
        1,
        "unknown field `nmae`",
    ),
    (
        "engine_key_typo",
        "[stage.c]\nkind = \"const\"\nvalue = 1\nseed = [1, 2]\nfor-each = \"seed\"\n",
        5,
        1,
        "did you mean `for_each`?",
    ),
    (
        "unknown_param",
        "[stage.a]\nkind = \"const\"\nvaleu = 1.0\n",
        3,
        1,
        "unknown field `valeu`",
    ),
    (
        "wrong_type",
        "[stage.a]\nkind = \"const\"\nvalue = \"one\"\n",
        3,
        9,
        "expected f64",
    ),
    (
        "from_type",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[stage.b]\nkind = \"add\"\nfrom = 3\n",
        7,
        8,
        "`from` must be a name or a list of names",
    ),
    (
        "threads_type",
        "[stage.a]\nkind = \"const\"\nvalue = 1\nthreads = \"four\"\n",
        4,
        11,
        "`threads` must be a positive integer",
    ),
    (
        "threads_zero",
        "[stage.a]\nkind = \"const\"\nvalue = 1\nthreads = 0\n",
        4,
        11,
        "positive",
    ),
    (
        "missing_param",
        "[stage.a]\nkind = \"const\"\n",
        1,
        8,
        "missing field `value`",
    ),
    (
        "missing_input",
        "[stage.b]\nkind = \"add\"\n",
        1,
        8,
        "needs an input of type `num`",
    ),
    (
        "cycle",
        "[stage.a]\nkind = \"add\"\nfrom = \"c\"\n\n[stage.b]\nkind = \"add\"\nfrom = \"a\"\n\n[stage.c]\nkind = \"add\"\nfrom = \"b\"\n",
        1,
        8,
        "stages form a cycle: a -> b -> c -> a",
    ),
    (
        "bad_range",
        "[stage.s]\nkind = \"sweep\"\nlayers = \"5..2\"\n",
        3,
        10,
        "empty range",
    ),
    (
        "bad_layers",
        "[stage.s]\nkind = \"sweep\"\nlayers = \"first\"\n",
        3,
        10,
        "START..END",
    ),
    (
        "empty_sweep",
        "[stage.c]\nkind = \"const\"\nvalue = 1\nseed = []\nfor_each = \"seed\"\n",
        4,
        8,
        "`seed` sweeps over no values",
    ),
    (
        "repeated_sweep_value",
        "[stage.c]\nkind = \"const\"\nvalue = 1\nseed = [1, 2, 1]\nfor_each = \"seed\"\n",
        4,
        15,
        "`seed` lists `1` twice",
    ),
    (
        "swept_value_of_wrong_type",
        "[stage.c]\nkind = \"const\"\nvalue = 1\nseed = [1, \"two\"]\nfor_each = \"seed\"\n",
        4,
        12,
        "expected i64",
    ),
    (
        "duplicate_stage",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[stage.a]\nkind = \"const\"\nvalue = 2\n",
        5,
        8,
        "duplicate key",
    ),
    (
        "unknown_kind",
        "[stage.a]\nkind = \"constant\"\nvalue = 1\n",
        2,
        8,
        "unknown stage kind `constant`",
    ),
    (
        "kind_type",
        "[stage.a]\nkind = 3\n",
        2,
        8,
        "`kind` must be a string",
    ),
    (
        "missing_kind",
        "[stage.a]\nvalue = 1\n",
        1,
        8,
        "stage `a` has no `kind`",
    ),
    (
        "wrong_input_type",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[stage.d]\nkind = \"double\"\nfrom = \"a\"\n",
        7,
        8,
        "stage `d` (double) cannot read `a`",
    ),
    (
        "self_reference",
        "[stage.a]\nkind = \"add\"\nfrom = \"a\"\n",
        3,
        8,
        "stage `a` reads itself",
    ),
    (
        "unknown_from",
        "[stage.alpha]\nkind = \"const\"\nvalue = 1\n\n[stage.b]\nkind = \"add\"\nfrom = \"alhpa\"\n",
        7,
        8,
        "did you mean `alpha`?",
    ),
    (
        "unknown_from_in_list",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[stage.b]\nkind = \"add\"\nfrom = [\"a\", \"zzz\"]\n",
        7,
        14,
        "unknown input `zzz`",
    ),
    (
        "from_listed_twice",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[stage.b]\nkind = \"add\"\nfrom = [\"a\", \"a\"]\n",
        7,
        14,
        "`a` is named twice in `from`",
    ),
    (
        "one_input_twice",
        "[stage.s]\nkind = \"sweep\"\nlayers = \"0..2\"\n\n[stage.t]\nkind = \"sweep\"\nlayers = \"0..2\"\n\n[stage.d]\nkind = \"double\"\nfrom = [\"s\", \"t\"]\n",
        11,
        14,
        "stage `d` reads only one `layer` input",
    ),
    (
        "bad_device",
        "[stage.a]\nkind = \"const\"\nvalue = 1\ndevice = \"gpu\"\n",
        4,
        10,
        "`device` must be",
    ),
    (
        "bad_expect_text",
        "[stage.a]\nkind = \"const\"\nvalue = 1\nexpect = { value = \"about 3\" }\n",
        4,
        20,
        "cannot read expectation \"about 3\"",
    ),
    (
        "bad_expect_type",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[expect]\n\"a.value\" = 3\n",
        6,
        13,
        "an expectation must be a string",
    ),
    (
        "expect_unknown_stage",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[expect]\n\"b.value\" = \"> 1\"\n",
        6,
        13,
        "expectation names unknown stage `b`",
    ),
    (
        "expect_compares_with_unknown_stage",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[expect]\n\"a.value\" = \"> nope.value\"\n",
        6,
        13,
        "expectation names unknown stage `nope`",
    ),
    (
        "expect_bad_tolerance",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[expect]\n\"a.value\" = \"1 +- x\"\n",
        6,
        13,
        "\"x\" is not a number",
    ),
    (
        "expect_bad_path",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[expect]\n\"a..value\" = \"> 1\"\n",
        6,
        1,
        "is not a result path",
    ),
    (
        "stage_not_table",
        "[stage]\na = 1\n",
        2,
        5,
        "stage `a` must be a table",
    ),
    (
        "bad_stage_name",
        "[stage.\"my stage\"]\nkind = \"const\"\nvalue = 1\n",
        1,
        8,
        "not a plain identifier",
    ),
    (
        "missing_include",
        "[experiment]\ninclude = \"nowhere.toml\"\n",
        2,
        11,
        "cannot read experiment file",
    ),
    (
        "include_type",
        "[experiment]\ninclude = 3\n",
        2,
        11,
        "`include` must be a file path",
    ),
    (
        "include_loop",
        "[experiment]\ninclude = \"include_loop.toml\"\n",
        2,
        11,
        "include loop",
    ),
    (
        "check_fails",
        "[stage.a]\nkind = \"const\"\nvalue = 1\nscale = 0\n",
        4,
        9,
        "`scale` must not be 0",
    ),
    (
        "name_type",
        "[experiment]\nname = 3\n",
        2,
        8,
        "expected a string",
    ),
    (
        "check_fails_in_a_sweep",
        "[stage.a]\nkind = \"const\"\nvalue = 1\nscale = [1.0, 0.0]\nfor_each = \"scale\"\n",
        4,
        15,
        "`scale` must not be 0",
    ),
    (
        "name_escapes",
        "[experiment]\nname = \"../../escaped\"\n\n[stage.a]\nkind = \"const\"\nvalue = 1\n",
        2,
        8,
        "experiment name `../../escaped` contains `/`",
    ),
    (
        "name_absolute",
        "[experiment]\nname = \"/tmp/elsewhere\"\n\n[stage.a]\nkind = \"const\"\nvalue = 1\n",
        2,
        8,
        "contains `/`",
    ),
    (
        "name_empty",
        "[experiment]\nname = \"\"\n\n[stage.a]\nkind = \"const\"\nvalue = 1\n",
        2,
        8,
        "experiment name `` is empty",
    ),
    (
        "name_dot",
        "[experiment]\nname = \"..\"\n\n[stage.a]\nkind = \"const\"\nvalue = 1\n",
        2,
        8,
        "starts with `.`",
    ),
];

/// Checks the shape of one error message; returns what is wrong, if anything.
fn problems(file: &str, line: usize, col: usize, says: &str, err: &str) -> Vec<String> {
    let mut p = Vec::new();
    let lines = err.lines().count();
    if lines >= 25 {
        p.push(format!("{lines} lines"));
    }
    if !err.contains(&format!("{file}:{line}:{col}\n")) {
        p.push(format!("no `--> {file}:{line}:{col}`"));
    }
    if !err.lines().any(|l| l.contains("--> ")) {
        p.push("no `-->` line".into());
    }
    if !err
        .lines()
        .any(|l| l.trim_start().starts_with('|') && l.contains('^'))
    {
        p.push("no caret".into());
    }
    if !err.contains(says) {
        p.push(format!("does not say `{says}`"));
    }
    p
}

#[test]
fn every_malformed_file_gets_a_short_positioned_error() {
    let b = Bench::new();
    let mut failures = Vec::new();
    for &(name, text, line, col, says) in CASES {
        let file = format!("{name}.toml");
        let path = b.write(&file, text);
        let err = match catch_unwind(AssertUnwindSafe(|| probex_engine::load(&path, &b.registry))) {
            Err(_) => {
                failures.push(format!("{name}: PANICKED"));
                continue;
            }
            Ok(Ok(_)) => {
                failures.push(format!("{name}: loaded without error"));
                continue;
            }
            Ok(Err(d)) => d.to_string(),
        };
        let p = problems(&file, line, col, says, &err);
        if !p.is_empty() {
            failures.push(format!("{name}: {}\n{err}", p.join("; ")));
        }
    }
    assert!(CASES.len() >= 15);
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn messages_read_well() {
    let b = Bench::new();
    let load = |name: &str| {
        let (_, text, ..) = CASES.iter().find(|c| c.0 == name).unwrap();
        let path = b.write(&format!("{name}.toml"), text);
        b.load_err(&path)
    };
    // The caret sits under the whole offending token, with a label.
    let e = load("unknown_kind");
    assert!(
        e.contains("2 | kind = \"constant\"\n  |        ^^^^^^^^^^ no such kind"),
        "{e}"
    );
    assert!(e.contains("known kinds: add, bsweep, const"), "{e}");
    // One error for a wrong input type, and no hint to feed a stage from itself.
    let e = load("wrong_input_type");
    assert_eq!(e.matches("error:").count(), 1, "{e}");
    assert!(
        e.contains("`a` produces `num`") && e.contains("double reads: `layer`"),
        "{e}"
    );
    let e = load("missing_input");
    assert!(!e.contains("(here: `b`)"), "{e}");
    // A misspelt engine key is named as such, with the kind's own params.
    let e = load("engine_key_typo");
    assert!(
        e.contains("expected one of `value`, `scale`, `extra`, `seed`"),
        "{e}"
    );
    assert!(
        e.contains("stage keys read by the engine: `kind`, `from`, `for_each`"),
        "{e}"
    );
    let e = load("cycle");
    assert_eq!(e.matches("error:").count(), 1, "{e}");
}

#[test]
fn a_for_each_over_nothing_is_a_planning_error() {
    let b = Bench::new();
    for (name, text) in [
        (
            "unswept",
            "[stage.c]\nkind = \"const\"\nvalue = 1\nfor_each = \"seed\"\n",
        ),
        (
            "scalar",
            "[stage.c]\nkind = \"const\"\nvalue = 1\nseed = 3\nfor_each = \"seed\"\n",
        ),
    ] {
        let file = format!("{name}.toml");
        let err = b.plan_err(&b.write(&file, text));
        let p = problems(
            &file,
            1,
            8,
            "neither its inputs nor its own params sweep over `seed`",
            &err,
        );
        assert!(p.is_empty(), "{p:?}\n{err}");
    }
}

#[test]
fn errors_in_included_files_point_into_them() {
    let b = Bench::new();
    b.write(
        "base.toml",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n\n[stage.b]\nkind = \"add\"\nfrom = \"a\"\nofset = 2\n",
    );
    let top = b.write("top.toml", "[experiment]\ninclude = \"base.toml\"\n");
    let err = b.load_err(&top);
    assert!(
        problems("base.toml", 8, 1, "unknown field `ofset`", &err).is_empty(),
        "{err}"
    );

    // An override of the wrong type points at the overriding file.
    b.write("good_base.toml", "[stage.a]\nkind = \"const\"\nvalue = 1\n");
    let over = b.write(
        "over.toml",
        "[experiment]\ninclude = \"good_base.toml\"\n\n[stage.a]\nvalue = \"two\"\n",
    );
    let err = b.load_err(&over);
    assert!(
        problems("over.toml", 5, 9, "expected f64", &err).is_empty(),
        "{err}"
    );

    // A syntax error in an included file.
    b.write("broken.toml", "[stage.a]\nkind = \"const\"\nvalue = [1, \n");
    let top = b.write("top2.toml", "[experiment]\ninclude = \"broken.toml\"\n");
    let err = b.load_err(&top);
    assert!(err.contains("broken.toml:"), "{err}");
}

/// Every prefix of a valid file either loads or gives a positioned error; none panics.
#[test]
fn truncated_files_never_panic() {
    let b = Bench::new();
    let text = r#"[experiment]
name = "t"

[stage.c]
kind = "const"
value = 1.5
seed = [1, 2]
for_each = "seed"
extra = { a = 1.0 }

[stage.s]
kind = "sweep"
from = "c"
layers = "0..3"
expect = { value = ">= 0" }

[stage.g]
kind = "gather"
from = "s"

[expect]
"g.count" = "6 +- 0"
"#;
    let mut loaded = 0;
    for end in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
        let path = b.write("t.toml", &text[..end]);
        match catch_unwind(AssertUnwindSafe(|| probex_engine::load(&path, &b.registry))) {
            Err(_) => panic!("panicked on the first {end} bytes"),
            Ok(Ok(_)) => loaded += 1,
            Ok(Err(d)) => {
                let s = d.to_string();
                assert!(s.lines().count() < 25, "{s}");
                assert!(
                    d.0.iter().all(|d| d.location.is_some()),
                    "error without a position for the first {end} bytes:\n{s}"
                );
            }
        }
    }
    assert!(loaded > 0);
}

/// Files with nothing to run, and file names that cannot name a run folder, are errors that
/// name the file (there is no line to point at).
#[test]
fn empty_files_and_unusable_file_names_are_errors() {
    let b = Bench::new();
    for (file, text) in [
        ("empty.toml", ""),
        ("comments.toml", "# nothing yet\n"),
        ("header_only.toml", "[experiment]\nname = \"x\"\n"),
    ] {
        let path = b.write(file, text);
        let err = b.load_err(&path);
        assert!(err.contains("declares no stages"), "{err}");
        assert!(err.contains(&format!("--> {}", path.display())), "{err}");
        assert!(err.contains("[stage.NAME]"), "{err}");
    }
    let path = b.write(
        "my experiment.toml",
        "[stage.a]\nkind = \"const\"\nvalue = 1\n",
    );
    let err = b.load_err(&path);
    assert!(
        err.contains("the experiment has no name, and its file name `my experiment` contains ` `"),
        "{err}"
    );
    assert!(err.contains("[experiment] name = "), "{err}");
    // A good name in the file wins over an unusable file name.
    b.write(
        "my experiment.toml",
        "[experiment]\nname = \"mine\"\n\n[stage.a]\nkind = \"const\"\nvalue = 1\n",
    );
    assert_eq!(b.load(&path).name, "mine");
}

//! The crate layout the README's "Layout" section promises, read from each crate's Cargo.toml:
//! the engine knows no ML, the Burn line holds, the Burn crates build beside each other, and the
//! Hub client stays out of `stages` (an edit to it would rebuild the crate that instantiates the
//! probe models again). A dependency added across a line fails here, not in a build timing.

use std::collections::BTreeSet;
use std::path::Path;

/// The names in `[dependencies]` of the crate in `dir` (dev-dependencies are free to cross).
fn dependencies(dir: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(dir)
        .join("Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let manifest: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default()
}

/// Fails naming every dependency of `dir` in `forbidden`.
fn assert_none(dir: &str, forbidden: &[&str], why: &str) {
    let deps = dependencies(dir);
    let crossing: Vec<&&str> = forbidden.iter().filter(|f| deps.contains(**f)).collect();
    assert!(crossing.is_empty(), "{dir} depends on {crossing:?}: {why}");
}

const BURN: &[&str] = &["burn", "burn-flex", "burn-autodiff", "burn-cuda", "cubecl"];
const HTTP: &[&str] = &["reqwest", "hf-hub", "tokio", "parquet"];

#[test]
fn the_engine_and_the_cache_know_no_ml() {
    let ours = [
        "probex-weights",
        "probex-fetch",
        "probex-hub",
        "probex-nn",
        "probex-kernels",
        "probex-probes",
        "probex-text",
        "probex-zoo",
        "probex-stages",
    ];
    for dir in ["engine", "cache"] {
        assert_none(dir, &ours, "the engine runs stage kinds it does not know");
        assert_none(dir, BURN, "the engine knows no ML");
    }
}

#[test]
fn weights_fetch_and_kernels_stay_below_the_burn_line() {
    for dir in ["weights", "fetch", "hub", "kernels"] {
        assert_none(dir, BURN, "Burn-free by design (fuzzing, build times)");
    }
}

#[test]
fn the_hub_client_stays_out_of_the_stage_kinds() {
    assert_none(
        "stages",
        &[&["probex-hub"][..], HTTP].concat(),
        "stages sees the Hub through fetch's HubClient; the binary passes probex_hub::connect",
    );
    assert_none(
        "fetch",
        &[&["probex-hub"][..], HTTP].concat(),
        "the client and its HTTP stack live in probex-hub",
    );
    assert!(dependencies(".").contains("probex-hub"));
}

#[test]
fn the_burn_crates_build_beside_each_other() {
    let above = ["probex-stages", "probex-fetch", "probex-hub"];
    assert_none(
        "probes",
        &[&above[..], &["probex-text", "probex-zoo"]].concat(),
        "one job each",
    );
    assert_none(
        "text",
        &[&above[..], &["probex-probes", "probex-zoo"]].concat(),
        "one job each",
    );
    assert_none(
        "zoo",
        &[&above[..], &["probex-probes"]].concat(),
        "zoo uses text, nothing else",
    );
    assert_none(
        "nn",
        &[&above[..], &["probex-probes", "probex-text", "probex-zoo"]].concat(),
        "nn is below the Burn crates",
    );
}

/// The check sees a real crossing: the client's crate does depend on the HTTP stack.
#[test]
#[should_panic(expected = "hub depends on [\"reqwest\", \"hf-hub\", \"parquet\"]")]
fn a_dependency_across_a_line_is_caught() {
    assert_none("hub", HTTP, "the check itself");
}

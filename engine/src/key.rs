//! Keys: a node's key is a pure function of what it computes from.
//!
//! `key = blake3(canonical JSON of {kind, version, params, identity, inputs})`, where params are
//! the kind's parsed parameters with defaults filled in (so formatting, key order, comments and
//! spelled-out defaults do not matter), identity is what a source stage read, and inputs are the
//! keys of the upstream nodes. Settings that do not change the result (device, threads,
//! progress) are not part of it.

use probex_cache::Key;
use serde::Serialize;
use serde_json::{Map, Value};

/// Everything a key is made of, kept so `plan` can say what changed.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct KeyMaterial {
    /// Stage kind name.
    pub kind: String,
    /// Stage kind version.
    pub version: u32,
    /// Canonical params.
    pub params: Value,
    /// Source identity, for source stages.
    pub identity: Option<String>,
    /// Upstream keys per input slot, in `from` order: (slot type, [(node name, key)]).
    pub inputs: Vec<(String, Vec<(String, String)>)>,
}

impl KeyMaterial {
    /// The key. Upstream node *names* are left out: renaming a stage does not rerun it.
    pub fn key(&self) -> Key {
        let inputs: Vec<(String, Vec<&String>)> = self
            .inputs
            .iter()
            .map(|(slot, nodes)| (slot.clone(), nodes.iter().map(|(_, k)| k).collect()))
            .collect();
        let doc = serde_json::json!({
            "kind": self.kind,
            "version": self.version,
            "params": self.params,
            "identity": self.identity,
            "inputs": inputs,
        });
        let bytes = serde_json::to_vec(&canonical(doc)).unwrap_or_default();
        Key::parse(blake3::hash(&bytes).to_hex().as_str()).expect("blake3 hex is a valid key")
    }
}

/// Returns `v` with every object's keys sorted, so equal values encode to equal bytes.
pub fn canonical(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = Map::new();
            for (k, v) in entries {
                out.insert(k, canonical(v));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// The params that differ between two canonical encodings, as `path: old -> new` lines.
pub fn param_changes(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff("", old, new, &mut out);
    out
}

fn diff(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(&p, x, y, out),
                    (Some(x), None) => out.push(format!("{p}: {x} -> (removed)")),
                    (None, Some(y)) => out.push(format!("{p}: (new) -> {y}")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!(
            "{}: {a} -> {b}",
            if path.is_empty() { "params" } else { path }
        )),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn material(params: Value) -> KeyMaterial {
        KeyMaterial {
            kind: "k".into(),
            version: 1,
            params,
            identity: None,
            inputs: vec![("layer".into(), vec![("a".into(), "00".repeat(32))])],
        }
    }

    #[test]
    fn key_ignores_object_key_order_but_not_values() {
        let a = material(canonical(json!({"x": 1, "y": [1, 2]})));
        let b = material(canonical(json!({"y": [1, 2], "x": 1})));
        let c = material(canonical(json!({"y": [2, 1], "x": 1})));
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
    }

    #[test]
    fn key_ignores_upstream_names_but_not_upstream_keys() {
        let a = material(json!({}));
        let mut b = a.clone();
        b.inputs[0].1[0].0 = "renamed".into();
        assert_eq!(a.key(), b.key());
        b.inputs[0].1[0].1 = "11".repeat(32);
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn changes_name_the_param_path() {
        let c = param_changes(
            &json!({"lr": 0.001, "opt": {"b": 1}}),
            &json!({"lr": 0.002, "opt": {"b": 1}}),
        );
        assert_eq!(c, vec!["lr: 0.001 -> 0.002"]);
    }
}

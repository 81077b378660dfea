//! What `probex kinds KIND` says about a kind's params, generated from the definitions the
//! engine validates them with: the names are the fields the kind's `Params` type accepts
//! (read from its `Deserialize` impl), the defaults are what that impl fills in for a table
//! holding only the required params, and the one-line docs come from [`Stage::params_doc`],
//! which a test holds to the same names. Help and validation therefore cannot drift apart.
//!
//! [`Stage::params_doc`]: crate::Stage::params_doc

use std::fmt::Write as _;

use serde::Serialize;
use serde::de::{self, DeserializeOwned, Visitor};
use serde_json::Value;

/// Keys of a stage table that the engine reads itself, with what each means (`probex kinds
/// KIND` lists them beside the kind's params); all other keys are the kind's params.
pub const ENGINE_KEYS: [(&str, &str); 6] = [
    ("kind", "the stage kind (`probex kinds` lists them)"),
    (
        "from",
        "the stage(s) whose artifacts this one reads: a name or a list of names",
    ),
    (
        "for_each",
        "params of this table holding arrays to sweep: one node per value (or combination)",
    ),
    (
        "device",
        "where the stage computes (cpu, cuda, cuda:N); not part of the key",
    ),
    (
        "threads",
        "CPU threads of each node [default: CPUs / jobs]; not part of the key",
    ),
    (
        "expect",
        "expectations on this stage's results (`{ path = \"rule\" }`); a miss fails the run",
    ),
];

/// Whether `key` of a stage table is read by the engine rather than the kind.
pub(crate) fn is_engine_key(key: &str) -> bool {
    ENGINE_KEYS.iter().any(|(k, _)| *k == key)
}

/// The names of [`ENGINE_KEYS`].
pub(crate) fn engine_keys() -> Vec<&'static str> {
    ENGINE_KEYS.iter().map(|(k, _)| *k).collect()
}

/// What `probex kinds KIND` shows of one kind.
#[derive(Clone, Debug, Serialize)]
pub struct KindHelp {
    /// The `kind = "..."` name.
    pub kind: &'static str,
    /// Its one-line description.
    pub about: &'static str,
    /// Its version (bumping it invalidates its cached artifacts).
    pub version: u32,
    /// The artifact type it produces.
    pub output: &'static str,
    /// The inputs it reads.
    pub inputs: Vec<InputHelp>,
    /// The params that cannot be left out, as TOML with example values (what the defaults
    /// shown were computed around).
    pub example: &'static str,
    /// Every param, in declaration order.
    pub params: Vec<ParamHelp>,
}

/// One input slot of a kind, for `probex kinds KIND`.
#[derive(Clone, Debug, Serialize)]
pub struct InputHelp {
    /// The artifact type read.
    pub ty: &'static str,
    /// Whether `from` must name one.
    pub required: bool,
    /// Whether `from` may name several.
    pub many: bool,
    /// Whether a fanned-out upstream is read whole by one node.
    pub gather: bool,
}

/// Documentation a kind gives of its params (see [`crate::Stage::params_doc`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ParamsDoc {
    /// TOML of the params a stage of this kind cannot do without, with example values
    /// (`model = "probex"`); the defaults shown are those filled in around it. Empty when
    /// every param has a default.
    pub example: &'static str,
    /// One line per param: (name, what it means and why one would set it).
    pub params: &'static [(&'static str, &'static str)],
}

/// Why a kind's params help cannot be made: a mistake in the kind's [`ParamsDoc`], not in
/// anything a user wrote.
#[derive(Debug, thiserror::Error)]
pub enum HelpError {
    /// The example is not TOML.
    #[error("the kind's params example is not TOML: {0}")]
    Example(toml::de::Error),
    /// The example (or its required keys alone) does not parse as the kind's params.
    #[error("the kind's params example is not valid params: {0}")]
    Invalid(toml::de::Error),
    /// The filled-in params cannot be encoded to show their defaults.
    #[error("the kind's default params cannot be encoded: {0}")]
    Encode(serde_json::Error),
}

/// One param as `probex kinds KIND` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParamHelp {
    /// The key in the stage's table.
    pub name: String,
    /// Whether a stage must set it.
    pub required: bool,
    /// Its default (or, when required, the example's value) as TOML-ish text; `None` when it
    /// is unset by default.
    pub default: Option<String>,
    /// What it means (empty when the kind does not document it).
    pub doc: String,
}

/// The field names `P`'s `Deserialize` accepts, read by asking it to deserialize from a
/// deserializer that only records the names it is offered; `None` for a type that is not a
/// plain struct (a flattened or map-like `Params`).
pub fn field_names<P: DeserializeOwned>() -> Option<Vec<&'static str>> {
    let mut fields = None;
    let _ = P::deserialize(Fields(&mut fields));
    fields.map(|f: &'static [&'static str]| f.to_vec())
}

/// A deserializer that records the fields of the struct asked of it, then fails.
struct Fields<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> de::Deserializer<'de> for Fields<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// The params of a kind for `probex kinds KIND`: every field of `P` except the keys the
/// engine reads itself (`engine_keys`), in declaration order, with defaults and docs.
pub fn help<P: DeserializeOwned + Serialize>(
    doc: &ParamsDoc,
    engine_keys: &[&str],
) -> Result<Vec<ParamHelp>, HelpError> {
    let names = field_names::<P>().unwrap_or_default();
    let example: toml::Table = toml::from_str(doc.example).map_err(HelpError::Example)?;
    let parses = |t: &toml::Table| toml::Value::Table(t.clone()).try_into::<P>();
    parses(&example).map_err(HelpError::Invalid)?;
    // A key of the example is required when the params do not parse without it.
    let required: Vec<&String> = example
        .keys()
        .filter(|k| {
            let mut without = example.clone();
            without.remove(k.as_str());
            parses(&without).is_err()
        })
        .collect();
    let mut minimal = toml::Table::new();
    for k in &required {
        minimal.insert((*k).clone(), example[k.as_str()].clone());
    }
    let filled = parses(&minimal).map_err(HelpError::Invalid)?;
    let defaults = serde_json::to_value(&filled).map_err(HelpError::Encode)?;
    Ok(names
        .into_iter()
        .filter(|n| !engine_keys.contains(n))
        .map(|name| {
            let required = required.iter().any(|k| k.as_str() == name);
            let default = if required {
                example.get(name).map(|v| v.to_string())
            } else {
                defaults.get(name).filter(|v| !v.is_null()).map(show_json)
            };
            ParamHelp {
                name: name.to_string(),
                required,
                default,
                doc: doc
                    .params
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or_else(String::new, |(_, d)| d.to_string()),
            }
        })
        .collect())
}

/// A default as a user would write it in TOML: strings quoted, arrays and tables inline.
fn show_json(v: &Value) -> String {
    match toml::Value::try_from(v) {
        Ok(t) => t.to_string(),
        Err(_) => v.to_string(),
    }
}

/// `probex kinds KIND` as text: what the kind makes and reads, each param with its default and
/// meaning, then the keys every stage takes.
pub fn render(h: &KindHelp) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} (version {}): {}", h.kind, h.version, h.about);
    let _ = writeln!(out, "produces: {}", h.output);
    if !h.inputs.is_empty() {
        let inputs: Vec<String> = h
            .inputs
            .iter()
            .map(|i| {
                let mut how = vec![if i.required { "required" } else { "optional" }];
                if i.many {
                    how.push("several");
                }
                if i.gather {
                    how.push("whole fan-out");
                }
                format!("{} ({})", i.ty, how.join(", "))
            })
            .collect();
        let _ = writeln!(out, "reads:    {}", inputs.join(", "));
    }
    let example = h.example.trim();
    if example.is_empty() {
        let _ = writeln!(out, "\nparams:");
    } else {
        let _ = writeln!(
            out,
            "\nparams (defaults shown for: {}):",
            example
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    for p in &h.params {
        let value = match (&p.default, p.required) {
            (Some(v), true) => format!(" (required; e.g. {v})"),
            (None, true) => " (required)".to_string(),
            (Some(v), false) => format!(" = {v}"),
            (None, false) => " (unset by default)".to_string(),
        };
        let _ = writeln!(out, "  {}{value}", p.name);
        if !p.doc.is_empty() {
            let _ = writeln!(out, "      {}", p.doc);
        }
    }
    let _ = writeln!(out, "\nkeys every stage takes:");
    for (k, doc) in ENGINE_KEYS {
        let _ = writeln!(out, "  {k}\n      {doc}");
    }
    out
}

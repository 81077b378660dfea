//! Planning: declared stages -> nodes with keys.
//!
//! Each declared stage becomes one node per element of its fan-out. A node's coordinates
//! (`layer=59`, `seed=1`) come from three places: inputs that fan out (read element by
//! element, joined on shared coordinates), the stage's own `for_each` sweeps over arrays in its
//! table, and sweeps the kind makes itself (`extract` over layers). A slot marked `gather`
//! reads a whole fan-out in one node, grouped by the stage's `for_each` coordinates.
//!
//! A kind may need its inputs to exist before it knows its fan-out (`layers = "all"`); such a
//! stage stays pending until they do, and the runner plans again as nodes finish.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use probex_cache::{Entry, Key, Store};
use serde::Serialize;
use serde_json::Value;

use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::experiment::{Experiment, StageDecl, Variant, fmt_coords};
use crate::key::KeyMaterial;
use crate::stage::{Artifact, Coords, Inputs, ParamBox, PlanContext, Resource, Sweep};

/// One unit of work: a stage at one point of its fan-out.
#[derive(Clone, Debug)]
pub struct Node {
    /// Index in [`Plan::nodes`].
    pub id: usize,
    /// Index of the declared stage in [`Experiment::stages`].
    pub stage: usize,
    /// `stage` or `stage[dim=value,...]`.
    pub name: String,
    /// Position in the fan-out.
    pub coords: Coords,
    /// The node's params.
    pub params: ParamBox,
    /// Upstream node ids per input slot type.
    pub inputs: Vec<(&'static str, Vec<usize>)>,
    /// What the key is made of.
    pub material: KeyMaterial,
    /// The key.
    pub key: Key,
    /// The device it runs on, if one was asked for.
    pub device: Option<String>,
    /// The shared device it occupies.
    pub resource: Resource,
}

/// A declared stage that cannot be expanded yet.
#[derive(Clone, Debug, Serialize)]
pub struct Pending {
    /// The stage's name.
    pub stage: String,
    /// Upstream stages whose outputs it waits for.
    pub waits_for: Vec<String>,
    /// Why the stage's own sources could not be identified (a Hub that cannot be reached
    /// while only planning); `None` when it merely waits.
    pub unresolved: Option<String>,
}

/// What expanding one stage gave.
enum Expanded {
    /// Its nodes.
    Nodes(Vec<usize>),
    /// Its fan-out needs inputs that do not exist yet.
    Waiting,
    /// A source identity could not be read (only when [`Overrides::unresolved_ok`]).
    Unresolved(String),
}

/// Every node that can be known now, and the stages that must wait.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Nodes in a topological order.
    pub nodes: Vec<Node>,
    /// Stages whose fan-out depends on outputs that do not exist yet.
    pub pending: Vec<Pending>,
}

/// Settings that apply to a whole run and are not part of keys.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--device`: replaces every stage's `device`.
    pub device: Option<String>,
    /// The GPUs nodes asking for plain `cuda` spread over (`--devices`, `PROBEX_DEVICES`, ...).
    pub gpus: crate::gpus::Gpus,
    /// Planning only (`probex plan`): a source whose identity cannot be read now (say, the Hub
    /// is out of reach) leaves its stage and everything downstream pending with the reason,
    /// instead of failing the plan. A run always fails: a key needs the identity.
    pub unresolved_ok: bool,
}

/// Expands experiments into plans against a cache, remembering source identities so that
/// planning again during a run does not re-read sources.
pub struct Planner<'a> {
    exp: &'a Experiment,
    store: &'a Store,
    cx: PlanContext<'a>,
    overrides: Overrides,
    identities: Mutex<HashMap<(usize, String), Option<String>>>,
}

struct Binding {
    coords: Coords,
    inputs: BTreeMap<&'static str, Vec<usize>>,
}

impl<'a> Planner<'a> {
    /// A planner for `exp` over `store`.
    pub fn new(
        exp: &'a Experiment,
        store: &'a Store,
        cx: PlanContext<'a>,
        overrides: Overrides,
    ) -> Self {
        Planner {
            exp,
            store,
            cx,
            overrides,
            identities: Mutex::new(HashMap::new()),
        }
    }

    /// The experiment being planned.
    pub fn experiment(&self) -> &Experiment {
        self.exp
    }

    /// The store entries are looked up in.
    pub fn store(&self) -> &Store {
        self.store
    }

    /// Expands every stage that can be expanded now.
    pub fn plan(&self) -> Result<Plan, Diagnostics> {
        let mut plan = Plan::default();
        let mut by_stage: Vec<Option<Vec<usize>>> = vec![None; self.exp.stages.len()];
        let index: BTreeMap<&str, usize> = self
            .exp
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut errors = Vec::new();

        for (si, decl) in self.exp.stages.iter().enumerate() {
            let waiting: Vec<String> = decl
                .upstream()
                .filter(|u| index.get(u).is_none_or(|&j| by_stage[j].is_none()))
                .map(String::from)
                .collect();
            if !waiting.is_empty() {
                plan.pending.push(Pending {
                    stage: decl.name.clone(),
                    waits_for: waiting,
                    unresolved: None,
                });
                continue;
            }
            let before = plan.nodes.len();
            match self.expand(si, decl, &index, &by_stage, &mut plan) {
                Ok(Expanded::Nodes(ids)) => by_stage[si] = Some(ids),
                Ok(waiting @ (Expanded::Waiting | Expanded::Unresolved(_))) => {
                    // A stage is expanded whole or not at all: drop the nodes of the
                    // combinations whose inputs did exist.
                    plan.nodes.truncate(before);
                    let waits_for = decl.upstream().map(String::from).collect();
                    plan.pending.push(Pending {
                        stage: decl.name.clone(),
                        waits_for,
                        unresolved: match waiting {
                            Expanded::Unresolved(why) => Some(why),
                            _ => None,
                        },
                    });
                }
                Err(d) => {
                    errors.push(d);
                }
            }
        }
        if errors.is_empty() {
            Ok(plan)
        } else {
            Err(Diagnostics(errors))
        }
    }

    /// Expands one stage into its nodes, or says why it cannot be yet.
    fn expand(
        &self,
        si: usize,
        decl: &StageDecl,
        index: &BTreeMap<&str, usize>,
        by_stage: &[Option<Vec<usize>>],
        plan: &mut Plan,
    ) -> Result<Expanded, Diagnostic> {
        let err = |m: String| Diagnostic::at(&self.exp.sources, &decl.span, m);
        let ups = |name: &str| -> &[usize] {
            index
                .get(name)
                .and_then(|&j| by_stage[j].as_deref())
                .unwrap_or(&[])
        };
        let bindings = bindings(decl, &ups, plan);
        let device = self
            .overrides
            .device
            .clone()
            .or_else(|| decl.device.clone());
        let mut ids = Vec::new();
        for b in &bindings {
            for v in &decl.variants {
                let mut coords = b.coords.clone();
                coords.extend(v.coords.iter().cloned());
                let inputs: Vec<(&'static str, Vec<usize>)> = decl
                    .inputs
                    .iter()
                    .map(|(s, _)| (s.ty, b.inputs.get(s.ty).cloned().unwrap_or_default()))
                    .collect();
                let Some(nodes) = self.swept(decl, v, coords, &inputs, plan)? else {
                    return Ok(Expanded::Waiting);
                };
                for (coords, params) in nodes {
                    match self.add_node(
                        si,
                        decl,
                        coords,
                        params,
                        inputs.clone(),
                        device.clone(),
                        plan,
                    )? {
                        Ok(id) => ids.push(id),
                        Err(why) => return Ok(Expanded::Unresolved(why)),
                    }
                }
            }
        }
        for dim in &decl.for_each {
            let carried = ids
                .iter()
                .all(|&i| plan.nodes[i].coords.iter().any(|(d, _)| d == dim));
            if !carried || ids.is_empty() {
                return Err(err(format!(
                    "stage `{}` has `for_each = \"{dim}\"` but neither its inputs nor its own params sweep over `{dim}`",
                    decl.name
                ))
                .with_help(format!("give `{dim}` a list of values in this stage, or read from a stage that fans out over `{dim}`")));
            }
        }
        Ok(Expanded::Nodes(ids))
    }

    /// The nodes of one binding and variant at `coords`: one, or what the kind's sweep makes
    /// (a layer sweep resolved against its inputs); `None` while those inputs are not made.
    fn swept(
        &self,
        decl: &StageDecl,
        v: &Variant,
        coords: Coords,
        inputs: &[(&'static str, Vec<usize>)],
        plan: &Plan,
    ) -> Result<Option<Vec<(Coords, ParamBox)>>, Diagnostic> {
        let err = |m: String| Diagnostic::at(&self.exp.sources, &decl.span, m);
        let kind_err = |e: anyhow::Error| {
            err(format!(
                "stage `{}`: {}",
                decl.name,
                crate::stage::error_text(&e)
            ))
        };
        let sweep = match decl.stage.sweep(&v.params, None).map_err(kind_err)? {
            Sweep::NeedsInputs => match self.materialised(plan, inputs) {
                Some(artifacts) => decl
                    .stage
                    .sweep(&v.params, Some(&artifacts))
                    .map_err(kind_err)?,
                None => return Ok(None),
            },
            s => s,
        };
        Ok(Some(match sweep {
            Sweep::One | Sweep::NeedsInputs => vec![(coords, v.params.clone())],
            Sweep::Many { dim, nodes } => {
                if nodes.is_empty() {
                    return Err(err(format!(
                        "stage `{}` selects nothing to sweep over `{dim}`",
                        decl.name
                    )));
                }
                nodes
                    .into_iter()
                    .map(|(label, p)| {
                        let mut c = coords.clone();
                        c.push((dim.to_string(), label));
                        (c, p)
                    })
                    .collect()
            }
            Sweep::Grid { dims, nodes } => {
                if nodes.is_empty() {
                    return Err(err(format!(
                        "stage `{}` selects nothing to sweep over {}",
                        decl.name,
                        dims.join(" x ")
                    )));
                }
                nodes
                    .into_iter()
                    .map(|(values, p)| {
                        let mut c = coords.clone();
                        c.extend(dims.iter().map(|d| d.to_string()).zip(values));
                        (c, p)
                    })
                    .collect()
            }
        }))
    }

    /// Adds one node; `Ok(Err(why))` when its source identity cannot be read and the planner
    /// tolerates that ([`Overrides::unresolved_ok`]).
    #[allow(clippy::too_many_arguments)]
    fn add_node(
        &self,
        si: usize,
        decl: &StageDecl,
        coords: Coords,
        params: ParamBox,
        inputs: Vec<(&'static str, Vec<usize>)>,
        device: Option<String>,
        plan: &mut Plan,
    ) -> Result<Result<usize, String>, Diagnostic> {
        let name = if coords.is_empty() {
            decl.name.clone()
        } else {
            format!("{}{}", decl.name, fmt_coords(&coords))
        };
        let identity = match self.identity(si, decl, &params) {
            Ok(id) => id,
            Err(e) if self.overrides.unresolved_ok => return Ok(Err(crate::stage::error_text(&e))),
            Err(e) => {
                return Err(Diagnostic::at(
                    &self.exp.sources,
                    &decl.span,
                    format!("stage `{name}`: {}", crate::stage::error_text(&e)),
                ));
            }
        };
        let material = KeyMaterial {
            kind: decl.kind.clone(),
            version: decl.version(),
            params: params.canonical().clone(),
            identity,
            inputs: inputs
                .iter()
                .map(|(ty, ids)| {
                    let nodes = ids
                        .iter()
                        .map(|&u| (plan.nodes[u].name.clone(), plan.nodes[u].key.to_string()))
                        .collect();
                    (ty.to_string(), nodes)
                })
                .collect(),
        };
        let key = material.key();
        let resource = decl.stage.resource(&params, device.as_deref());
        let id = plan.nodes.len();
        plan.nodes.push(Node {
            id,
            stage: si,
            name,
            coords,
            params,
            inputs,
            material,
            key,
            device,
            resource,
        });
        Ok(Ok(id))
    }

    fn identity(
        &self,
        si: usize,
        decl: &StageDecl,
        params: &ParamBox,
    ) -> anyhow::Result<Option<String>> {
        let memo_key = (si, params.canonical().to_string());
        if let Ok(memo) = self.identities.lock()
            && let Some(v) = memo.get(&memo_key)
        {
            return Ok(v.clone());
        }
        let id = decl.stage.identity(params, &self.cx)?;
        if let Ok(mut memo) = self.identities.lock() {
            memo.insert(memo_key, id.clone());
        }
        Ok(id)
    }

    /// The inputs as artifacts, if every one of them is in the cache.
    fn materialised(&self, plan: &Plan, inputs: &[(&'static str, Vec<usize>)]) -> Option<Inputs> {
        let mut slots = Vec::new();
        for (ty, ids) in inputs {
            let mut arts = Vec::new();
            for &u in ids {
                let node = &plan.nodes[u];
                let entry = self.store.get(&node.key).ok()??;
                arts.push(artifact(node, &entry));
            }
            slots.push((*ty, arts));
        }
        Some(Inputs::new(slots))
    }

    /// Settings that apply to every node.
    pub fn overrides(&self) -> &Overrides {
        &self.overrides
    }

    /// The context stages are planned with.
    pub fn context(&self) -> &PlanContext<'a> {
        &self.cx
    }
}

/// Merges two coordinate lists; `None` if they disagree on a shared dimension.
fn join(a: &Coords, b: &Coords) -> Option<Coords> {
    let mut out = a.clone();
    for (d, v) in b {
        match a.iter().find(|(da, _)| da == d) {
            Some((_, va)) if va != v => return None,
            Some(_) => {}
            None => out.push((d.clone(), v.clone())),
        }
    }
    Some(out)
}

/// What the engine stores in a manifest's `meta`, around what the stage returned.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct StoredOutcome {
    /// The node's name when it was computed.
    pub node: String,
    /// Its coordinates.
    pub coords: Coords,
    /// Its canonical params.
    pub params: Value,
    /// The stage's `meta`.
    pub meta: Value,
    /// The stage's `results`.
    pub results: Option<Value>,
    /// The stage's `summary`.
    pub summary: Option<String>,
    /// Files to copy into run records.
    pub publish: Vec<String>,
    /// Seconds the stage ran.
    pub seconds: f64,
    /// What the stage warned about ([`crate::RunContext::warn`]): every run that uses the
    /// entry says it again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl StoredOutcome {
    /// Reads the outcome back from an entry (a malformed one reads as empty).
    pub fn of(entry: &Entry) -> StoredOutcome {
        serde_json::from_value(entry.manifest.meta.clone()).unwrap_or(StoredOutcome {
            node: entry.manifest.label.clone(),
            coords: Vec::new(),
            params: Value::Null,
            meta: Value::Null,
            results: None,
            summary: None,
            publish: Vec::new(),
            seconds: 0.0,
            warnings: Vec::new(),
        })
    }
}

/// The artifact of `node` stored in `entry`, as downstream stages see it.
pub fn artifact(node: &Node, entry: &Entry) -> Artifact {
    let stored = StoredOutcome::of(entry);
    Artifact {
        node: node.name.clone(),
        stage: node.name.split('[').next().unwrap_or_default().to_string(),
        key: node.key.clone(),
        dir: entry.dir.clone(),
        coords: node.coords.clone(),
        meta: stored.meta,
        results: stored.results,
    }
}

/// The input bindings of a stage: element-wise inputs joined on their shared coordinates,
/// then each gathered input split by the stage's `for_each` coordinates it carries, taking
/// every compatible element. `ups` gives a named upstream stage's nodes.
fn bindings<'u>(decl: &StageDecl, ups: &dyn Fn(&str) -> &'u [usize], plan: &Plan) -> Vec<Binding> {
    let mut bindings = vec![Binding {
        coords: Vec::new(),
        inputs: BTreeMap::new(),
    }];
    for (slot, names) in decl.inputs.iter().filter(|(s, _)| !s.gather) {
        for name in names {
            let mut next = Vec::new();
            for b in &bindings {
                for &u in ups(name) {
                    if let Some(coords) = join(&b.coords, &plan.nodes[u].coords) {
                        let mut inputs = b.inputs.clone();
                        inputs.entry(slot.ty).or_default().push(u);
                        next.push(Binding { coords, inputs });
                    }
                }
            }
            bindings = next;
        }
    }
    for (slot, names) in decl.inputs.iter().filter(|(s, _)| s.gather) {
        for name in names {
            let elems = ups(name);
            let mut next = Vec::new();
            for b in &bindings {
                let bound: BTreeSet<&str> = b.coords.iter().map(|(d, _)| d.as_str()).collect();
                let mut groups: BTreeMap<Coords, Vec<usize>> = BTreeMap::new();
                for &u in elems {
                    let c = &plan.nodes[u].coords;
                    if join(&b.coords, c).is_none() {
                        continue;
                    }
                    let projected: Coords = c
                        .iter()
                        .filter(|(d, _)| decl.for_each.contains(d) && !bound.contains(d.as_str()))
                        .cloned()
                        .collect();
                    groups.entry(projected).or_default().push(u);
                }
                // Keep the upstream's order of groups (first appearance), not sorted order.
                let mut ordered: Vec<(Coords, Vec<usize>)> = groups.into_iter().collect();
                ordered.sort_by_key(|(_, members)| members.first().copied());
                for (projected, members) in ordered {
                    let mut coords = b.coords.clone();
                    coords.extend(projected);
                    let mut inputs = b.inputs.clone();
                    inputs.entry(slot.ty).or_default().extend(members);
                    next.push(Binding { coords, inputs });
                }
            }
            bindings = next;
        }
    }
    bindings
}

//! Test-only stage kinds, shared by the engine's integration tests and the `testkit` example
//! (which includes this file with `#[path]`).
//!
//! Every kind records each execution in a [`Trace`]: in memory for in-process tests, and, when
//! the trace has a file, as appended lines so that tests driving separate processes can count
//! executions and see when they started and ended.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use probex_engine::{
    InputSlot, Inputs, Outcome, ParamError, Registry, Resource, RunContext, Stage, StageResult,
    Sweep,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One execution of a node by a test kind.
#[derive(Clone, Debug)]
pub struct Event {
    /// The kind that ran.
    pub kind: &'static str,
    /// The node's name (`s[layer=2]`).
    pub node: String,
    /// When the stage code started.
    pub start: Instant,
    /// When it returned.
    pub end: Instant,
    /// How many nodes were handed to the kind in the same call (1 unless batched).
    pub batch: usize,
    /// The device the node was given ([`RunContext::device`]).
    pub device: Option<String>,
    /// For a node of a gang: which call of the kind's `run_gang` computed it (numbered from
    /// 1 per kind instance); `None` for a node run alone.
    pub call: Option<usize>,
}

/// Where test kinds record their executions.
#[derive(Clone, Default)]
pub struct Trace {
    events: Arc<Mutex<Vec<Event>>>,
    file: Option<PathBuf>,
}

impl Trace {
    /// A trace kept in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A trace that also appends `start`/`end` lines to `path` (one `write` per line, with
    /// `O_APPEND`, so concurrent processes do not interleave within a line).
    pub fn to_file(path: PathBuf) -> Self {
        Trace {
            events: Arc::default(),
            file: Some(path),
        }
    }

    fn line(&self, what: &str, kind: &str, node: &str) {
        let Some(path) = &self.file else { return };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let line = format!("{what}\t{kind}\t{node}\t{nanos}\t{}\n", std::process::id());
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }

    fn begin(&self, kind: &'static str, cx: &RunContext) -> Instant {
        self.line("start", kind, cx.node());
        Instant::now()
    }

    fn finish(&self, kind: &'static str, cx: &RunContext, start: Instant, batch: usize) {
        self.finish_in(kind, cx, start, batch, None);
    }

    fn finish_in(
        &self,
        kind: &'static str,
        cx: &RunContext,
        start: Instant,
        batch: usize,
        call: Option<usize>,
    ) {
        self.line("end", kind, cx.node());
        if let Ok(mut ev) = self.events.lock() {
            ev.push(Event {
                kind,
                node: cx.node().to_string(),
                start,
                end: Instant::now(),
                batch,
                device: cx.device().map(str::to_string),
                call,
            });
        }
    }

    /// Every finished execution so far, in the order they finished.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Names of the nodes executed so far, sorted.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.events().into_iter().map(|e| e.node).collect();
        v.sort();
        v
    }

    /// Forgets what was recorded in memory.
    pub fn clear(&self) {
        if let Ok(mut e) = self.events.lock() {
            e.clear();
        }
    }
}

/// A line of a trace file: (`start` or `end`, kind, node, unix nanos, pid).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceLine {
    pub what: String,
    pub kind: String,
    pub node: String,
    pub nanos: u128,
    pub pid: u32,
}

/// Reads a trace file written by [`Trace::to_file`] (missing file: no lines).
pub fn read_trace(path: &Path) -> Vec<TraceLine> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut p = l.split('\t');
            Some(TraceLine {
                what: p.next()?.to_string(),
                kind: p.next()?.to_string(),
                node: p.next()?.to_string(),
                nanos: p.next()?.parse().ok()?,
                pid: p.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// Every test kind, recording into `trace`.
pub fn registry(trace: &Trace) -> Registry {
    let mut r = Registry::new();
    r.register(Const(trace.clone()))
        .register(Add(trace.clone()))
        .register(Sleep(trace.clone()))
        .register(Fail(trace.clone()))
        .register(Sweeper {
            trace: trace.clone(),
            batched: false,
        })
        .register(Sweeper {
            trace: trace.clone(),
            batched: true,
        })
        .register(Double(trace.clone()))
        .register(Gather(trace.clone()))
        .register(SlowWrite(trace.clone()))
        .register(Count(trace.clone()))
        .register(Gang {
            trace: trace.clone(),
            calls: Arc::default(),
        });
    r
}

fn one() -> f64 {
    1.0
}

/// Reads the `value` a numeric artifact wrote (its file, not its meta: stages read files).
fn read_value(dir: &Path, file: &str) -> StageResult<f64> {
    let text = fs::read_to_string(dir.join(file))?;
    let v: Value = serde_json::from_str(&text)?;
    v.get("value")
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow::anyhow!("{file} has no `value`"))
}

fn write_value(cx: &RunContext, file: &str, v: &Value) -> StageResult<()> {
    fs::write(cx.out_dir().join(file), serde_json::to_vec(v)?)?;
    Ok(())
}

fn numeric(value: f64) -> Outcome {
    Outcome {
        meta: json!({ "value": value }),
        results: Some(json!({ "value": value })),
        summary: None,
        publish: vec!["value.json".into()],
        references: Vec::new(),
    }
}

/// A number-valued artifact type read by `add`, `sleep`, `fail`, `gather`.
const NUM: &str = "num";
/// One layer of a sweep.
const LAYER: &str = "layer";

/// An optional list of `num` inputs read element by element.
fn nums() -> InputSlot {
    InputSlot {
        ty: NUM,
        required: false,
        many: true,
        gather: false,
    }
}

// ---------------------------------------------------------------------------------------------

/// `const`: a source producing `value * scale + sum(extra)`.
pub struct Const(pub Trace);

/// Params of `const`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstParams {
    pub value: f64,
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub extra: BTreeMap<String, f64>,
    /// Only there to be swept by `for_each = "seed"`; added to the value.
    #[serde(default)]
    pub seed: Option<i64>,
    /// A warning to give (`RunContext::warn`); absent from the key when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn: Option<String>,
}

impl Stage for Const {
    type Params = ConstParams;
    fn kind(&self) -> &'static str {
        "const"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "a constant number"
    }
    fn output(&self) -> &'static str {
        NUM
    }
    fn inputs(&self) -> Vec<InputSlot> {
        Vec::new()
    }
    fn check(&self, p: &ConstParams) -> Result<(), ParamError> {
        if p.scale == 0.0 {
            return Err(ParamError::at("scale", "`scale` must not be 0"));
        }
        Ok(())
    }
    fn run(&self, p: &ConstParams, _: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let t = self.0.begin("const", cx);
        let v = p.value * p.scale + p.extra.values().sum::<f64>() + p.seed.unwrap_or(0) as f64;
        if let Some(w) = &p.warn {
            cx.warn(w);
        }
        write_value(cx, "value.json", &json!({ "value": v }))?;
        self.0.finish("const", cx, t, 1);
        Ok(numeric(v))
    }
}

// ---------------------------------------------------------------------------------------------

/// `add`: the sum of its `num` inputs plus `offset`.
pub struct Add(pub Trace);

/// Params of `add`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddParams {
    #[serde(default)]
    pub offset: f64,
}

impl Stage for Add {
    type Params = AddParams;
    fn kind(&self) -> &'static str {
        "add"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "sum of its inputs"
    }
    fn output(&self) -> &'static str {
        NUM
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![InputSlot::many(NUM)]
    }
    fn run(&self, p: &AddParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let t = self.0.begin("add", cx);
        let mut v = p.offset;
        for a in inputs.all(NUM) {
            v += read_value(&a.dir, "value.json")?;
        }
        write_value(cx, "value.json", &json!({ "value": v }))?;
        self.0.finish("add", cx, t, 1);
        Ok(numeric(v))
    }
}

// ---------------------------------------------------------------------------------------------

/// `sleep`: waits `ms` (stopping early when cancelled), then yields `value` plus its inputs.
/// With `device = "cuda"` it occupies one of the run's GPUs while it waits (`cuda:N`: that
/// one), as `train` does: the GPU scheduling tests need no GPU.
pub struct Sleep(pub Trace);

/// Params of `sleep`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepParams {
    pub ms: u64,
    #[serde(default)]
    pub value: f64,
}

impl Stage for Sleep {
    type Params = SleepParams;
    fn kind(&self) -> &'static str {
        "sleep"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "waits, then yields a number"
    }
    fn output(&self) -> &'static str {
        NUM
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![nums()]
    }
    fn resource(&self, _p: &SleepParams, device: Option<&str>) -> Resource {
        match device {
            Some("cuda") => Resource::AnyGpu,
            Some(d) if d.starts_with("cuda:") => Resource::Gpu(d.to_string()),
            _ => Resource::Cpu,
        }
    }
    fn run(&self, p: &SleepParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let t = self.0.begin("sleep", cx);
        let deadline = t + Duration::from_millis(p.ms);
        while Instant::now() < deadline {
            cx.check_cancelled()?;
            std::thread::sleep(Duration::from_millis(5).min(deadline - Instant::now()));
        }
        let mut v = p.value;
        for a in inputs.all(NUM) {
            v += read_value(&a.dir, "value.json")?;
        }
        write_value(cx, "value.json", &json!({ "value": v }))?;
        self.0.finish("sleep", cx, t, 1);
        Ok(numeric(v))
    }
}

// ---------------------------------------------------------------------------------------------

/// `fail`: always fails with `message`.
pub struct Fail(pub Trace);

/// Params of `fail`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailParams {
    #[serde(default = "boom")]
    pub message: String,
}

fn boom() -> String {
    "boom".into()
}

impl Stage for Fail {
    type Params = FailParams;
    fn kind(&self) -> &'static str {
        "fail"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "always fails"
    }
    fn output(&self) -> &'static str {
        NUM
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![nums()]
    }
    fn run(&self, p: &FailParams, _: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let t = self.0.begin("fail", cx);
        cx.log("about to fail");
        self.0.finish("fail", cx, t, 1);
        anyhow::bail!("{}", p.message)
    }
}

// ---------------------------------------------------------------------------------------------

/// `sweep` (and `bsweep`, which batches): fans itself out over `layer`. `layers` is a range
/// `START..END`, one layer `N`, or `"all"`: as many layers as the value of its `num` input,
/// known only once that input exists (so the kind answers `Sweep::NeedsInputs`).
pub struct Sweeper {
    pub trace: Trace,
    pub batched: bool,
}

/// Params of `sweep`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepParams {
    pub layers: String,
    #[serde(default)]
    pub base: f64,
}

enum Layers {
    All,
    One(u32),
    Range(u32, u32),
}

fn parse_layers(s: &str) -> Result<Layers, String> {
    let bad =
        || format!("`layers = \"{s}\"`: write \"all\", a layer \"N\" or a range \"START..END\"");
    if s == "all" {
        return Ok(Layers::All);
    }
    if let Some((a, b)) = s.split_once("..") {
        let a: u32 = a.trim().parse().map_err(|_| bad())?;
        let b: u32 = b.trim().parse().map_err(|_| bad())?;
        if a >= b {
            return Err(format!(
                "`layers = \"{s}\"` is an empty range; START must be below END"
            ));
        }
        return Ok(Layers::Range(a, b));
    }
    s.trim().parse().map(Layers::One).map_err(|_| bad())
}

impl Sweeper {
    fn name(&self) -> &'static str {
        if self.batched { "bsweep" } else { "sweep" }
    }

    fn compute(&self, p: &SweepParams, cx: &RunContext, batch: usize) -> StageResult<Outcome> {
        let t = self.trace.begin(self.name(), cx);
        let Ok(Layers::One(layer)) = parse_layers(&p.layers) else {
            anyhow::bail!("node params must name one layer, got `{}`", p.layers);
        };
        let v = p.base + f64::from(layer);
        write_value(cx, "layer.json", &json!({ "layer": layer, "value": v }))?;
        self.trace.finish(self.name(), cx, t, batch);
        Ok(Outcome {
            meta: json!({ "layer": layer, "value": v }),
            results: Some(json!({ "value": v })),
            summary: None,
            publish: Vec::new(),
            references: Vec::new(),
        })
    }
}

impl Stage for Sweeper {
    type Params = SweepParams;
    fn kind(&self) -> &'static str {
        self.name()
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "one node per layer"
    }
    fn output(&self) -> &'static str {
        LAYER
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![InputSlot::optional(NUM)]
    }
    fn check(&self, p: &SweepParams) -> Result<(), ParamError> {
        parse_layers(&p.layers).map_err(|e| ParamError::at("layers", e))?;
        Ok(())
    }
    fn sweep(&self, p: &SweepParams, inputs: Option<&Inputs>) -> StageResult<Sweep<SweepParams>> {
        let range = match parse_layers(&p.layers).map_err(anyhow::Error::msg)? {
            Layers::One(_) => return Ok(Sweep::One),
            Layers::Range(a, b) => a..b,
            Layers::All => {
                let Some(inputs) = inputs else {
                    return Ok(Sweep::NeedsInputs);
                };
                let n = inputs
                    .one(NUM)?
                    .meta
                    .get("value")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| anyhow::anyhow!("the input has no `value`"))?;
                0..n as u32
            }
        };
        Ok(Sweep::Many {
            dim: "layer",
            nodes: range
                .map(|i| {
                    let node = SweepParams {
                        layers: i.to_string(),
                        base: p.base,
                    };
                    (i.to_string(), node)
                })
                .collect(),
        })
    }
    fn batches(&self) -> bool {
        self.batched
    }
    fn run(&self, p: &SweepParams, _: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        self.compute(p, cx, 1)
    }
    fn run_batch(
        &self,
        jobs: &[(&SweepParams, &RunContext)],
        _: &Inputs,
    ) -> Vec<StageResult<Outcome>> {
        jobs.iter()
            .map(|(p, cx)| self.compute(p, cx, jobs.len()))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------

/// `double`: element-wise over a layer sweep, twice each layer's value.
pub struct Double(pub Trace);

/// Params of `double`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoubleParams {}

impl Stage for Double {
    type Params = DoubleParams;
    fn kind(&self) -> &'static str {
        "double"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "twice each layer"
    }
    fn output(&self) -> &'static str {
        LAYER
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![InputSlot::one(LAYER)]
    }
    fn run(&self, _: &DoubleParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let t = self.0.begin("double", cx);
        let a = inputs.one(LAYER)?;
        let v = 2.0 * read_value(&a.dir, "layer.json")?;
        let layer = a.meta.get("layer").cloned().unwrap_or(Value::Null);
        write_value(cx, "layer.json", &json!({ "layer": layer, "value": v }))?;
        self.0.finish("double", cx, t, 1);
        Ok(Outcome {
            meta: json!({ "layer": layer, "value": v }),
            results: Some(json!({ "value": v })),
            summary: None,
            publish: Vec::new(),
            references: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// `gather`: one node reading a whole fan-out (of layers or numbers): their sum, count and
/// the nodes it read, in order.
pub struct Gather(pub Trace);

/// Params of `gather`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatherParams {
    #[serde(default)]
    pub seed: Option<i64>,
}

impl Stage for Gather {
    type Params = GatherParams;
    fn kind(&self) -> &'static str {
        "gather"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "reads a whole fan-out"
    }
    fn output(&self) -> &'static str {
        NUM
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![
            InputSlot {
                ty: LAYER,
                required: false,
                many: true,
                gather: true,
            },
            InputSlot {
                ty: NUM,
                required: false,
                many: true,
                gather: true,
            },
        ]
    }
    fn run(&self, _: &GatherParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let t = self.0.begin("gather", cx);
        let all: Vec<_> = inputs.all(LAYER).iter().chain(inputs.all(NUM)).collect();
        if all.is_empty() {
            anyhow::bail!("nothing to gather");
        }
        let sum: f64 = all
            .iter()
            .filter_map(|a| a.meta.get("value").and_then(Value::as_f64))
            .sum();
        let nodes: Vec<&str> = all.iter().map(|a| a.node.as_str()).collect();
        let out = json!({ "value": sum, "count": all.len(), "nodes": nodes });
        write_value(cx, "value.json", &out)?;
        self.0.finish("gather", cx, t, 1);
        Ok(Outcome {
            meta: out.clone(),
            results: Some(out),
            summary: Some(format!("gathered {} nodes, sum {sum}", all.len())),
            publish: vec!["value.json".into()],
            references: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// `slow_write`: writes `chunks` chunks of 256 KiB into `big.bin`, `chunk_ms` apart, then
/// `files` small files (which make the commit slow: the cache fsyncs each one). Tests kill
/// a run in the middle of either.
pub struct SlowWrite(pub Trace);

/// Params of `slow_write`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowWriteParams {
    pub chunks: u64,
    #[serde(default)]
    pub chunk_ms: u64,
    #[serde(default)]
    pub files: u64,
}

impl Stage for SlowWrite {
    type Params = SlowWriteParams;
    fn kind(&self) -> &'static str {
        "slow_write"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "writes a large file slowly"
    }
    fn output(&self) -> &'static str {
        "blob"
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![nums()]
    }
    fn run(&self, p: &SlowWriteParams, _: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let t = self.0.begin("slow_write", cx);
        let chunk = vec![0xA5u8; 256 * 1024];
        let mut f = fs::File::create(cx.out_dir().join("big.bin"))?;
        for _ in 0..p.chunks {
            cx.check_cancelled()?;
            f.write_all(&chunk)?;
            f.flush()?;
            std::thread::sleep(Duration::from_millis(p.chunk_ms));
        }
        drop(f);
        if p.files > 0 {
            let dir = cx.out_dir().join("many");
            fs::create_dir(&dir)?;
            for i in 0..p.files {
                fs::write(dir.join(format!("f{i:05}.bin")), [i as u8; 4096])?;
            }
        }
        self.0.finish("slow_write", cx, t, 1);
        Ok(Outcome {
            meta: json!({ "bytes": p.chunks * 256 * 1024 }),
            results: None,
            summary: None,
            publish: Vec::new(),
            references: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// `count`: counts to `steps`, `step_ms` apart, keeping the count in its work directory so a
/// later run resumes where an interrupted one stopped (as `train` resumes from a checkpoint).
/// Stopped, it fails with an error of its own rather than the engine's `Cancelled`, as `train`
/// once did: the engine must still see an interrupted node, not a failed one.
pub struct Count(pub Trace);

/// Params of `count`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountParams {
    pub steps: u64,
    #[serde(default)]
    pub step_ms: u64,
}

impl Stage for Count {
    type Params = CountParams;
    fn kind(&self) -> &'static str {
        "count"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "counts slowly, resumable"
    }
    fn output(&self) -> &'static str {
        NUM
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![nums()]
    }
    fn run(&self, p: &CountParams, _: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        let t = self.0.begin("count", cx);
        let state = cx.work_dir()?.join("count");
        let mut i: u64 = fs::read_to_string(&state)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if i > 0 {
            cx.note(format!("resumed from step {i} of {}", p.steps));
        }
        while i < p.steps {
            if cx.is_cancelled() {
                anyhow::bail!("counting stopped after step {i}");
            }
            std::thread::sleep(Duration::from_millis(p.step_ms));
            i += 1;
            fs::write(&state, i.to_string())?;
        }
        write_value(cx, "value.json", &json!({ "value": i as f64 }))?;
        self.0.finish("count", cx, t, 1);
        Ok(numeric(i as f64))
    }
}

// ---------------------------------------------------------------------------------------------

/// `gang`: element-wise over a layer sweep, three times each layer's value, computed in gangs:
/// layers whose number is equal modulo `groups` share a gang key, at most `limit` (0: any
/// number) to a call. Each member counts `steps` steps of `step_ms`, writing its step into its
/// work directory after each (a resume state, as `train` keeps one), so a killed gang resumes
/// every member where it stopped; `resumed` in its results says from which step.
pub struct Gang {
    pub trace: Trace,
    pub calls: Arc<Mutex<usize>>,
}

/// Params of `gang`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GangParams {
    #[serde(default = "two")]
    pub groups: u64,
    #[serde(default)]
    pub limit: usize,
    #[serde(default)]
    pub steps: u64,
    #[serde(default)]
    pub step_ms: u64,
}

fn two() -> u64 {
    2
}

const GANG_STATE: &str = "step";

impl Gang {
    fn layer_of(inputs: &Inputs) -> StageResult<u64> {
        inputs
            .one(LAYER)?
            .meta
            .get("layer")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow::anyhow!("the layer input has no `layer`"))
    }

    fn compute(
        &self,
        jobs: &[(&GangParams, &Inputs, &RunContext)],
        call: Option<usize>,
    ) -> Vec<StageResult<Outcome>> {
        let starts: Vec<Instant> = jobs
            .iter()
            .map(|(_, _, cx)| self.trace.begin("gang", cx))
            .collect();
        // Every member resumes from its own state.
        let resumed: Vec<u64> = jobs
            .iter()
            .map(|(_, _, cx)| {
                cx.work_dir()
                    .and_then(|d| fs::read_to_string(d.join(GANG_STATE)))
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        let steps = jobs.first().map_or(0, |(p, _, _)| p.steps);
        let from = resumed.iter().copied().min().unwrap_or(0);
        for step in from..steps {
            for ((p, _, cx), done) in jobs.iter().zip(&resumed) {
                if step < *done {
                    continue;
                }
                std::thread::sleep(Duration::from_millis(p.step_ms));
                if let Err(e) = cx
                    .work_dir()
                    .and_then(|d| fs::write(d.join(GANG_STATE), (step + 1).to_string()))
                {
                    cx.log(format!("cannot save the step: {e}"));
                }
            }
        }
        jobs.iter()
            .zip(starts)
            .zip(resumed)
            .map(|(((_, inputs, cx), t), resumed)| {
                let a = inputs.one(LAYER)?;
                let v = 3.0 * read_value(&a.dir, "layer.json")?;
                let layer = Self::layer_of(inputs)?;
                write_value(cx, "layer.json", &json!({ "layer": layer, "value": v }))?;
                self.trace.finish_in("gang", cx, t, jobs.len(), call);
                Ok(Outcome {
                    meta: json!({ "layer": layer, "value": v }),
                    results: Some(json!({ "value": v, "resumed": resumed })),
                    summary: None,
                    publish: Vec::new(),
                    references: Vec::new(),
                })
            })
            .collect()
    }
}

impl Stage for Gang {
    type Params = GangParams;
    fn kind(&self) -> &'static str {
        "gang"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "three times each layer, in gangs"
    }
    fn output(&self) -> &'static str {
        LAYER
    }
    fn inputs(&self) -> Vec<InputSlot> {
        vec![InputSlot::one(LAYER)]
    }
    fn gangs(&self) -> bool {
        true
    }
    fn gang(&self, p: &GangParams, inputs: &Inputs) -> Option<String> {
        let layer = Self::layer_of(inputs).ok()?;
        Some(format!("{}", layer % p.groups.max(1)))
    }
    fn gang_limit(&self, p: &GangParams, _: &Inputs, _: Option<&str>) -> usize {
        if p.limit == 0 { usize::MAX } else { p.limit }
    }
    fn run(&self, p: &GangParams, inputs: &Inputs, cx: &RunContext) -> StageResult<Outcome> {
        self.compute(&[(p, inputs, cx)], None)
            .pop()
            .unwrap_or_else(|| Err(anyhow::anyhow!("no result")))
    }
    fn run_gang(&self, jobs: &[(&GangParams, &Inputs, &RunContext)]) -> Vec<StageResult<Outcome>> {
        let call = match self.calls.lock() {
            Ok(mut c) => {
                *c += 1;
                *c
            }
            Err(_) => 0,
        };
        self.compute(jobs, Some(call))
    }
}

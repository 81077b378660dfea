//! SLURM settings: the `[executor.slurm]` table of an experiment file (and of the files it
//! includes) and of `--executor-config FILE`, merged and checked.
//!
//! ```toml
//! [executor.slurm]
//! partition = "gpu"
//! account = "lab"
//! time = "00:30:00"            # every job's limit unless a kind or stage says otherwise
//! cpus = 4
//! mem = "16G"
//! max_jobs = 50                # this run's jobs in SLURM's queue at once (array tasks count one)
//! retries = 2                  # resubmissions of a cancelled, preempted or timed-out job
//! poll_seconds = 5             # between looks at the queue
//! cache_wait_seconds = 60      # for a completed job's entry to show here (NFS caches)
//! extra = ["--qos=normal"]     # more sbatch options, one `#SBATCH` line each
//! setup = ["module load cuda"] # shell lines run before probex in every job
//!
//! [executor.slurm.kind.train]  # per stage kind ...
//! gpus = 1
//! time = "02:00:00"
//!
//! [executor.slurm.stage.statnn] # ... and per declared stage, which wins
//! gpus = 0
//! ```
//!
//! A value is looked up in the node's stage table, then its kind's, then the top level. Later
//! sources override earlier ones key by key: the files an experiment includes, the experiment
//! file, then `--executor-config`. None of it is part of any key: the executor only decides
//! where nodes are computed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostic::{Diagnostic, Diagnostics, FileId, SourceMap, Span};
use crate::experiment::Experiment;

/// What a job asks SLURM for; every field optional so that tables can be layered.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `--partition`.
    pub partition: Option<Word>,
    /// `--account`.
    pub account: Option<Word>,
    /// `--qos`.
    pub qos: Option<Word>,
    /// `--time`: a SLURM time limit.
    pub time: Option<TimeLimit>,
    /// `--cpus-per-task`; also the node's thread count.
    pub cpus: Option<NonZeroU32>,
    /// `--mem`: memory per node, `16G`, `4000M`.
    pub mem: Option<Memory>,
    /// `--gres=gpu:N`; 0 asks for none (to override a kind's default for one stage).
    pub gpus: Option<u32>,
    /// More sbatch options, each written as one `#SBATCH` line (`--constraint=a100`).
    pub extra: Option<Vec<SbatchOption>>,
    /// Shell lines run in the job before probex (`module load cuda`).
    pub setup: Option<Vec<ShellLine>>,
}

impl Resources {
    /// Takes every value `over` sets (lists are replaced whole, not appended).
    pub fn overlay(&mut self, over: &Resources) {
        fn take<T: Clone>(a: &mut Option<T>, b: &Option<T>) {
            if b.is_some() {
                a.clone_from(b);
            }
        }
        take(&mut self.partition, &over.partition);
        take(&mut self.account, &over.account);
        take(&mut self.qos, &over.qos);
        take(&mut self.time, &over.time);
        take(&mut self.cpus, &over.cpus);
        take(&mut self.mem, &over.mem);
        take(&mut self.gpus, &over.gpus);
        take(&mut self.extra, &over.extra);
        take(&mut self.setup, &over.setup);
    }
}

/// Every SLURM setting of a run, merged from all sources.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlurmConfig {
    /// The top-level values.
    pub base: Resources,
    /// `[executor.slurm.kind.KIND]`.
    pub kinds: BTreeMap<String, Resources>,
    /// `[executor.slurm.stage.NAME]`.
    pub stages: BTreeMap<String, Resources>,
    /// Jobs of this run in SLURM's queue at once (pending or running; array tasks count one).
    pub max_jobs: Option<NonZeroUsize>,
    /// Resubmissions of a job that was cancelled, preempted, timed out or lost with its node.
    pub retries: Option<u32>,
    /// Seconds between two looks at the queue.
    pub poll_seconds: Option<PollSeconds>,
    /// Seconds a completed job's entry may take to show in the cache here (a shared filesystem
    /// can show another machine's new directory late) before the node counts as failed.
    pub cache_wait_seconds: Option<WaitSeconds>,
    /// The probex binary as compute nodes see it [default: the running one].
    pub probex: Option<PathBuf>,
}

impl SlurmConfig {
    /// What a node of stage `stage`, of kind `kind`, asks for.
    pub fn resources(&self, stage: &str, kind: &str) -> Resources {
        let mut r = self.base.clone();
        if let Some(k) = self.kinds.get(kind) {
            r.overlay(k);
        }
        if let Some(s) = self.stages.get(stage) {
            r.overlay(s);
        }
        r
    }

    fn overlay(&mut self, t: SlurmTable) {
        self.base.overlay(&t.resources());
        for (k, r) in t.kind {
            self.kinds.entry(k.into_inner()).or_default().overlay(&r);
        }
        for (s, r) in t.stage {
            self.stages.entry(s.into_inner()).or_default().overlay(&r);
        }
        if t.max_jobs.is_some() {
            self.max_jobs = t.max_jobs;
        }
        if t.retries.is_some() {
            self.retries = t.retries;
        }
        if t.poll_seconds.is_some() {
            self.poll_seconds = t.poll_seconds;
        }
        if t.cache_wait_seconds.is_some() {
            self.cache_wait_seconds = t.cache_wait_seconds;
        }
        if let Some(p) = t.probex {
            self.probex = Some(p);
        }
    }
}

/// `[executor]`: one table per executor that has settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecutorTable {
    slurm: Option<SlurmTable>,
}

/// `[executor.slurm]` as written (serde cannot deny unknown fields through `flatten`, so the
/// resource fields are spelled out again).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlurmTable {
    partition: Option<Word>,
    account: Option<Word>,
    qos: Option<Word>,
    time: Option<TimeLimit>,
    cpus: Option<NonZeroU32>,
    mem: Option<Memory>,
    gpus: Option<u32>,
    extra: Option<Vec<SbatchOption>>,
    setup: Option<Vec<ShellLine>>,
    max_jobs: Option<NonZeroUsize>,
    retries: Option<u32>,
    poll_seconds: Option<PollSeconds>,
    cache_wait_seconds: Option<WaitSeconds>,
    probex: Option<PathBuf>,
    #[serde(default)]
    kind: BTreeMap<Spanned<String>, Resources>,
    #[serde(default)]
    stage: BTreeMap<Spanned<String>, Resources>,
}

impl SlurmTable {
    fn resources(&self) -> Resources {
        Resources {
            partition: self.partition.clone(),
            account: self.account.clone(),
            qos: self.qos.clone(),
            time: self.time.clone(),
            cpus: self.cpus,
            mem: self.mem.clone(),
            gpus: self.gpus,
            extra: self.extra.clone(),
            setup: self.setup.clone(),
        }
    }
}

/// Reads the `[executor]` tables of `exp`'s files and of `config_file`, which wins. Kind
/// names must be kinds of this build (`kinds`), stage names stages of `exp`.
pub fn load(
    exp: &Experiment,
    config_file: Option<&Path>,
    kinds: &[&str],
) -> Result<SlurmConfig, Diagnostics> {
    let mut sources = exp.sources.clone();
    let n = sources.files().count();
    // Files are read depth first, each before the files it includes; reversed, an includer
    // comes after its includes and overrides them.
    let mut files: Vec<(FileId, bool)> = (0..n).rev().map(|id| (id, false)).collect();
    if let Some(path) = config_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Diagnostic::new(format!(
                "cannot read executor config {}: {e}",
                path.display()
            ))
            .with_help("--executor-config takes a TOML file with an [executor.slurm] table")
        })?;
        files.push((sources.add(path.to_path_buf(), text), true));
    }
    let stages: BTreeSet<&str> = exp.stages.iter().map(|s| s.name.as_str()).collect();
    let mut config = SlurmConfig::default();
    let mut errors = Vec::new();
    for (file, is_config) in files {
        match read_file(&sources, file, is_config, kinds, &stages) {
            Ok(Some(t)) => config.overlay(t),
            Ok(None) => {}
            Err(mut d) => errors.append(&mut d),
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(Diagnostics(errors))
    }
}

/// The `[executor.slurm]` table of one file, if it has one. An experiment file's other tables
/// are the experiment loader's; a config file may hold nothing else.
fn read_file(
    sources: &SourceMap,
    file: FileId,
    is_config: bool,
    kinds: &[&str],
    stages: &BTreeSet<&str>,
) -> Result<Option<SlurmTable>, Vec<Diagnostic>> {
    let root = DeTable::parse(&sources.file(file).text)
        .map_err(|e| vec![Diagnostic::from_toml(sources, file, &e)])?
        .into_inner();
    let mut table = None;
    for (key, value) in root {
        if key.get_ref() == "executor" {
            table = Some(value);
        } else if is_config {
            let span = Span {
                file,
                range: key.span(),
            };
            return Err(vec![
                Diagnostic::at(sources, &span, format!("unknown table `{}`", key.get_ref()))
                    .with_label("not an executor setting")
                    .with_help("an executor config file holds only [executor.slurm] tables"),
            ]);
        }
    }
    let Some(value) = table else {
        return Ok(None);
    };
    if !matches!(value.get_ref(), DeValue::Table(_)) {
        let span = Span {
            file,
            range: value.span(),
        };
        return Err(vec![
            Diagnostic::at(sources, &span, "`executor` must be a table")
                .with_help("write the settings as an [executor.slurm] table"),
        ]);
    }
    let t: ExecutorTable = Deserialize::deserialize(toml::de::ValueDeserializer::from(value))
        .map_err(|e| vec![Diagnostic::from_toml(sources, file, &e)])?;
    let Some(slurm) = t.slurm else {
        return Ok(None);
    };
    let mut errors = Vec::new();
    for k in slurm.kind.keys() {
        if !kinds.contains(&k.get_ref().as_str()) {
            let span = Span {
                file,
                range: k.span(),
            };
            errors.push(
                Diagnostic::at(
                    sources,
                    &span,
                    format!("unknown stage kind `{}`", k.get_ref()),
                )
                .with_label("no such kind")
                .with_help(format!("known kinds: {}", kinds.join(", "))),
            );
        }
    }
    for s in slurm.stage.keys() {
        if !stages.contains(s.get_ref().as_str()) {
            let span = Span {
                file,
                range: s.span(),
            };
            let known: Vec<&str> = stages.iter().copied().collect();
            errors.push(
                Diagnostic::at(
                    sources,
                    &span,
                    format!("the experiment has no stage `{}`", s.get_ref()),
                )
                .with_label("no such stage")
                .with_help(format!("its stages: {}", known.join(", "))),
            );
        }
    }
    if errors.is_empty() {
        Ok(Some(slurm))
    } else {
        Err(errors)
    }
}

/// Implements `Deserialize` for a string newtype through a checking constructor, so a bad
/// value is a `toml` error pointing at the value.
macro_rules! checked_string {
    ($t:ident, $check:path) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $check(&s).map_err(de::Error::custom)?;
                Ok($t(s))
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl $t {
            /// The value as written.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

/// A partition, account or QOS name: one word, nothing a job script could misread.
#[derive(Clone, Debug, PartialEq)]
pub struct Word(String);
checked_string!(Word, check_word);

/// A SLURM time limit: `MINUTES`, `MM:SS`, `HH:MM:SS`, `DAYS-HH`, `DAYS-HH:MM`,
/// `DAYS-HH:MM:SS`, or `UNLIMITED`.
#[derive(Clone, Debug, PartialEq)]
pub struct TimeLimit(String);
checked_string!(TimeLimit, check_time);

/// Memory per node: a whole number with an optional unit `K`, `M` (the default), `G`, `T`.
#[derive(Clone, Debug, PartialEq)]
pub struct Memory(String);
checked_string!(Memory, check_memory);

/// One sbatch option (`--constraint=a100`), written as an `#SBATCH` line.
#[derive(Clone, Debug, PartialEq)]
pub struct SbatchOption(String);
checked_string!(SbatchOption, check_option);

/// One line of shell run in the job before probex.
#[derive(Clone, Debug, PartialEq)]
pub struct ShellLine(String);
checked_string!(ShellLine, check_line);

/// Seconds between two looks at SLURM's queue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PollSeconds(f64);

impl PollSeconds {
    /// The interval.
    pub fn duration(self) -> Duration {
        Duration::from_secs_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for PollSeconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if v.is_finite() && (0.1..=3600.0).contains(&v) {
            Ok(PollSeconds(v))
        } else {
            Err(de::Error::custom(format!(
                "`poll_seconds` must be between 0.1 and 3600, got {v}"
            )))
        }
    }
}

/// Seconds to wait for a completed job's entry to show in the cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WaitSeconds(f64);

impl WaitSeconds {
    /// The wait.
    pub fn duration(self) -> Duration {
        Duration::from_secs_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for WaitSeconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if v.is_finite() && (0.0..=3600.0).contains(&v) {
            Ok(WaitSeconds(v))
        } else {
            Err(de::Error::custom(format!(
                "`cache_wait_seconds` must be between 0 and 3600, got {v}"
            )))
        }
    }
}

/// Why a value of the `[slurm]` table is refused (shown at the value).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlurmValueError {
    /// An empty name.
    #[error("must not be empty")]
    Empty,
    /// A name with a character a job script could misread.
    #[error("`{value}` is not a SLURM name: it contains {found:?} (use one word)")]
    NotAWord {
        /// The value.
        value: String,
        /// The first offending character.
        found: char,
    },
    /// Not a SLURM time limit.
    #[error(
        "`{0}` is not a SLURM time limit: use MINUTES, HH:MM:SS or DAYS-HH[:MM[:SS]] (e.g. \"02:00:00\", \"1-12\")"
    )]
    NotATime(String),
    /// A time limit of zero.
    #[error("`{0}` is a time limit of zero")]
    ZeroTime(String),
    /// Not an amount of memory.
    #[error(
        "`{0}` is not an amount of memory: use a whole number with K, M, G or T (e.g. \"16G\")"
    )]
    NotMemory(String),
    /// An sbatch option that does not start with `-`.
    #[error(
        "`{0}` is not an sbatch option: write it as on sbatch's command line (e.g. \"--constraint=a100\")"
    )]
    NotAnOption(String),
    /// A value of several lines.
    #[error("must be one line (give several lines as several list items)")]
    NotOneLine,
}

fn check_word(s: &str) -> Result<(), SlurmValueError> {
    if s.is_empty() {
        return Err(SlurmValueError::Empty);
    }
    match s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '#' | '\\'))
    {
        Some(found) => Err(SlurmValueError::NotAWord {
            value: s.to_owned(),
            found,
        }),
        None => Ok(()),
    }
}

fn check_time(s: &str) -> Result<(), SlurmValueError> {
    let bad = || SlurmValueError::NotATime(s.to_owned());
    if matches!(s, "UNLIMITED" | "INFINITE") {
        return Ok(());
    }
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, s),
    };
    let number = |p: &str| !p.is_empty() && p.len() <= 6 && p.bytes().all(|b| b.is_ascii_digit());
    if days.is_some_and(|d| !number(d)) {
        return Err(bad());
    }
    let parts: Vec<&str> = rest.split(':').collect();
    if parts.len() > 3 || !parts.iter().all(|p| number(p)) {
        return Err(bad());
    }
    // Only the leading field may exceed its clock range (`90` minutes, `36:00:00` hours).
    if parts
        .iter()
        .skip(1)
        .any(|p| p.parse::<u32>().map_or(true, |v| v >= 60))
    {
        return Err(bad());
    }
    if parts.iter().all(|p| p.bytes().all(|b| b == b'0'))
        && days.is_none_or(|d| d.bytes().all(|b| b == b'0'))
    {
        return Err(SlurmValueError::ZeroTime(s.to_owned()));
    }
    Ok(())
}

fn check_memory(s: &str) -> Result<(), SlurmValueError> {
    let digits = s.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    let ok = !digits.is_empty()
        && s.len() - digits.len() <= 1
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.bytes().any(|b| b != b'0');
    if ok {
        Ok(())
    } else {
        Err(SlurmValueError::NotMemory(s.to_owned()))
    }
}

fn check_option(s: &str) -> Result<(), SlurmValueError> {
    if !s.starts_with('-') {
        return Err(SlurmValueError::NotAnOption(s.to_owned()));
    }
    check_line(s)
}

fn check_line(s: &str) -> Result<(), SlurmValueError> {
    if s.contains(['\n', '\r', '\0']) {
        return Err(SlurmValueError::NotOneLine);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SlurmTable, String> {
        let mut sources = SourceMap::default();
        let id = sources.add("exp.toml".into(), text.into());
        let stages = BTreeSet::from(["probe", "layers"]);
        read_file(&sources, id, false, &["train", "extract"], &stages)
            .map(|t| t.expect("has a table"))
            .map_err(|d| Diagnostics(d).to_string())
    }

    #[test]
    fn time_limits_follow_slurm_formats() {
        for ok in [
            "30",
            "90",
            "30:00",
            "02:00:00",
            "36:00:00",
            "1-12",
            "1-12:30",
            "2-00:00:01",
            "UNLIMITED",
        ] {
            assert!(check_time(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "2h", "1:2:3:4", "01:60:00", "-1", "1-", "00:00:00", "0", "1.5", "12:3a",
        ] {
            assert!(check_time(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_time("00:00:00"),
            Err(SlurmValueError::ZeroTime("00:00:00".into()))
        );
        assert_eq!(
            check_time("2h"),
            Err(SlurmValueError::NotATime("2h".into()))
        );
        assert_eq!(
            check_word("a b"),
            Err(SlurmValueError::NotAWord {
                value: "a b".into(),
                found: ' '
            })
        );
    }

    #[test]
    fn memory_needs_a_number_and_at_most_one_unit() {
        for ok in ["16G", "4000", "4000M", "512k", "1T"] {
            assert!(check_memory(ok).is_ok(), "{ok}");
        }
        for bad in ["", "G", "16GB", "0", "0G", "1.5G", "-4G", "16 G"] {
            assert!(check_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_values_point_at_the_value_with_what_to_write() {
        let err = parse("[executor.slurm]\npartition = \"gpu\"\ntime = \"2h\"\n").unwrap_err();
        assert!(err.contains("exp.toml:3:8"), "{err}");
        assert!(err.contains("`2h` is not a SLURM time limit"), "{err}");
        assert!(err.contains("02:00:00"), "{err}");

        let err = parse("[executor.slurm]\npartiton = \"gpu\"\n").unwrap_err();
        assert!(err.contains("exp.toml:2:1"), "{err}");
        assert!(err.contains("unknown field `partiton`"), "{err}");

        let err = parse("[executor.slurm]\ncpus = 0\n").unwrap_err();
        assert!(err.contains("exp.toml:2:8"), "{err}");

        let err = parse("[executor.slurm]\nextra = [\"constraint=a100\"]\n").unwrap_err();
        assert!(err.contains("not an sbatch option"), "{err}");

        let err = parse("[executor.slurm]\npartition = \"gpu a100\"\n").unwrap_err();
        assert!(err.contains("not a SLURM name"), "{err}");

        let err = parse("[executor.slurm]\npoll_seconds = 0\n").unwrap_err();
        assert!(err.contains("between 0.1 and 3600"), "{err}");

        let err = parse("[executor.slrum]\n").unwrap_err();
        assert!(err.contains("unknown field `slrum`"), "{err}");
    }

    #[test]
    fn unknown_kinds_and_stages_are_named_with_what_exists() {
        let err = parse("[executor.slurm.kind.trian]\ngpus = 1\n").unwrap_err();
        assert!(err.contains("unknown stage kind `trian`"), "{err}");
        assert!(err.contains("exp.toml:1:22"), "{err}");
        assert!(err.contains("known kinds: train, extract"), "{err}");

        let err = parse("[executor.slurm.stage.prob]\ngpus = 1\n").unwrap_err();
        assert!(err.contains("no stage `prob`"), "{err}");
        assert!(err.contains("its stages: layers, probe"), "{err}");
    }

    #[test]
    fn a_stage_overrides_its_kind_which_overrides_the_top_level() {
        let t = parse(
            r#"
[executor.slurm]
partition = "cpu"
time = "00:10:00"
extra = ["--qos=low"]
[executor.slurm.kind.train]
partition = "gpu"
gpus = 1
time = "02:00:00"
[executor.slurm.stage.probe]
gpus = 0
extra = ["--constraint=a100"]
"#,
        )
        .unwrap();
        let mut c = SlurmConfig::default();
        c.overlay(t);
        let r = c.resources("probe", "train");
        assert_eq!(r.partition.unwrap().as_str(), "gpu");
        assert_eq!(r.gpus, Some(0));
        assert_eq!(r.time.unwrap().as_str(), "02:00:00");
        let extra: Vec<String> = r.extra.unwrap().iter().map(|o| o.to_string()).collect();
        assert_eq!(extra, ["--constraint=a100"]);
        let other = c.resources("layers", "extract");
        assert_eq!(other.partition.unwrap().as_str(), "cpu");
        assert_eq!(other.gpus, None);
    }

    #[test]
    fn a_later_source_overrides_an_earlier_one_key_by_key() {
        let mut c = SlurmConfig::default();
        c.overlay(
            parse("[executor.slurm]\npartition = \"a\"\naccount = \"lab\"\nretries = 5\n").unwrap(),
        );
        c.overlay(parse("[executor.slurm]\npartition = \"b\"\n").unwrap());
        assert_eq!(c.base.partition.as_ref().unwrap().as_str(), "b");
        assert_eq!(c.base.account.as_ref().unwrap().as_str(), "lab");
        assert_eq!(c.retries, Some(5));
    }

    #[test]
    fn a_config_file_holds_only_executor_tables() {
        let mut sources = SourceMap::default();
        let id = sources.add("site.toml".into(), "[stage.x]\nkind = \"train\"\n".into());
        let err = read_file(&sources, id, true, &[], &BTreeSet::new()).unwrap_err();
        let text = Diagnostics(err).to_string();
        assert!(text.contains("unknown table `stage`"), "{text}");
        assert!(text.contains("site.toml:1:2"), "{text}");
    }
}

//! Job scripts: one SLURM job array per submission, task `i` running `probex run-node` on the
//! `i`-th batch of a batch file. The script holds every option as an `#SBATCH` line, so a
//! person can resubmit it by hand (`sbatch runs/.../slurm/probe-1.sh`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::Resources;

/// One node as a job is told about it: its name to find it in the plan, and its key to check
/// that the plan still means the same thing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    /// The node's name (`probe[layer=2]`).
    pub node: String,
    /// Its key when the job was submitted.
    pub key: String,
}

/// The batch file of a submission: task `i` computes batch `i`.
pub type BatchFile = Vec<Vec<NodeRef>>;

/// What one submission runs.
#[derive(Debug)]
pub struct JobScript<'a> {
    /// `--job-name`.
    pub name: String,
    /// Tasks of the array (at least 1).
    pub tasks: usize,
    /// `--output`, with `%A` (array job id) and `%a` (task index).
    pub output: PathBuf,
    /// What the job asks for.
    pub resources: &'a Resources,
    /// The probex binary as compute nodes see it.
    pub probex: &'a Path,
    /// Arguments of `probex` before the task index (`--cache DIR run-node EXP ...`).
    pub args: Vec<String>,
}

impl JobScript<'_> {
    /// The script's text.
    pub fn render(&self) -> String {
        let r = self.resources;
        let mut s = String::from("#!/bin/bash\n");
        s.push_str("# Written by probex: one task per batch of nodes in the batch file below.\n");
        let mut opt = |line: String| {
            s.push_str("#SBATCH ");
            s.push_str(&line);
            s.push('\n');
        };
        opt(format!("--job-name={}", directive_value(&self.name)));
        opt(format!("--array=0-{}", self.tasks.max(1) - 1));
        opt(format!(
            "--output={}",
            directive_value(&self.output.display().to_string())
        ));
        if let Some(p) = &r.partition {
            opt(format!("--partition={p}"));
        }
        if let Some(a) = &r.account {
            opt(format!("--account={a}"));
        }
        if let Some(q) = &r.qos {
            opt(format!("--qos={q}"));
        }
        if let Some(t) = &r.time {
            opt(format!("--time={t}"));
        }
        if let Some(c) = r.cpus {
            opt(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = &r.mem {
            opt(format!("--mem={m}"));
        }
        if let Some(g) = r.gpus.filter(|&g| g > 0) {
            opt(format!("--gres=gpu:{g}"));
        }
        for e in r.extra.iter().flatten() {
            opt(e.to_string());
        }
        s.push_str("set -eu\n");
        for line in r.setup.iter().flatten() {
            s.push_str(line.as_str());
            s.push('\n');
        }
        s.push_str("exec ");
        s.push_str(&quote(&self.probex.display().to_string()));
        for a in &self.args {
            s.push(' ');
            s.push_str(&quote(a));
        }
        s.push_str(" --index \"$SLURM_ARRAY_TASK_ID\"\n");
        s
    }
}

/// A value for an `#SBATCH` line: sbatch splits these lines at blanks unless the value is in
/// double quotes.
fn directive_value(v: &str) -> String {
    if v.chars().any(char::is_whitespace) {
        format!("\"{v}\"")
    } else {
        v.to_string()
    }
}

/// A shell word that stands for `s` exactly.
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '=' | ':' | ',')
        })
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_survive_spaces_quotes_and_dollars() {
        assert_eq!(quote("/a/b-c.toml"), "/a/b-c.toml");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's $HOME"), r"'it'\''s $HOME'");
        assert_eq!(quote(""), "''");
        // The shell reads the quoted word back unchanged.
        let word = "x'y $z \"w\"";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", quote(word)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), word);
    }

    #[test]
    fn a_script_holds_every_option_and_runs_the_task_of_its_index() {
        let r: Resources = toml::from_str(
            r#"
partition = "gpu"
account = "lab"
time = "02:00:00"
cpus = 4
mem = "16G"
gpus = 1
extra = ["--constraint=a100"]
setup = ["module load cuda"]
"#,
        )
        .unwrap();
        let js = JobScript {
            name: "probex:planted:probe".into(),
            tasks: 3,
            output: "/runs/x y/slurm/probe-%A_%a.out".into(),
            resources: &r,
            probex: Path::new("/opt/probex"),
            args: vec![
                "--cache".into(),
                "/c".into(),
                "run-node".into(),
                "/e x.toml".into(),
            ],
        };
        let s = js.render();
        for line in [
            "#SBATCH --job-name=probex:planted:probe\n",
            "#SBATCH --array=0-2\n",
            "#SBATCH --output=\"/runs/x y/slurm/probe-%A_%a.out\"\n",
            "#SBATCH --partition=gpu\n",
            "#SBATCH --account=lab\n",
            "#SBATCH --time=02:00:00\n",
            "#SBATCH --cpus-per-task=4\n",
            "#SBATCH --mem=16G\n",
            "#SBATCH --gres=gpu:1\n",
            "#SBATCH --constraint=a100\n",
            "module load cuda\n",
            "exec /opt/probex --cache /c run-node '/e x.toml' --index \"$SLURM_ARRAY_TASK_ID\"\n",
        ] {
            assert!(s.contains(line), "missing {line:?} in\n{s}");
        }
        // Directives must come before the first command, or sbatch ignores them.
        let last_directive = s.rfind("#SBATCH").unwrap();
        assert!(last_directive < s.find("set -eu").unwrap(), "{s}");
    }

    #[test]
    fn zero_gpus_and_unset_values_write_no_line() {
        let r = Resources {
            gpus: Some(0),
            ..Resources::default()
        };
        let js = JobScript {
            name: "n".into(),
            tasks: 1,
            output: "/o".into(),
            resources: &r,
            probex: Path::new("/p"),
            args: Vec::new(),
        };
        let s = js.render();
        assert!(s.contains("--array=0-0\n"), "{s}");
        assert!(!s.contains("gres") && !s.contains("partition"), "{s}");
    }
}

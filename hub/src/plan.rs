//! The first phase: pinning a request to commits ([`Hub::plan`]), whose digest is the fetch
//! stage's identity, and remembering the plan so that the run fetches exactly it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use probex_fetch::discover::glob_to_regex;
use probex_fetch::hub::{ModelJ, Observer, Plan, PlannedModel, Progress, Request};
use probex_weights::dataset::Split;

use super::cache::{RepoRef, safe_rel_path};
use super::{Hub, HubError, index};

/// Plans made by [`Hub::plan`], by endpoint and request, so that the run fetches exactly the
/// commits the identity named (a branch that moves between plan and run does not slip in).
static PLANS: Mutex<Option<HashMap<String, Plan>>> = Mutex::new(None);

fn plan_memo_key(endpoint: &str, req: &Request, revision: &str) -> String {
    format!(
        "{endpoint}\n{revision}\n{}",
        serde_json::to_string(req).unwrap_or_default()
    )
}

impl Hub {
    /// Pins `req` at `revision`: resolves every repo to a commit and lists the models. The
    /// result is remembered for [`Hub::fetch_request`] in this process.
    pub fn plan(
        &self,
        req: &Request,
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Plan, HubError> {
        let plan = self.plan_uncached(req, revision, obs)?;
        if let Ok(mut memo) = PLANS.lock() {
            memo.get_or_insert_with(HashMap::new)
                .insert(plan_memo_key(&self.endpoint, req, revision), plan.clone());
        }
        Ok(plan)
    }

    /// The plan [`Hub::plan`] made for this request in this process, or a new one.
    pub fn planned(
        &self,
        req: &Request,
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Plan, HubError> {
        let key = plan_memo_key(&self.endpoint, req, revision);
        if let Ok(memo) = PLANS.lock()
            && let Some(p) = memo.as_ref().and_then(|m| m.get(&key))
        {
            return Ok(p.clone());
        }
        self.plan(req, revision, obs)
    }

    /// [`Hub::plan`] without the memo: the request's models pinned, sorted by id, ids unique.
    fn plan_uncached(
        &self,
        req: &Request,
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Plan, HubError> {
        let mut plan = match req {
            Request::Repos { repos, file } => self.plan_repos(repos, file, revision, obs)?,
            Request::Glob { repo, pattern } => self.plan_glob(repo, pattern, revision)?,
            Request::ModelJGenerative { repo, file } => {
                self.plan_generative(repo, file, revision, obs)?
            }
            Request::ModelJIndex {
                subset,
                index,
                file,
            } => self.plan_index(*subset, index, file, revision, obs)?,
        };
        plan.models.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(w) = plan.models.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(HubError::DuplicateId {
                id: w[0].id.clone(),
                first: w[0].file.clone(),
                second: w[1].file.clone(),
            });
        }
        Ok(plan)
    }

    /// One model per repo: `file` in each of `repos`, each repo pinned.
    fn plan_repos(
        &self,
        repos: &[String],
        file: &str,
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Plan, HubError> {
        let refs: Vec<RepoRef> = repos
            .iter()
            .map(|r| RepoRef::model(r))
            .collect::<Result<_, _>>()?;
        let shas = self.resolve_many(&refs, revision, obs)?;
        Ok(Plan {
            revision: revision.to_string(),
            models: refs
                .iter()
                .zip(shas)
                .map(|(r, commit)| PlannedModel {
                    id: r.id.clone(),
                    split: None,
                    repo: r.id.clone(),
                    revision: revision.to_string(),
                    commit,
                    file: file.to_string(),
                })
                .collect(),
            index: None,
            extra_files: Vec::new(),
        })
    }

    /// Every file of `repo` matching `pattern`, one model each.
    fn plan_glob(&self, repo: &str, pattern: &str, revision: &str) -> Result<Plan, HubError> {
        let r = RepoRef::model(repo)?;
        let commit = self.resolve(&r, revision)?;
        let re = glob_to_regex(pattern)?;
        let mut models = Vec::new();
        for (path, _) in self.list_files(&r, &commit)? {
            if re.is_match(&path) {
                safe_rel_path(&path)?;
                models.push(PlannedModel {
                    id: path
                        .strip_suffix(".safetensors")
                        .unwrap_or(&path)
                        .to_string(),
                    split: None,
                    repo: r.id.clone(),
                    revision: revision.to_string(),
                    commit: commit.clone(),
                    file: path,
                });
            }
        }
        if models.is_empty() {
            return Err(HubError::NoMatch {
                repo: repo.to_owned(),
                commit,
                pattern: pattern.to_owned(),
            });
        }
        Ok(Plan {
            revision: revision.to_string(),
            models,
            index: None,
            extra_files: Vec::new(),
        })
    }

    /// Model-J's generative layout in `repo`: `{split}/{model dir}/{file}`.
    fn plan_generative(
        &self,
        repo: &str,
        file: &str,
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Plan, HubError> {
        let r = RepoRef::model(repo)?;
        let commit = self.resolve(&r, revision)?;
        let mut models = Vec::new();
        let mut ignored = 0usize;
        for (path, _) in self.list_files(&r, &commit)? {
            let parts: Vec<&str> = path.split('/').collect();
            match parts.as_slice() {
                [split, dirs @ .., name] if *name == file && !dirs.is_empty() => {
                    let Some(split) = Split::parse(split) else {
                        ignored += 1;
                        continue;
                    };
                    safe_rel_path(&path)?;
                    models.push(PlannedModel {
                        id: dirs.join("/"),
                        split: Some(split),
                        repo: r.id.clone(),
                        revision: revision.to_string(),
                        commit: commit.clone(),
                        file: path.clone(),
                    });
                }
                _ => {}
            }
        }
        if ignored > 0 {
            obs.log(&format!(
                "{ignored} `{file}` files of {repo} are not under a split directory; ignored"
            ));
        }
        if models.is_empty() {
            return Err(HubError::NotGenerative {
                repo: repo.to_owned(),
                commit,
                file: file.to_owned(),
            });
        }
        Ok(Plan {
            revision: revision.to_string(),
            models,
            index: None,
            extra_files: Vec::new(),
        })
    }

    /// A Model-J discriminative subset: its repos and splits from the `index` dataset, `file`
    /// in each repo (pinned at `main`).
    fn plan_index(
        &self,
        subset: ModelJ,
        index: &str,
        file: &str,
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Plan, HubError> {
        let ir = RepoRef::dataset(index)?;
        let icommit = self.resolve(&ir, revision)?;
        let rows = self.read_index(&ir, &icommit, subset, obs)?;
        let refs: Vec<RepoRef> = rows
            .iter()
            .map(|r| RepoRef::model(&r.repo))
            .collect::<Result<_, _>>()
            .map_err(|e| e.at(format!("Model-J index {index}@{icommit}")))?;
        obs.log(&format!(
            "Model-J {}: {} models in the index {index}@{icommit}",
            subset.name(),
            refs.len()
        ));
        let shas = self.resolve_many(&refs, "main", obs)?;
        Ok(Plan {
            revision: revision.to_string(),
            models: rows
                .iter()
                .zip(shas)
                .map(|(row, commit)| PlannedModel {
                    id: row.repo.clone(),
                    split: Some(row.split),
                    repo: row.repo.clone(),
                    revision: "main".into(),
                    commit,
                    file: file.to_string(),
                })
                .collect(),
            index: Some((index.to_string(), icommit)),
            extra_files: Vec::new(),
        })
    }

    pub(super) fn read_index(
        &self,
        repo: &RepoRef,
        commit: &str,
        subset: ModelJ,
        obs: &dyn Observer,
    ) -> Result<Vec<index::IndexRow>, HubError> {
        let files: Vec<(String, Option<Split>)> = self
            .list_files(repo, commit)?
            .into_iter()
            .filter_map(|(p, _)| index::parquet_of_subset(&p, subset.name()).map(|s| (p, s)))
            .collect();
        if files.is_empty() {
            return Err(HubError::NoIndexFiles {
                repo: repo.to_string(),
                commit: commit.to_owned(),
                subset: subset.name(),
            });
        }
        let mut rows = Vec::new();
        for (path, split) in files {
            let local = self.fetch_file(repo, commit, &path, &Progress::new(1), obs)?;
            rows.extend(index::read_parquet(&local, split)?);
        }
        rows.sort_by(|a, b| a.repo.cmp(&b.repo));
        if let Some(w) = rows.windows(2).find(|w| w[0].repo == w[1].repo) {
            return Err(HubError::IndexDuplicate {
                repo: w[0].repo.clone(),
                first: w[0].split,
                second: w[1].split,
            });
        }
        Ok(rows)
    }

    pub(super) fn resolve_many(
        &self,
        repos: &[RepoRef],
        revision: &str,
        obs: &dyn Observer,
    ) -> Result<Vec<String>, HubError> {
        let done = AtomicU64::new(0);
        let total = repos.len() as u64;
        let results = self.parallel(repos, |_, r| {
            let sha = self.resolve(r, revision);
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            if d.is_multiple_of(50) || d == total {
                obs.progress(d, total, &format!("resolved {d}/{total} repos"));
            }
            sha
        });
        self.collect(results)
    }
}

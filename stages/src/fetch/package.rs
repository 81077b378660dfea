//! `fetch` from a package registry: one pinned npm, PyPI or Debian archive, fetched with the
//! ordinary client, checked against its sha256 and unpacked (safely) into the artifact.
//!
//! ```toml
//! [stage.emoji]
//! kind = "fetch"
//! source = "npm"                     # npm | pypi | deb
//! package = "emoji-datasource"
//! version = "16.0.0"
//! sha256 = "2006725061dc0098daa832d65f854a7bec0740af2eb47cb5b23d89f7e2c849f9"
//! ```
//! The pin is the content identity, so the key never needs the network, and the archive is kept
//! in [`probex_fetch::packages::default_download_dir`] so a second experiment (or a collected cache)
//! does not download it again.

use probex_engine::{Outcome, ParamError, RunContext, StageResult};

use super::{FetchParams, Source};
use probex_fetch::packages::{
    self, Manager, PackageError, PackageSpec, cached_package, default_download_dir, fetch_package,
};

/// The client that serves `source`, if it is a package source.
pub fn manager(source: Source) -> Option<Manager> {
    match source {
        Source::Npm => Some(Manager::Npm),
        Source::Pypi => Some(Manager::Pypi),
        Source::Deb => Some(Manager::Deb),
        Source::Dir | Source::Hub => None,
    }
}

/// The pinned archive these params name.
pub fn spec(p: &FetchParams) -> Result<PackageSpec, ParamError> {
    let manager = manager(p.source).ok_or("not a package source")?;
    let field = |name: &str, v: &Option<String>| {
        v.clone().ok_or_else(|| {
            format!(
                "source = \"{manager}\" needs `{name}` (the package is pinned by `package`, \
                 `version` and the archive's `sha256`)"
            )
        })
    };
    let spec = PackageSpec {
        manager,
        name: field("package", &p.package)?,
        version: field("version", &p.version)?,
        sha256: field("sha256", &p.sha256)?,
    };
    spec.validate().map_err(|e| match e {
        // The spec's `name` is the stage's `package`.
        PackageError::InvalidSpec { field, .. } => {
            ParamError::at(if field == "name" { "package" } else { field }, e)
        }
        e => ParamError::whole(e),
    })?;
    Ok(spec)
}

/// The key's source identity: the pin itself (the archive's bytes are fixed by its sha256).
pub fn identity(p: &FetchParams) -> Result<String, ParamError> {
    let s = spec(p)?;
    Ok(format!(
        "package:{}:{}:{}:{}",
        s.manager,
        s.name,
        s.version,
        s.sha256.to_ascii_lowercase()
    ))
}

/// Downloads (or finds) the archive and unpacks it into the artifact.
pub fn run(p: &FetchParams, cx: &RunContext) -> StageResult<Outcome> {
    let spec = spec(p)?;
    let downloads = default_download_dir();
    let archive = match cached_package(&spec, &downloads)? {
        Some(hit) => {
            cx.log(format!("{spec}: {} (cached)", hit.display()));
            hit
        }
        None if cx.offline() => anyhow::bail!(
            "{spec} is not in {} and probex runs offline; run once without `--offline`, or \
             place the archive (sha256 {}) in {}/{}/",
            downloads.display(),
            spec.sha256,
            downloads.display(),
            spec.sha256.to_ascii_lowercase()
        ),
        None => {
            cx.log(format!("{spec}: fetching with the {} client", spec.manager));
            fetch_package(&spec, &downloads)?
        }
    };
    cx.check_cancelled()?;
    let limits = p.unpack.clone().unwrap_or_default();
    let report = packages::unpack(&archive, cx.out_dir(), &limits)?;
    cx.log(format!(
        "unpacked {} files, {:.1} MB ({:?}){}",
        report.files,
        report.bytes as f64 / 1e6,
        report.format,
        if report.links_skipped.is_empty() {
            String::new()
        } else {
            format!("; {} links skipped", report.links_skipped.len())
        }
    ));
    Ok(Outcome {
        meta: serde_json::json!({ "package": spec, "unpacked": report }),
        ..Outcome::default()
    })
}

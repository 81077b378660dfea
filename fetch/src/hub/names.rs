//! The names a Hub fetch is asked for (repo ids, revisions, file paths), checked before any
//! request: the rules the Hub itself applies, and paths that cannot leave the folder they are
//! joined to.

use std::path::{Component, Path, PathBuf};

/// A repo id, revision or file path that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// A repo id that breaks the Hub's rules.
    #[error("`{id}` is not a Hub repo id ({why}); write it as `owner/name`")]
    BadRepoId {
        /// The id as given.
        id: String,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// A revision that cannot name a branch, tag or commit safely.
    #[error("`{0}` is not a usable revision (a branch, tag or 40-hex commit)")]
    BadRevision(String),
    /// A file path that cannot be placed inside the repo's folder.
    #[error("file path {path:?} {problem}")]
    BadPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// Checks a repo id: `owner/name`, each part of letters, digits, `-`, `_`, `.`, no `--` at the
/// ends, no `..`, at most 96 characters per part (the Hub's rules).
pub fn check_repo_id(id: &str) -> Result<(), NameError> {
    let bad = |why: &'static str| {
        Err(NameError::BadRepoId {
            id: id.to_owned(),
            why,
        })
    };
    let Some((owner, name)) = id.split_once('/') else {
        return bad("no `/`");
    };
    for part in [owner, name] {
        if part.is_empty() || part.len() > 96 {
            return bad("a part is empty or too long");
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return bad("only letters, digits, `-`, `_` and `.` are allowed");
        }
        if part.contains("..") || part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return bad("`..`, or `-`/`.` at an end");
        }
    }
    Ok(())
}

/// Checks a revision (branch, tag or commit): no empty, `.`/`..` or hidden components, printable
/// ASCII without spaces or `\`. `refs/pr/1` style names are allowed.
pub fn check_revision(rev: &str) -> Result<(), NameError> {
    let ok = !rev.is_empty()
        && rev.len() <= 256
        && rev.chars().all(|c| {
            c.is_ascii_graphic() && !matches!(c, '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')
        })
        && rev
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != ".." && !p.starts_with('.'));
    if ok {
        Ok(())
    } else {
        Err(NameError::BadRevision(rev.to_owned()))
    }
}

/// Whether `s` is a full commit sha (40 lowercase hex digits).
pub fn is_commit(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Turns a repo-relative file path from the server into a relative path that stays inside the
/// directory it is joined to, or explains why it cannot.
pub fn safe_rel_path(path: &str) -> Result<PathBuf, NameError> {
    let bad = |problem: &'static str| NameError::BadPath {
        path: path.to_owned(),
        problem,
    };
    if path.is_empty() || path.len() > 4096 || path.contains('\0') || path.contains('\\') {
        return Err(bad("is not usable"));
    }
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            _ => {
                return Err(bad("leaves the repo (absolute, `.` or `..`); refused"));
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(bad("is empty"));
    }
    Ok(out)
}

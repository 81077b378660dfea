//! What a committed entry records about itself, and the checks a manifest must pass on read.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{FileStamp, Key, Referent};

/// The manifest format this crate writes and reads; bumped when the layout changes meaning.
pub const MANIFEST_FORMAT: u32 = 1;

/// Caller-supplied description of an entry, stored in its manifest at commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// The stage kind that produced the entry (e.g. "extract"); shown by listings.
    pub kind: String,
    /// A human-readable label (e.g. the node name); shown by listings.
    pub label: String,
    /// Free-form metadata the engine wants to keep with the entry (params, timings, ...).
    pub meta: serde_json::Value,
    /// Files outside the entry that its files refer to, with the stamps the stage read them
    /// under: a layer dataset that points into fetched model files instead of copying them.
    /// The entry is valid only while they keep those stamps, and `gc` keeps the entries that
    /// hold them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<Referent>,
}

/// A file outside an entry that the entry's files refer to, as recorded at commit: where it
/// is, and the stamp (size, modification time, inode) the stage read it under, a cheap check
/// that it is unchanged. The stamp's fields are inline, as manifests had them before inodes
/// were recorded (`serde(flatten)` cannot carry the i128 time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// The cache entry holding the file, when it is in this cache (`gc` keeps that entry as
    /// long as this one), or `None` for a file outside the cache.
    pub entry: Option<Key>,
    /// The file: relative to that entry's data folder (`/`-separated), or absolute.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// Inode number; 0 (not compared) in manifests written before it was recorded.
    #[serde(default)]
    pub inode: u64,
}

impl Reference {
    /// The stamp the file had when the entry's stage read it.
    pub fn stamp(&self) -> FileStamp {
        FileStamp {
            size: self.size,
            mtime_ns: self.mtime_ns,
            inode: self.inode,
        }
    }
}

/// One file of an entry, as recorded at commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    /// Path relative to the entry's data folder, `/`-separated, never absolute, never `..`.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 digest of the content, 64 lowercase hex characters.
    pub blake3: String,
}

/// The `manifest.json` of a committed entry. Written last at commit; its presence is what makes
/// an entry exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`] at the time of writing.
    pub format: u32,
    /// The entry's key; must match the directory it sits in.
    pub key: Key,
    /// See [`EntryInfo::kind`].
    pub kind: String,
    /// See [`EntryInfo::label`].
    pub label: String,
    /// Commit time, seconds since the Unix epoch; `gc`'s `older_than` compares against it.
    pub created_unix: u64,
    /// Every file under the data folder, sorted by path. Empty directories are not recorded.
    pub files: Vec<FileRecord>,
    /// See [`EntryInfo::meta`].
    pub meta: serde_json::Value,
    /// [`content_digest`] of `files`: one hash that changes iff any path, size or content does.
    /// Downstream keys are built from it.
    pub content_digest: String,
    /// Files outside the entry its files refer to (see [`EntryInfo::references`]). What they
    /// hold is not in `content_digest`: the files that refer to them name their content.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<Reference>,
}

/// A committed entry: its key, where its files are, and its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The entry's key.
    pub key: Key,
    /// The data folder: the files the stage wrote, at the paths the manifest lists.
    pub dir: PathBuf,
    /// The parsed and validated manifest.
    pub manifest: Manifest,
}

impl Entry {
    /// Total size in bytes of the entry's files (as recorded in the manifest).
    pub fn size(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.size).sum()
    }

    /// The on-disk path of a file the manifest lists, or `None` if it lists no such file.
    pub fn file(&self, rel: &str) -> Option<PathBuf> {
        self.manifest
            .files
            .iter()
            .any(|f| f.path == rel)
            .then(|| join_rel(&self.dir, rel))
    }

    /// The content digest of the entry; see [`Manifest::content_digest`].
    pub fn content_digest(&self) -> &str {
        &self.manifest.content_digest
    }
}

/// Joins a validated `/`-separated relative path onto a directory.
pub(crate) fn join_rel(dir: &Path, rel: &str) -> PathBuf {
    let mut p = dir.to_path_buf();
    p.extend(rel.split('/'));
    p
}

/// The digest of a list of file records: blake3 over the records sorted by path, each encoded
/// as `len(path) as u64 LE ‖ path ‖ size as u64 LE ‖ blake3 hex`. The length prefix makes the
/// encoding unambiguous; sorting makes it independent of the order files were found in.
pub fn content_digest(files: &[FileRecord]) -> String {
    let mut sorted: Vec<&FileRecord> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = blake3::Hasher::new();
    h.update(b"probex-cache content v1\0");
    for f in sorted {
        h.update(&(f.path.len() as u64).to_le_bytes());
        h.update(f.path.as_bytes());
        h.update(&f.size.to_le_bytes());
        h.update(f.blake3.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// A path in a manifest (or one a stage wrote) that could leave the data folder.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelPathError {
    /// An empty path.
    #[error("empty path")]
    Empty,
    /// An absolute path.
    #[error("path `{0}` is absolute")]
    Absolute(String),
    /// A path with a backslash or NUL.
    #[error("path `{path}` contains {found:?}")]
    BadChar {
        /// The path.
        path: String,
        /// The character.
        found: char,
    },
    /// A path with an empty, `.` or `..` component.
    #[error("path `{path}` has {}", component_note(component))]
    BadComponent {
        /// The path.
        path: String,
        /// The component (empty for `a//b`).
        component: String,
    },
}

/// "an empty component" or "a `..` component".
fn component_note(c: &str) -> String {
    if c.is_empty() {
        "an empty component".to_string()
    } else {
        format!("a `{c}` component")
    }
}

/// Why a committed entry's manifest is refused ([`Manifest::validate`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// A format this store does not read.
    #[error("format {0} is not the supported format {MANIFEST_FORMAT}")]
    Format(u32),
    /// The manifest names another key than its directory.
    #[error("it names key {named} but sits in the directory of key {dir}")]
    WrongKey {
        /// The key it names.
        named: String,
        /// The key of its directory.
        dir: String,
    },
    /// A reference inside an entry with a bad path.
    #[error("reference `{path}`: {error}")]
    Reference {
        /// The reference's path.
        path: String,
        /// What is wrong with it.
        error: RelPathError,
    },
    /// A reference that is neither in an entry nor absolute.
    #[error("reference `{0}` is neither in an entry nor an absolute path")]
    LooseReference(String),
    /// A file with a bad path.
    #[error(transparent)]
    Path(#[from] RelPathError),
    /// A file with a malformed digest.
    #[error("file `{path}` has a malformed blake3 digest `{digest}`")]
    FileDigest {
        /// The file.
        path: String,
        /// Its digest.
        digest: String,
    },
    /// A file listed twice.
    #[error("file `{0}` is listed twice")]
    Twice(String),
    /// A file that is also a directory of another file.
    #[error("`{parent}` is listed as a file but is a directory of `{path}`")]
    FileIsDir {
        /// The file listed as a directory.
        parent: String,
        /// The file below it.
        path: String,
    },
    /// A malformed content digest.
    #[error("malformed content digest `{0}`")]
    ContentDigest(String),
    /// A content digest that does not match the file list.
    #[error("content digest {found} does not match its file list (expected {expected})")]
    ContentMismatch {
        /// The digest it holds.
        found: String,
        /// The digest of its file list.
        expected: String,
    },
}

/// Checks that a manifest path is relative, `/`-separated and stays inside the data folder.
/// Commit applies the same rule to what a stage wrote, so every committed path passes.
pub(crate) fn check_rel_path(p: &str) -> Result<(), RelPathError> {
    if p.is_empty() {
        return Err(RelPathError::Empty);
    }
    if p.starts_with('/') || Path::new(p).is_absolute() {
        return Err(RelPathError::Absolute(p.to_owned()));
    }
    if let Some(c) = p.chars().find(|c| matches!(c, '\\' | '\0')) {
        return Err(RelPathError::BadChar {
            path: p.to_owned(),
            found: c,
        });
    }
    for comp in p.split('/') {
        if matches!(comp, "" | "." | "..") {
            return Err(RelPathError::BadComponent {
                path: p.to_owned(),
                component: comp.to_owned(),
            });
        }
    }
    Ok(())
}

/// Whether `s` is 64 lowercase hex characters.
pub(crate) fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Manifest {
    /// Validates an untrusted manifest read from `entries/../<key>/`: format, key, every path,
    /// every digest, no duplicates or file/directory clashes, and the content digest.
    pub fn validate(&self, key: &Key) -> Result<(), ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format(self.format));
        }
        if &self.key != key {
            return Err(ManifestError::WrongKey {
                named: self.key.to_string(),
                dir: key.to_string(),
            });
        }
        for r in &self.references {
            match &r.entry {
                Some(_) => check_rel_path(&r.path).map_err(|error| ManifestError::Reference {
                    path: r.path.clone(),
                    error,
                })?,
                None if !Path::new(&r.path).is_absolute() => {
                    return Err(ManifestError::LooseReference(r.path.clone()));
                }
                None => {}
            }
        }
        let mut seen = HashSet::with_capacity(self.files.len());
        for f in &self.files {
            check_rel_path(&f.path)?;
            if !is_hex64(&f.blake3) {
                return Err(ManifestError::FileDigest {
                    path: f.path.clone(),
                    digest: f.blake3.clone(),
                });
            }
            if !seen.insert(f.path.as_str()) {
                return Err(ManifestError::Twice(f.path.clone()));
            }
        }
        for f in &self.files {
            // A path that is also a parent directory of another path cannot exist on disk.
            let mut rest = f.path.as_str();
            while let Some((parent, _)) = rest.rsplit_once('/') {
                if seen.contains(parent) {
                    return Err(ManifestError::FileIsDir {
                        parent: parent.to_owned(),
                        path: f.path.clone(),
                    });
                }
                rest = parent;
            }
        }
        if !is_hex64(&self.content_digest) {
            return Err(ManifestError::ContentDigest(self.content_digest.clone()));
        }
        let expected = content_digest(&self.files);
        if expected != self.content_digest {
            return Err(ManifestError::ContentMismatch {
                found: self.content_digest.clone(),
                expected,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str, size: u64, fill: char) -> FileRecord {
        FileRecord {
            path: path.into(),
            size,
            blake3: fill.to_string().repeat(64),
        }
    }

    fn key() -> Key {
        Key::parse(&"ab".repeat(32)).unwrap()
    }

    fn manifest(files: Vec<FileRecord>) -> Manifest {
        let content_digest = content_digest(&files);
        Manifest {
            format: MANIFEST_FORMAT,
            key: key(),
            kind: "test".into(),
            label: "t".into(),
            created_unix: 1,
            files,
            meta: serde_json::Value::Null,
            content_digest,
            references: Vec::new(),
        }
    }

    #[test]
    fn digest_ignores_order_and_sees_every_field() {
        let a = rec("a", 1, '1');
        let b = rec("d/b", 2, '2');
        let base = content_digest(&[a.clone(), b.clone()]);
        assert_eq!(base, content_digest(&[b.clone(), a.clone()]));
        assert!(is_hex64(&base));
        let mut other = a.clone();
        other.size = 3;
        assert_ne!(base, content_digest(&[other, b.clone()]));
        let mut other = a.clone();
        other.blake3 = "3".repeat(64);
        assert_ne!(base, content_digest(&[other, b.clone()]));
        let mut other = a.clone();
        other.path = "c".into();
        assert_ne!(base, content_digest(&[other, b.clone()]));
        assert_ne!(base, content_digest(&[a]));
    }

    #[test]
    fn rel_paths() {
        for ok in [
            "a",
            "a/b",
            "x.safetensors",
            "dir/sub/f.json",
            "a..b",
            ".hidden",
        ] {
            assert!(check_rel_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            ".",
            "a//b",
            "a/",
            "a\\b",
            "a\0b",
        ] {
            assert!(check_rel_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validate_accepts_a_good_manifest() {
        manifest(vec![rec("a", 1, '1'), rec("d/b", 2, '2')])
            .validate(&key())
            .unwrap();
        manifest(vec![]).validate(&key()).unwrap();
    }

    #[test]
    fn validate_rejects_tampering() {
        let good = manifest(vec![rec("a", 1, '1')]);
        let cases: Vec<(&str, Manifest)> = vec![
            (
                "format",
                Manifest {
                    format: 99,
                    ..good.clone()
                },
            ),
            (
                "key",
                Manifest {
                    key: Key::parse(&"cd".repeat(32)).unwrap(),
                    ..good.clone()
                },
            ),
            ("`..`", manifest(vec![rec("../outside", 1, '1')])),
            ("absolute", manifest(vec![rec("/etc/passwd", 1, '1')])),
            ("twice", manifest(vec![rec("a", 1, '1'), rec("a", 1, '1')])),
            (
                "directory",
                manifest(vec![rec("a", 1, '1'), rec("a/b", 1, '1')]),
            ),
            ("malformed blake3", manifest(vec![rec("a", 1, 'X')])),
            (
                "does not match",
                Manifest {
                    content_digest: "0".repeat(64),
                    ..good.clone()
                },
            ),
            (
                "malformed content digest",
                Manifest {
                    content_digest: "zz".into(),
                    ..good.clone()
                },
            ),
        ];
        for (want, m) in cases {
            let err = m.validate(&key()).expect_err(want).to_string();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
        }
        assert_eq!(
            manifest(vec![rec("a", 1, '1'), rec("a", 1, '1')]).validate(&key()),
            Err(ManifestError::Twice("a".into()))
        );
        assert!(matches!(
            manifest(vec![rec("../outside", 1, '1')]).validate(&key()),
            Err(ManifestError::Path(RelPathError::BadComponent { component, .. })) if component == ".."
        ));
    }

    #[test]
    fn entry_size_and_file_lookup() {
        let e = Entry {
            key: key(),
            dir: PathBuf::from("/c/data"),
            manifest: manifest(vec![rec("a", 5, '1'), rec("d/b", 7, '2')]),
        };
        assert_eq!(e.size(), 12);
        assert_eq!(e.file("d/b"), Some(PathBuf::from("/c/data/d/b")));
        assert_eq!(e.file("nope"), None);
    }
}

//! Safe extraction of package archives (npm `.tgz`, wheels and other zips, `.deb`, plain or
//! xz/zstd-compressed tars).
//!
//! The rules, whatever the format: every entry lands inside the target folder (absolute names
//! and `..` components are refused); only folders and regular files are created, never links or
//! special files, so nothing on disk can redirect a later write; a link whose target stays
//! inside the archive becomes a copy of that file (links to folders or to missing files are
//! listed in the report and skipped), a link pointing outside is refused; device files, FIFOs and
//! sockets are refused; total bytes written, the decompressed stream and the entry count are
//! capped (decompression bombs). Any refusal stops the extraction with an error naming the
//! archive and the entry.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use super::{PackageError, io_err};

/// Caps that stop a hostile or broken archive from filling the disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnpackLimits {
    /// Most bytes written in all (files, and copies made for links). Default 4 GiB.
    pub max_total_bytes: u64,
    /// Most entries (files, folders, links). Default 200,000.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_total_bytes: 4 << 30,
            max_entries: 200_000,
        }
    }
}

/// The container format of an archive, detected from its first bytes (not its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveFormat {
    /// Uncompressed tar.
    Tar,
    /// Gzip-compressed tar (npm `.tgz`).
    TarGz,
    /// Xz-compressed tar.
    TarXz,
    /// Zstandard-compressed tar.
    TarZst,
    /// Zip (Python wheels).
    Zip,
    /// Debian package: only its `data.tar.*` member (the installed files) is extracted.
    Deb,
}

/// What an extraction produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackReport {
    /// Detected format.
    pub format: ArchiveFormat,
    /// Regular files written (link copies included).
    pub files: u64,
    /// Folders created by folder entries.
    pub dirs: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Links materialised as copies of the file they point to.
    pub links_copied: u64,
    /// Links skipped (`link -> target`): they point at a folder or at no file of the archive.
    pub links_skipped: Vec<String>,
}

/// Extracts `archive` into `out_dir` (created if missing; it must be empty otherwise) under the
/// rules of this module, and reports what was written.
pub fn unpack(
    archive: &Path,
    out_dir: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackReport, PackageError> {
    let format = detect(archive)?;
    prepare_out_dir(out_dir)?;
    let root = out_dir.canonicalize().map_err(io_err(out_dir))?;
    let mut ex = Extractor {
        archive: archive.display().to_string(),
        root,
        limits: limits.clone(),
        entries: 0,
        bytes: 0,
        dirs: 0,
        files: BTreeSet::new(),
        links: Vec::new(),
        stream_cap_hit: Rc::new(Cell::new(false)),
    };
    let file = File::open(archive).map_err(io_err(archive))?;
    let reader = BufReader::new(file);
    match format {
        ArchiveFormat::Tar => ex.tar(reader)?,
        ArchiveFormat::TarGz => {
            let capped = ex.cap(flate2::read::GzDecoder::new(reader));
            ex.tar(capped)?
        }
        ArchiveFormat::TarXz => {
            let capped = ex.cap(lzma_rust2::XzReader::new(reader, true));
            ex.tar(capped)?
        }
        ArchiveFormat::TarZst => {
            let decoder = ruzstd::decoding::StreamingDecoder::new(reader)
                .map_err(|e| ex.format(format!("bad zstd stream: {e}")))?;
            let capped = ex.cap(decoder);
            ex.tar(capped)?
        }
        ArchiveFormat::Zip => ex.zip(reader)?,
        ArchiveFormat::Deb => ex.deb(reader)?,
    }
    ex.finish(format)
}

fn detect(archive: &Path) -> Result<ArchiveFormat, PackageError> {
    let mut file = File::open(archive).map_err(io_err(archive))?;
    let mut head = Vec::with_capacity(512);
    (&mut file)
        .take(512)
        .read_to_end(&mut head)
        .map_err(io_err(archive))?;
    let format = if head.starts_with(&[0x1f, 0x8b]) {
        ArchiveFormat::TarGz
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        ArchiveFormat::Zip
    } else if head.starts_with(b"!<arch>\n") {
        ArchiveFormat::Deb
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        ArchiveFormat::TarXz
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ArchiveFormat::TarZst
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        ArchiveFormat::Tar
    } else {
        return Err(PackageError::Format {
            archive: archive.display().to_string(),
            message: "unknown archive format (expected a .tgz, a zip or wheel, a .deb, or a \
                      plain, xz or zstd tar)"
                .into(),
        });
    };
    Ok(format)
}

fn prepare_out_dir(out_dir: &Path) -> Result<(), PackageError> {
    match fs::read_dir(out_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(PackageError::Io {
                    path: out_dir.display().to_string(),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "the unpack folder must be empty or absent",
                    ),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(out_dir).map_err(io_err(out_dir))
        }
        Err(e) => Err(io_err(out_dir)(e)),
    }
}

/// A link seen in the archive, materialised (as a copy) once every file is out.
struct Link {
    /// Where the link lives, relative to the root.
    rel: PathBuf,
    /// What it points at, relative to the root, already checked to stay inside.
    target: PathBuf,
}

/// Reads at most `remaining` bytes, then fails and raises `hit`, so that a decompression bomb
/// is reported as such rather than as a corrupt archive.
struct Capped<R> {
    inner: R,
    remaining: u64,
    hit: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            // One probe byte tells a stream that ends exactly at the cap from one that goes on.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.hit.set(true);
                    Err(io::Error::other(
                        "decompressed stream exceeds the unpack limit",
                    ))
                }
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

struct Extractor {
    archive: String,
    root: PathBuf,
    limits: UnpackLimits,
    entries: u64,
    bytes: u64,
    dirs: u64,
    /// Regular files written so far, relative to the root (link copies can only target these).
    files: BTreeSet<PathBuf>,
    links: Vec<Link>,
    stream_cap_hit: Rc<Cell<bool>>,
}

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

impl Extractor {
    fn format(&self, message: String) -> PackageError {
        PackageError::Format {
            archive: self.archive.clone(),
            message,
        }
    }

    fn refuse(&self, entry: &[u8], reason: impl Into<String>) -> PackageError {
        PackageError::Unsafe {
            archive: self.archive.clone(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    fn bomb(&self, what: String) -> PackageError {
        PackageError::Bomb {
            archive: self.archive.clone(),
            what,
        }
    }

    /// Maps a read error of the (decompressed) stream: a cap hit is a bomb, anything else a
    /// corrupt archive.
    fn stream_err(&self, e: io::Error, context: &str) -> PackageError {
        if self.stream_cap_hit.get() {
            self.bomb(format!(
                "the decompressed data exceeds {} bytes",
                self.stream_cap()
            ))
        } else {
            self.format(format!("{context}: {e}"))
        }
    }

    /// Headers, padding and names are not counted in `max_total_bytes`; allow for them.
    fn stream_cap(&self) -> u64 {
        self.limits
            .max_total_bytes
            .saturating_add(self.limits.max_entries.saturating_mul(1536))
            .saturating_add(1 << 20)
    }

    fn cap<R: Read>(&self, inner: R) -> Capped<R> {
        Capped {
            inner,
            remaining: self.stream_cap(),
            hit: self.stream_cap_hit.clone(),
        }
    }

    fn count_entry(&mut self) -> Result<(), PackageError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(self.bomb(format!("more than {} entries", self.limits.max_entries)));
        }
        Ok(())
    }

    /// The entry's path relative to the root, or `None` for the root itself (`./`).
    fn rel(&self, raw: &[u8]) -> Result<Option<PathBuf>, PackageError> {
        let Ok(name) = std::str::from_utf8(raw) else {
            return Err(self.refuse(raw, "has a name that is not UTF-8"));
        };
        if name.starts_with('/') {
            return Err(self.refuse(raw, "has an absolute path (outside the target folder)"));
        }
        if name.contains('\\') {
            return Err(self.refuse(raw, "contains a backslash (ambiguous path separator)"));
        }
        let mut rel = PathBuf::new();
        for part in name.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    return Err(self.refuse(raw, "climbs out of the target folder with `..`"));
                }
                p => rel.push(p),
            }
        }
        Ok((!rel.as_os_str().is_empty()).then_some(rel))
    }

    fn dir(&mut self, rel: &Path) -> Result<(), PackageError> {
        let path = self.root.join(rel);
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        self.dirs += 1;
        Ok(())
    }

    fn file(
        &mut self,
        raw: &[u8],
        rel: PathBuf,
        reader: &mut dyn Read,
        declared: u64,
        executable: bool,
    ) -> Result<(), PackageError> {
        let remaining = self.limits.max_total_bytes - self.bytes;
        if declared > remaining {
            return Err(self.bomb(format!(
                "entry `{}` declares {declared} bytes, more than the {remaining} left of the \
                 {}-byte limit",
                String::from_utf8_lossy(raw),
                self.limits.max_total_bytes
            )));
        }
        let path = self.root.join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let mut out = File::create(&path).map_err(io_err(&path))?;
        let written = io::copy(&mut reader.take(remaining + 1), &mut out)
            .map_err(|e| self.stream_err(e, &format!("reading `{}`", rel.display())))?;
        if written > remaining {
            return Err(self.bomb(format!(
                "the files exceed the {}-byte limit (at `{}`)",
                self.limits.max_total_bytes,
                rel.display()
            )));
        }
        self.bytes += written;
        set_mode(&path, executable)?;
        self.files.insert(rel);
        Ok(())
    }

    /// Records a link for later copying; refuses one whose target leaves the root. Symbolic
    /// targets are relative to the link's folder, hard-link targets to the archive root.
    fn link(
        &mut self,
        raw: &[u8],
        rel: PathBuf,
        target_raw: &[u8],
        symbolic: bool,
    ) -> Result<(), PackageError> {
        let Ok(target) = std::str::from_utf8(target_raw) else {
            return Err(self.refuse(raw, "is a link whose target is not UTF-8"));
        };
        let outside = || {
            self.refuse(
                raw,
                format!("is a link to `{target}`, outside the target folder"),
            )
        };
        if target.starts_with('/') {
            return Err(outside());
        }
        let mut parts: Vec<String> = if symbolic {
            rel.parent()
                .map(|p| p.iter().map(|c| c.to_string_lossy().into_owned()).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        for part in target.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err(outside());
                    }
                }
                p => parts.push(p.to_string()),
            }
        }
        self.links.push(Link {
            rel,
            target: parts.iter().collect(),
        });
        Ok(())
    }

    fn finish(mut self, format: ArchiveFormat) -> Result<UnpackReport, PackageError> {
        let mut links_copied = 0;
        let mut links_skipped = Vec::new();
        for link in std::mem::take(&mut self.links) {
            if !self.files.contains(&link.target) {
                links_skipped.push(format!(
                    "{} -> {}",
                    link.rel.display(),
                    link.target.display()
                ));
                continue;
            }
            let from = self.root.join(&link.target);
            let to = self.root.join(&link.rel);
            let size = fs::metadata(&from).map_err(io_err(&from))?.len();
            if size > self.limits.max_total_bytes - self.bytes {
                return Err(self.bomb(format!(
                    "copying links exceeds the {}-byte limit (at `{}`)",
                    self.limits.max_total_bytes,
                    link.rel.display()
                )));
            }
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            fs::copy(&from, &to).map_err(io_err(&to))?;
            self.bytes += size;
            self.files.insert(link.rel);
            links_copied += 1;
        }
        Ok(UnpackReport {
            format,
            files: self.files.len() as u64,
            dirs: self.dirs,
            bytes: self.bytes,
            links_copied,
            links_skipped,
        })
    }

    fn tar<R: Read>(&mut self, reader: R) -> Result<(), PackageError> {
        use tar::EntryType as T;
        let mut archive = tar::Archive::new(reader);
        let entries = archive
            .entries()
            .map_err(|e| self.stream_err(e, "reading the tar"))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| self.stream_err(e, "reading a tar header"))?;
            self.count_entry()?;
            let raw = entry.path_bytes().into_owned();
            let kind = entry.header().entry_type();
            match kind {
                T::Regular | T::Continuous => {
                    let Some(rel) = self.rel(&raw)? else {
                        return Err(self.refuse(&raw, "is a file without a name"));
                    };
                    let declared = entry
                        .header()
                        .size()
                        .map_err(|e| self.format(format!("bad size field: {e}")))?;
                    let mode = entry.header().mode().unwrap_or(0o644);
                    self.file(&raw, rel, &mut entry, declared, mode & 0o111 != 0)?;
                }
                T::Directory => {
                    if let Some(rel) = self.rel(&raw)? {
                        self.dir(&rel)?;
                    }
                }
                T::Symlink | T::Link => {
                    let Some(rel) = self.rel(&raw)? else {
                        return Err(self.refuse(&raw, "is a link without a name"));
                    };
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    self.link(&raw, rel, &target, kind == T::Symlink)?;
                }
                T::Char | T::Block => {
                    return Err(self.refuse(&raw, "is a device file"));
                }
                T::Fifo => {
                    return Err(self.refuse(&raw, "is a FIFO (special file)"));
                }
                // Metadata records, not files.
                T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {}
                other => {
                    return Err(self.refuse(
                        &raw,
                        format!(
                            "has unsupported tar entry type {:?}",
                            other.as_byte() as char
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn zip<R: Read + io::Seek>(&mut self, reader: R) -> Result<(), PackageError> {
        let mut archive =
            zip::ZipArchive::new(reader).map_err(|e| self.format(format!("bad zip: {e}")))?;
        if archive.len() as u64 > self.limits.max_entries {
            return Err(self.bomb(format!(
                "{} entries, more than the limit of {}",
                archive.len(),
                self.limits.max_entries
            )));
        }
        for i in 0..archive.len() {
            let mut file = archive
                .by_index(i)
                .map_err(|e| self.format(format!("zip entry {i}: {e}")))?;
            self.count_entry()?;
            let raw = file.name_raw().to_vec();
            let mode = file.unix_mode().unwrap_or(0);
            let kind = mode & S_IFMT;
            let is_dir = file.is_dir() || kind == S_IFDIR;
            match kind {
                0 | S_IFREG | S_IFDIR => {}
                S_IFLNK => {
                    let Some(rel) = self.rel(&raw)? else {
                        return Err(self.refuse(&raw, "is a link without a name"));
                    };
                    let mut target = Vec::new();
                    (&mut file)
                        .take(4096)
                        .read_to_end(&mut target)
                        .map_err(|e| self.format(format!("zip entry {i}: {e}")))?;
                    self.link(&raw, rel, &target, true)?;
                    continue;
                }
                0o020000 | 0o060000 => return Err(self.refuse(&raw, "is a device file")),
                0o010000 => return Err(self.refuse(&raw, "is a FIFO (special file)")),
                _ => return Err(self.refuse(&raw, format!("has special file mode {mode:o}"))),
            }
            if is_dir {
                if let Some(rel) = self.rel(&raw)? {
                    self.dir(&rel)?;
                }
                continue;
            }
            let Some(rel) = self.rel(&raw)? else {
                return Err(self.refuse(&raw, "is a file without a name"));
            };
            let declared = file.size();
            self.file(&raw, rel, &mut file, declared, mode & 0o111 != 0)?;
        }
        Ok(())
    }

    fn deb<R: Read>(&mut self, reader: R) -> Result<(), PackageError> {
        let mut archive = ar::Archive::new(reader);
        let mut found = false;
        while let Some(member) = archive.next_entry() {
            let member = member.map_err(|e| self.format(format!("bad ar archive: {e}")))?;
            let id = String::from_utf8_lossy(member.header().identifier()).into_owned();
            let id = id.trim_end_matches('/');
            if !id.starts_with("data.tar") {
                continue;
            }
            if found {
                return Err(self.format("more than one data.tar member".into()));
            }
            found = true;
            match id {
                "data.tar" => {
                    let capped = self.cap(member);
                    self.tar(capped)?
                }
                "data.tar.gz" => {
                    let capped = self.cap(flate2::read::GzDecoder::new(member));
                    self.tar(capped)?
                }
                "data.tar.xz" => {
                    let capped = self.cap(lzma_rust2::XzReader::new(member, true));
                    self.tar(capped)?
                }
                "data.tar.zst" => {
                    let decoder = ruzstd::decoding::StreamingDecoder::new(member)
                        .map_err(|e| self.format(format!("bad zstd stream in {id}: {e}")))?;
                    let capped = self.cap(decoder);
                    self.tar(capped)?
                }
                other => {
                    return Err(self.format(format!(
                        "unsupported compression of the Debian data member `{other}` (supported: \
                         data.tar, .gz, .xz, .zst)"
                    )));
                }
            }
        }
        if !found {
            return Err(self.format("no data.tar member: not a Debian package".into()));
        }
        Ok(())
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, executable: bool) -> Result<(), PackageError> {
    use std::os::unix::fs::PermissionsExt;
    // Setuid, setgid, sticky and world-writable bits from the archive are dropped on purpose.
    let mode = if executable { 0o755 } else { 0o644 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _executable: bool) -> Result<(), PackageError> {
    Ok(())
}

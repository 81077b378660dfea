use std::fs;
use std::io::Write;
use std::path::Path;

use tar::EntryType;

use super::*;

/// Appends one tar entry with the name bytes written raw into the header, so tests can build
/// the hostile names that `tar::Builder` itself refuses to write.
fn entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: EntryType,
    data: &[u8],
    link: Option<&str>,
) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(if name.ends_with(".sh") { 0o755 } else { 0o644 });
    if let Some(l) = link {
        h.set_link_name_literal(l).unwrap();
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn tar_bytes(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

fn unsafe_reason(r: Result<UnpackReport, PackageError>) -> String {
    match r {
        Err(PackageError::Unsafe { reason, entry, .. }) => format!("{entry}: {reason}"),
        other => panic!("expected an Unsafe error, got {other:?}"),
    }
}

fn is_bomb(r: &Result<UnpackReport, PackageError>) -> bool {
    matches!(r, Err(PackageError::Bomb { .. }))
}

/// Everything under `dir`, relative, sorted (to show nothing landed elsewhere).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn tgz_with_files_folders_and_inside_links_unpacks() {
    let t = tempfile::tempdir().unwrap();
    let bytes = gz(&tar_bytes(|b| {
        entry(b, "package/", EntryType::Directory, b"", None);
        entry(b, "package/data/a.txt", EntryType::Regular, b"alpha", None);
        entry(
            b,
            "./package/run.sh",
            EntryType::Regular,
            b"#!/bin/sh\n",
            None,
        );
        entry(
            b,
            "package/link.txt",
            EntryType::Symlink,
            b"",
            Some("data/a.txt"),
        );
        entry(
            b,
            "package/data/up.txt",
            EntryType::Symlink,
            b"",
            Some("../run.sh"),
        );
        entry(
            b,
            "package/hard.txt",
            EntryType::Link,
            b"",
            Some("package/data/a.txt"),
        );
        entry(b, "package/dirlink", EntryType::Symlink, b"", Some("data"));
        entry(b, "package/dangling", EntryType::Symlink, b"", Some("nope"));
    }));
    let archive = write(t.path(), "p.tgz", &bytes);
    let out = t.path().join("out");
    let r = unpack(&archive, &out, &UnpackLimits::default()).unwrap();
    assert_eq!(r.format, ArchiveFormat::TarGz);
    assert_eq!(fs::read(out.join("package/data/a.txt")).unwrap(), b"alpha");
    assert_eq!(fs::read(out.join("package/link.txt")).unwrap(), b"alpha");
    assert_eq!(fs::read(out.join("package/hard.txt")).unwrap(), b"alpha");
    assert_eq!(
        fs::read(out.join("package/data/up.txt")).unwrap(),
        b"#!/bin/sh\n"
    );
    assert!(
        !fs::symlink_metadata(out.join("package/link.txt"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(r.links_copied, 3);
    assert_eq!(r.links_skipped.len(), 2, "{:?}", r.links_skipped);
    assert_eq!(r.files, 5);
    assert_eq!(r.bytes, 5 + 10 + 5 + 10 + 5);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(out.join("package/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}

#[test]
fn entries_climbing_out_are_refused() {
    let t = tempfile::tempdir().unwrap();
    for name in [
        "../evil.txt",
        "package/../../evil.txt",
        "a/./../../evil.txt",
    ] {
        let bytes = gz(&tar_bytes(|b| {
            entry(b, "package/ok.txt", EntryType::Regular, b"ok", None);
            entry(b, name, EntryType::Regular, b"evil", None);
        }));
        let archive = write(t.path(), "p.tgz", &bytes);
        let out = t.path().join("work/out");
        let _ = fs::remove_dir_all(t.path().join("work"));
        let why = unsafe_reason(unpack(&archive, &out, &UnpackLimits::default()));
        assert!(why.contains("..") && why.contains(name), "{why}");
        assert!(!t.path().join("evil.txt").exists());
        assert!(!t.path().join("work/evil.txt").exists());
        assert_eq!(
            tree(&t.path().join("work")),
            vec!["out", "out/package", "out/package/ok.txt"]
        );
    }
}

#[test]
fn absolute_paths_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("abs.txt");
    let name = target.display().to_string();
    let bytes = gz(&tar_bytes(|b| {
        entry(b, &name, EntryType::Regular, b"evil", None)
    }));
    let archive = write(t.path(), "p.tgz", &bytes);
    let why = unsafe_reason(unpack(
        &archive,
        &t.path().join("out"),
        &UnpackLimits::default(),
    ));
    assert!(why.contains("absolute"), "{why}");
    assert!(!target.exists());
}

#[test]
fn links_pointing_out_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let cases = [
        ("package/l", EntryType::Symlink, "../../etc/passwd"),
        ("l", EntryType::Symlink, ".."),
        ("package/l", EntryType::Symlink, "/etc/passwd"),
        ("package/h", EntryType::Link, "../outside.txt"),
        ("package/h", EntryType::Link, "/etc/passwd"),
    ];
    for (name, kind, target) in cases {
        let bytes = gz(&tar_bytes(|b| entry(b, name, kind, b"", Some(target))));
        let archive = write(t.path(), "p.tgz", &bytes);
        let out = t.path().join("out");
        let _ = fs::remove_dir_all(&out);
        let why = unsafe_reason(unpack(&archive, &out, &UnpackLimits::default()));
        assert!(why.contains("outside") && why.contains(target), "{why}");
    }
}

#[test]
fn device_files_and_fifos_are_refused() {
    let t = tempfile::tempdir().unwrap();
    for (kind, word) in [
        (EntryType::Char, "device"),
        (EntryType::Block, "device"),
        (EntryType::Fifo, "FIFO"),
    ] {
        let bytes = tar_bytes(|b| entry(b, "dev/thing", kind, b"", None));
        let archive = write(t.path(), "p.tar", &bytes);
        let out = t.path().join("out");
        let _ = fs::remove_dir_all(&out);
        let why = unsafe_reason(unpack(&archive, &out, &UnpackLimits::default()));
        assert!(why.contains(word), "{why}");
        assert!(!out.join("dev/thing").exists());
    }
}

#[test]
fn decompression_bombs_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let limits = UnpackLimits {
        max_total_bytes: 1 << 20,
        max_entries: 10,
    };
    // 8 MiB of zeros compresses to a few KiB.
    let zeros = vec![0u8; 8 << 20];
    let bytes = gz(&tar_bytes(|b| {
        entry(b, "big.bin", EntryType::Regular, &zeros, None)
    }));
    assert!(bytes.len() < 100_000);
    let archive = write(t.path(), "bomb.tgz", &bytes);
    let r = unpack(&archive, &t.path().join("out1"), &limits);
    assert!(is_bomb(&r), "{r:?}");
    // Many small files together over the byte cap.
    let chunk = vec![7u8; 300 << 10];
    let bytes = gz(&tar_bytes(|b| {
        for i in 0..5 {
            entry(b, &format!("f{i}"), EntryType::Regular, &chunk, None);
        }
    }));
    let archive = write(t.path(), "many.tgz", &bytes);
    let r = unpack(&archive, &t.path().join("out2"), &limits);
    assert!(is_bomb(&r), "{r:?}");
    // Too many entries.
    let bytes = gz(&tar_bytes(|b| {
        for i in 0..11 {
            entry(b, &format!("e{i}"), EntryType::Regular, b"", None);
        }
    }));
    let archive = write(t.path(), "entries.tgz", &bytes);
    let r = unpack(&archive, &t.path().join("out3"), &limits);
    assert!(is_bomb(&r), "{r:?}");
    // Data that never lands in a file (here the payload of a folder entry, which readers skip)
    // still has to be decompressed: the decompressed stream itself is capped too.
    let bytes = gz(&tar_bytes(|b| {
        entry(b, "d/", EntryType::Directory, &zeros[..4 << 20], None);
        entry(b, "after.txt", EntryType::Regular, b"x", None);
    }));
    let archive = write(t.path(), "hidden.tgz", &bytes);
    let r = unpack(&archive, &t.path().join("out4"), &limits);
    assert!(is_bomb(&r), "{r:?}");
    assert!(!t.path().join("out4/after.txt").exists());
}

#[test]
fn unpack_needs_an_empty_folder() {
    let t = tempfile::tempdir().unwrap();
    let archive = write(
        t.path(),
        "p.tgz",
        &gz(&tar_bytes(|b| {
            entry(b, "a", EntryType::Regular, b"a", None)
        })),
    );
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep"), b"mine").unwrap();
    assert!(unpack(&archive, &out, &UnpackLimits::default()).is_err());
    assert_eq!(fs::read(out.join("keep")).unwrap(), b"mine");
}

#[test]
fn unknown_formats_are_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let archive = write(t.path(), "x.bin", b"definitely not an archive");
    let err = unpack(&archive, &t.path().join("out"), &UnpackLimits::default()).unwrap_err();
    assert!(err.to_string().contains("unknown archive format"), "{err}");
}

fn zip_bytes(build: impl FnOnce(&mut zip::ZipWriter<std::io::Cursor<Vec<u8>>>)) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    build(&mut w);
    w.finish().unwrap().into_inner()
}

fn zopts() -> zip::write::SimpleFileOptions {
    zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated)
}

#[test]
fn wheels_unpack_and_hostile_zips_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let ok = zip_bytes(|w| {
        w.add_directory("pkg/", zopts()).unwrap();
        w.start_file("pkg/__init__.py", zopts()).unwrap();
        w.write_all(b"x = 1\n").unwrap();
        w.start_file("pkg/model/model.safetensors", zopts())
            .unwrap();
        w.write_all(&[1, 2, 3]).unwrap();
        w.add_symlink("pkg/alias.py", "__init__.py", zopts())
            .unwrap();
    });
    let archive = write(t.path(), "pkg-1.0-py3-none-any.whl", &ok);
    let out = t.path().join("ok");
    let r = unpack(&archive, &out, &UnpackLimits::default()).unwrap();
    assert_eq!(r.format, ArchiveFormat::Zip);
    assert_eq!(fs::read(out.join("pkg/__init__.py")).unwrap(), b"x = 1\n");
    assert_eq!(fs::read(out.join("pkg/alias.py")).unwrap(), b"x = 1\n");
    assert_eq!(
        fs::read(out.join("pkg/model/model.safetensors")).unwrap(),
        [1, 2, 3]
    );

    let escape = zip_bytes(|w| {
        w.start_file("../evil.py", zopts()).unwrap();
        w.write_all(b"evil").unwrap();
    });
    let archive = write(t.path(), "escape.whl", &escape);
    let why = unsafe_reason(unpack(
        &archive,
        &t.path().join("e1"),
        &UnpackLimits::default(),
    ));
    assert!(why.contains(".."), "{why}");
    assert!(!t.path().join("evil.py").exists());

    let link_out = zip_bytes(|w| {
        w.add_symlink("pkg/passwd", "../../etc/passwd", zopts())
            .unwrap();
    });
    let archive = write(t.path(), "link.whl", &link_out);
    let why = unsafe_reason(unpack(
        &archive,
        &t.path().join("e2"),
        &UnpackLimits::default(),
    ));
    assert!(why.contains("outside"), "{why}");

    let abs = zip_bytes(|w| {
        w.start_file("/tmp/evil.py", zopts()).unwrap();
        w.write_all(b"evil").unwrap();
    });
    let archive = write(t.path(), "abs.whl", &abs);
    let why = unsafe_reason(unpack(
        &archive,
        &t.path().join("e3"),
        &UnpackLimits::default(),
    ));
    assert!(why.contains("absolute"), "{why}");

    let bomb = zip_bytes(|w| {
        w.start_file("zeros.bin", zopts()).unwrap();
        w.write_all(&vec![0u8; 4 << 20]).unwrap();
    });
    let archive = write(t.path(), "bomb.whl", &bomb);
    let limits = UnpackLimits {
        max_total_bytes: 1 << 20,
        max_entries: 100,
    };
    let r = unpack(&archive, &t.path().join("e4"), &limits);
    assert!(is_bomb(&r), "{r:?}");
}

fn deb_bytes(data_name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = ar::Builder::new(Vec::new());
    for (name, body) in [
        ("debian-binary", b"2.0\n".to_vec()),
        (
            "control.tar.gz",
            gz(&tar_bytes(|b| {
                entry(b, "./control", EntryType::Regular, b"Package: x\n", None)
            })),
        ),
        (data_name, data.to_vec()),
    ] {
        let h = ar::Header::new(name.as_bytes().to_vec(), body.len() as u64);
        b.append(&h, body.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn debs_unpack_their_data_member_in_every_compression() {
    let t = tempfile::tempdir().unwrap();
    let data = tar_bytes(|b| {
        entry(b, "./", EntryType::Directory, b"", None);
        entry(
            b,
            "./usr/share/datasets/x/train.idx",
            EntryType::Regular,
            b"IDX",
            None,
        );
        entry(
            b,
            "./usr/share/doc/x/link",
            EntryType::Symlink,
            b"",
            Some("/usr/share/doc/y"),
        );
    });
    // Absolute symlinks are common in real debs; this one must be refused, so strip it for the
    // positive cases and test it separately.
    let benign = tar_bytes(|b| {
        entry(b, "./", EntryType::Directory, b"", None);
        entry(
            b,
            "./usr/share/datasets/x/train.idx",
            EntryType::Regular,
            b"IDX",
            None,
        );
    });
    let xz = {
        let mut w =
            lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::default()).unwrap();
        w.write_all(&benign).unwrap();
        w.finish().unwrap()
    };
    let zst = ruzstd::encoding::compress_to_vec(
        benign.as_slice(),
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    for (name, body) in [
        ("data.tar.xz", xz),
        ("data.tar.zst", zst),
        ("data.tar.gz", gz(&benign)),
        ("data.tar", benign.clone()),
    ] {
        let archive = write(t.path(), "x.deb", &deb_bytes(name, &body));
        let out = t.path().join(name);
        let r = unpack(&archive, &out, &UnpackLimits::default()).unwrap();
        assert_eq!(r.format, ArchiveFormat::Deb);
        assert_eq!(
            fs::read(out.join("usr/share/datasets/x/train.idx")).unwrap(),
            b"IDX",
            "{name}"
        );
        assert!(
            !out.join("control").exists(),
            "only the data member is extracted"
        );
    }
    let archive = write(t.path(), "y.deb", &deb_bytes("data.tar.gz", &gz(&data)));
    let why = unsafe_reason(unpack(
        &archive,
        &t.path().join("y"),
        &UnpackLimits::default(),
    ));
    assert!(why.contains("outside"), "{why}");
}

fn spec(sha: &str) -> PackageSpec {
    PackageSpec {
        manager: Manager::Npm,
        name: "fake-pkg".into(),
        version: "1.0.0".into(),
        sha256: sha.into(),
    }
}

#[test]
fn specs_are_validated_and_strict() {
    let good = "a".repeat(64);
    assert!(spec(&good).validate().is_ok());
    assert!(spec("abc").validate().is_err());
    let mut s = spec(&good);
    s.name = "--index-url=http://x".into();
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("name"), "{err}");
    let mut s = spec(&good);
    s.version = "1.0 ; rm".into();
    assert!(s.validate().is_err());
    let mut s = spec(&good);
    s.name = "@scope/pkg".into();
    assert!(s.validate().is_ok(), "npm scoped names are allowed");
    s.manager = Manager::Pypi;
    assert!(s.validate().is_err());
    let json = r#"{"manager":"deb","name":"x","version":"1","sha256":"00","extra":1}"#;
    let err = serde_json::from_str::<PackageSpec>(json)
        .unwrap_err()
        .to_string();
    assert!(err.contains("extra"), "{err}");
}

#[cfg(unix)]
fn fake_client(dir: &Path, script: &str) -> Vec<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("fake-npm");
    fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    vec![vec![p.display().to_string()]]
}

#[cfg(unix)]
#[test]
fn fetch_verifies_the_pin_caches_and_explains_failures() {
    let t = tempfile::tempdir().unwrap();
    let dl = t.path().join("dl");
    let content = b"pretend tarball";
    let sha = hex::encode(&Sha256::digest(content));
    // `npm pack NAME@VER --ignore-scripts --pack-destination DIR`: $5 is DIR.
    let writes = fake_client(
        t.path(),
        "printf 'pretend tarball' > \"$5/fake-pkg-1.0.0.tgz\"",
    );
    let clients = Clients {
        npm: writes.clone(),
        ..Clients::default()
    };

    let wrong = "0".repeat(64);
    let err = fetch_package_with(&spec(&wrong), &dl, &clients).unwrap_err();
    assert!(matches!(err, PackageError::Sha256Mismatch { .. }), "{err}");
    assert!(err.to_string().contains(&sha), "{err}");

    let path = fetch_package_with(&spec(&sha), &dl, &clients).unwrap();
    assert_eq!(path, dl.join(&sha).join("fake-pkg-1.0.0.tgz"));
    assert_eq!(fs::read(&path).unwrap(), content);

    // Second fetch: a local hit, the client is not needed any more.
    let gone = Clients {
        npm: vec![vec![t.path().join("no-such-npm").display().to_string()]],
        ..Clients::default()
    };
    assert_eq!(fetch_package_with(&spec(&sha), &dl, &gone).unwrap(), path);

    let other = "1".repeat(64);
    let err = fetch_package_with(&spec(&other), &dl, &gone).unwrap_err();
    assert!(matches!(err, PackageError::ClientMissing { .. }), "{err}");
    assert!(err.to_string().contains("no-such-npm"), "{err}");

    let offline = Clients {
        npm: fake_client(
            t.path(),
            "echo 'npm error code ENOTFOUND' >&2; echo 'npm error network request failed' >&2; exit 1",
        ),
        ..Clients::default()
    };
    let err = fetch_package_with(&spec(&other), &dl, &offline).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PackageError::ClientFailed { .. }), "{msg}");
    assert!(
        msg.contains("ENOTFOUND") && msg.contains("offline"),
        "{msg}"
    );

    let nothing = Clients {
        npm: fake_client(t.path(), "exit 0"),
        ..Clients::default()
    };
    let err = fetch_package_with(&spec(&other), &dl, &nothing).unwrap_err();
    assert!(matches!(err, PackageError::NoArchive { .. }), "{err}");
    // No temporary folders are left behind.
    let left: Vec<_> = fs::read_dir(&dl)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from(&sha)]);
}

//! Test helper for `probex-cache`'s process tests (crash safety and cross-process races); not a
//! user tool. It prints one line per phase so a test can kill it at a chosen moment.
//!
//! ```text
//! probex-cache-crashtest write <root> <key> <big_mib> <chunk_delay_ms> <small_files>
//!     lock, stage, write a big file 1 MiB at a time, then small files, commit
//! probex-cache-crashtest race <root> <key> <hold_ms>
//!     lock; print `hit` if the entry exists, else compute for hold_ms, commit, print `computed`
//! ```

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::thread::sleep;
use std::time::Duration;

use probex_cache::{EntryInfo, Key, Store};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> Res<T>
where
    T::Err: std::fmt::Display,
{
    let raw = args
        .get(i)
        .ok_or_else(|| format!("missing argument <{name}>"))?;
    raw.parse::<T>()
        .map_err(|e| format!("argument <{name}> = `{raw}`: {e}").into())
}

fn info(kind: &str) -> EntryInfo {
    EntryInfo {
        kind: kind.into(),
        label: "crashtest".into(),
        meta: serde_json::json!({ "pid": std::process::id() }),
        references: Vec::new(),
    }
}

/// Deterministic, position-dependent bytes so that a torn or mixed-up write changes the hash.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(args: &[String]) -> Res<()> {
    let store = Store::open(arg::<String>(args, 2, "root")?)?;
    let key: Key = arg::<String>(args, 3, "key")?.parse()?;
    let big_mib: u64 = arg(args, 4, "big_mib")?;
    let delay = Duration::from_millis(arg(args, 5, "chunk_delay_ms")?);
    let small: u64 = arg(args, 6, "small_files")?;
    let lock = store.lock(&key)?;
    println!("locked");
    let staging = store.stage(&lock)?;
    println!("staged");
    let mut big = fs::File::create(staging.dir().join("big.bin"))?;
    for i in 0..big_mib {
        big.write_all(&pattern(i, 1 << 20))?;
        if i == 0 {
            println!("writing");
        }
        sleep(delay);
    }
    drop(big);
    let parts = staging.dir().join("parts");
    fs::create_dir(&parts)?;
    for i in 0..small {
        fs::write(
            parts.join(format!("part-{i:04}.bin")),
            pattern(1000 + i, 4096),
        )?;
    }
    println!("committing");
    let entry = staging.commit(info("crash"))?;
    println!("committed {}", entry.content_digest());
    Ok(())
}

fn race(args: &[String]) -> Res<()> {
    let store = Store::open(arg::<String>(args, 2, "root")?)?;
    let key: Key = arg::<String>(args, 3, "key")?.parse()?;
    let hold = Duration::from_millis(arg(args, 4, "hold_ms")?);
    let lock = store.lock(&key)?;
    if store.get(&key)?.is_some() {
        println!("hit");
        return Ok(());
    }
    let staging = store.stage(&lock)?;
    fs::write(staging.dir().join("out.bin"), pattern(7, 10_000))?;
    sleep(hold);
    staging.commit(info("race"))?;
    println!("computed");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let res = match args.get(1).map(String::as_str) {
        Some("write") => write(&args),
        Some("race") => race(&args),
        _ => Err(format!(
            "usage: {} write|race ... (see the source); got {:?}",
            Path::new(
                args.first()
                    .map(String::as_str)
                    .unwrap_or("probex-cache-crashtest")
            )
            .display(),
            &args[1.min(args.len())..]
        )
        .into()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probex-cache-crashtest: {e}");
            ExitCode::FAILURE
        }
    }
}

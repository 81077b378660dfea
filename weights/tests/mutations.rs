//! A deterministic mutation fuzzer for the safetensors reader: byte flips, truncations, header
//! length rewrites and header-number rewrites of valid files. Every input must give a value or
//! an error (a panic fails the test), and no single allocation may exceed a small multiple of
//! the input (a global allocator records the largest request).
//!
//! `PROBEX_FUZZ_ITERS` sets the number of mutated inputs (default 20,000; the cargo-fuzz
//! targets in `fuzz/` are the long-running version).

mod files;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use files::*;
use probex_weights::{LayerMode, LayerSelector, Safetensors, layer_rows, transform};

struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn file_bytes(tensors: &[T], meta: &[(&str, &str)]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.safetensors");
    write_model(&p, tensors, meta);
    std::fs::read(p).unwrap()
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        file_bytes(
            &[
                f32t("layer.2.weight", &[2, 3], &values(1, 6)),
                f32t("layer.10.weight", &[3, 2], &values(2, 6)),
                f16t("bias", &[4], &values(3, 4)),
                i64t("ids", &[2], &[0, 1]),
            ],
            &[("dataset_chosen_targets", "['apple', 'worm']")],
        ),
        file_bytes(
            &[
                bf16t("conv.weight", &[2, 3, 2, 2], &values(4, 24)),
                f64t("x", &[1, 1, 2], &[1.0, 2.0]),
            ],
            &[],
        ),
        file_bytes(
            &[
                f32t("u.a.to_q.lora.down.weight", &[2, 4], &values(5, 8)),
                f32t("u.a.to_q.lora.up.weight", &[3, 2], &values(6, 6)),
                f16t("u.b.conv.lora.down.weight", &[2, 1, 2, 2], &values(7, 8)),
                f16t("u.b.conv.lora.up.weight", &[3, 2, 1, 1], &values(8, 6)),
            ],
            &[("imagenet_class_id", "n02111277")],
        ),
    ]
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    let header_end = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    for _ in 0..1 + rng.below(3) {
        if b.is_empty() {
            break;
        }
        match rng.below(7) {
            // Flip bytes, mostly in the header where the structure is.
            0 | 1 => {
                let at = rng.below(header_end.min(b.len()));
                b[at] ^= 1 << rng.below(8);
            }
            2 => {
                let at = rng.below(b.len());
                b[at] = rng.next() as u8;
            }
            // Truncate.
            3 => {
                let to = rng.below(b.len() + 1);
                b.truncate(to);
            }
            // Rewrite the header length.
            4 if b.len() >= 8 => {
                let n = match rng.below(4) {
                    0 => rng.next(),
                    1 => (header_end as u64)
                        .wrapping_add(rng.below(16) as u64)
                        .wrapping_sub(8),
                    2 => b.len() as u64,
                    _ => rng.below(200) as u64,
                };
                b[..8].copy_from_slice(&n.to_le_bytes());
            }
            // Rewrite a number in the header (shapes, offsets) or a dtype.
            5 | 6 => {
                let end = header_end.min(b.len());
                let digits: Vec<usize> = (8..end).filter(|&i| b[i].is_ascii_digit()).collect();
                if digits.is_empty() {
                    continue;
                }
                let at = digits[rng.below(digits.len())];
                let mut stop = at;
                while stop < end && b[stop].is_ascii_digit() {
                    stop += 1;
                }
                let new = match rng.below(5) {
                    0 => "0".to_string(),
                    1 => u64::MAX.to_string(),
                    2 => (rng.below(64)).to_string(),
                    3 => "18446744073709551616".to_string(),
                    _ => (rng.next() % 1_000_000).to_string(),
                };
                b.splice(at..stop, new.bytes());
            }
            _ => {}
        }
    }
    b
}

fn exercise(data: &[u8]) {
    let Ok(st) = Safetensors::from_bytes("mutant", data) else {
        return;
    };
    let header = st.header().clone();
    for t in &header.tensors {
        assert_eq!(st.data(t).unwrap().len(), t.span.len());
        if let Ok(v) = st.to_f32(t) {
            assert_eq!(v.len(), t.numel());
        }
        let _ = transform::plan(&t.shape);
    }
    for mode in LayerMode::ALL {
        let Ok(rows) = layer_rows(&header, mode) else {
            continue;
        };
        let all: LayerSelector = "all".parse().unwrap();
        let _ = all.resolve(&rows);
        for r in rows.iter().filter(|r| r.matrix.is_some()) {
            let Some(up) = &r.lora_up else { continue };
            let (Ok(down), Ok(up)) = (st.entry(&r.name), st.entry(up)) else {
                continue;
            };
            let [out, cols] = r.matrix.unwrap();
            if let (Ok(a), Ok(b)) = (st.to_f32(down), st.to_f32(up)) {
                let mut x = Vec::new();
                transform::lora_product(&b, &a, out, down.shape[0], cols, &mut x);
                assert_eq!(x.len(), out * cols);
            }
        }
    }
}

#[test]
fn mutated_files_never_panic_or_allocate_hugely() {
    let iters: usize = std::env::var("PROBEX_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seeds = seeds();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut accepted = 0usize;
    let mut largest_seen = 0usize;
    for i in 0..iters {
        let seed = &seeds[i % seeds.len()];
        let input = mutate(&mut rng, seed);
        LARGEST.store(0, Ordering::Relaxed);
        let input_len = input.len();
        let ok = Safetensors::from_bytes("m", input.as_slice()).is_ok();
        accepted += usize::from(ok);
        exercise(&input);
        let largest = LARGEST.load(Ordering::Relaxed);
        // Decoding f16 to f32 doubles a tensor; parse tables are small; a LoRA product of
        // this size of input stays below the limit too.
        let bound = 4 * input_len + (1 << 16);
        assert!(
            largest <= bound,
            "input {i} ({input_len} bytes) made an allocation of {largest} bytes"
        );
        largest_seen = largest_seen.max(largest);
    }
    eprintln!(
        "{iters} mutated inputs, {accepted} accepted as valid, largest single allocation {largest_seen} bytes"
    );
    assert!(accepted > 0, "the mutator should keep some inputs valid");
}

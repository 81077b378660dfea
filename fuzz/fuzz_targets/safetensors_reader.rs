//! Any bytes given to the safetensors reader: a clear error or a valid header whose every
//! tensor can be sliced, decoded and transformed, never a panic or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use probex_fuzz::weights::{LayerMode, LayerSelector, Safetensors, layer_rows, transform};

fuzz_target!(|data: &[u8]| {
    let Ok(st) = Safetensors::from_bytes("fuzz", data) else {
        return;
    };
    let header = st.header().clone();
    assert!(header.data_start <= data.len());
    for t in &header.tensors {
        let bytes = st.data(t).expect("validated span");
        assert_eq!(bytes.len(), t.span.len());
        if let Ok(v) = st.to_f32(t) {
            assert_eq!(v.len(), t.numel());
        }
        let _ = transform::plan(&t.shape);
    }
    for mode in LayerMode::ALL {
        let Ok(rows) = layer_rows(&header, mode) else { continue };
        for sel in ["all", "0", "1..3", "re:lora", "*.weight"] {
            let sel: LayerSelector = sel.parse().expect("fixed selector");
            let _ = sel.resolve(&rows);
        }
        for r in rows.iter().filter(|r| r.matrix.is_some()) {
            let Some(up) = &r.lora_up else { continue };
            let (Ok(down), Ok(up)) = (st.entry(&r.name), st.entry(up)) else { continue };
            let [out, cols] = r.matrix.expect("filtered");
            // Bounded work per input: the product costs out * r * cols.
            if out.saturating_mul(cols).saturating_mul(down.shape[0]) > 1 << 22 {
                continue;
            }
            if let (Ok(a), Ok(b)) = (st.to_f32(down), st.to_f32(up)) {
                let mut x = Vec::new();
                transform::lora_product(&b, &a, out, down.shape[0], cols, &mut x);
                assert_eq!(x.len(), out * cols);
            }
        }
    }
});

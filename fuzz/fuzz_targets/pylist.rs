//! Any text given to the Python-literal parser: a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = probex_fuzz::pylist::parse(text);
        let _ = probex_fuzz::pylist::parse_str_list(text);
    }
});

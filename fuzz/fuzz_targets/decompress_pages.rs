//! Fuzz target `decompress_pages`: see `livemig_fuzz::decompress_pages_target` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::decompress_pages_target(data));

//! Fuzz target `receive_raw`: see `livemig_fuzz::receive_raw` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::receive_raw(data));

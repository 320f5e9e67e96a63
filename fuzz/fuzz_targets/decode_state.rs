//! Fuzz target `decode_state`: see `livemig_fuzz::decode_state` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::decode_state(data));

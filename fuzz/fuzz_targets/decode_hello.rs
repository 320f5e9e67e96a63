//! Fuzz target `decode_hello`: see `livemig_fuzz::decode_hello` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::decode_hello(data));

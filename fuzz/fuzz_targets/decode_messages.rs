//! Fuzz target `decode_messages`: see `livemig_fuzz::decode_messages` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::decode_messages(data));

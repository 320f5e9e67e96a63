//! Fuzz target `receive_frames`: see `livemig_fuzz::receive_frames` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::receive_frames(data));

//! Fuzz target `frame_reader`: see `livemig_fuzz::frame_reader` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::frame_reader(data));

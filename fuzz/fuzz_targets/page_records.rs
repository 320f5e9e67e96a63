//! Fuzz target `page_records`: see `livemig_fuzz::page_records_target` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig_fuzz::page_records_target(data));

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cumulus_etl_fuzz::checks::check_tape(data));

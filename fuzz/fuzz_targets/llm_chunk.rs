#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| enforcer::fuzzing::llm_chunk(data));

#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| peerlink_fuzz::pairing(data));

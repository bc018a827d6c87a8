#![no_main]

use libfuzzer_sys::fuzz_target;

// BINDs signed with a fixed test key, so mutations reach the code after authentication.
fuzz_target!(|data: &[u8]| ferry::harness::bind_with_test_key(data));

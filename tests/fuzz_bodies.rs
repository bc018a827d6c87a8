//! The fuzz targets' bodies as property tests, so every `cargo test` runs them on random input.

use ferry::harness;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn wire_views(data in prop::collection::vec(any::<u8>(), 0..400)) {
        harness::wire_views(&data);
    }

    #[test]
    fn wire_views_near_valid(ty in 0u8..14, len in 0usize..80, fill in any::<u8>()) {
        let mut d = vec![fill; len];
        if len >= 4 { d[..4].copy_from_slice(&[0xDA, 0x72, 0, ty]); }
        harness::wire_views(&d);
    }

    #[test]
    fn api_bodies(data in prop::collection::vec(any::<u8>(), 0..200), s in "[ -~]{0,40}") {
        harness::api_bodies(&data);
        harness::api_bodies(s.as_bytes());
    }

    #[test]
    fn bind_with_test_key(data in prop::collection::vec(any::<u8>(), 0..300)) {
        harness::bind_with_test_key(&data);
    }

    #[test]
    fn core_sequence(data in prop::collection::vec(any::<u8>(), 0..1500)) {
        harness::core_sequence(&data);
    }
}

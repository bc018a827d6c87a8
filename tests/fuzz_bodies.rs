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
    fn dtls_records(data in prop::collection::vec(any::<u8>(), 0..600)) {
        harness::dtls_records(&data);
    }

    #[test]
    fn dtls_records_near_valid(ct in 20u8..26, epoch in 0u16..3, body in prop::collection::vec(any::<u8>(), 0..120)) {
        let mut d = vec![ct, 0xFE, 0xFD];
        d.extend_from_slice(&epoch.to_be_bytes());
        d.extend_from_slice(&[0; 6]);
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        harness::dtls_records(&d);
    }

    #[test]
    fn fleet_sequence(data in prop::collection::vec(any::<u8>(), 0..400)) {
        harness::fleet_sequence(&data);
    }

    #[test]
    fn ws_frames(data in prop::collection::vec(any::<u8>(), 0..600)) {
        harness::ws_frames(&data);
    }

    #[test]
    fn fastpath_sequence(data in prop::collection::vec(any::<u8>(), 0..1500)) {
        harness::fastpath_sequence(&data);
    }

    #[test]
    fn stun_view(data in prop::collection::vec(any::<u8>(), 0..600)) {
        harness::stun_view(&data);
    }

    #[test]
    fn stun_view_with_attributes(
        attrs in prop::collection::vec((any::<u16>(), prop::collection::vec(any::<u8>(), 0..24)), 0..6),
        fingerprint in any::<bool>(),
        txid in any::<[u8; 12]>(),
    ) {
        // Well-formed layouts with arbitrary attributes, some with a correct FINGERPRINT.
        let mut m = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42];
        m.extend_from_slice(&txid);
        for (kind, v) in &attrs {
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&(v.len() as u16).to_be_bytes());
            m.extend_from_slice(v);
            m.resize(m.len().div_ceil(4) * 4, 0);
        }
        if fingerprint {
            let len = (m.len() - 20 + 8) as u16;
            m[2..4].copy_from_slice(&len.to_be_bytes());
            let crc = ferry::wire::stun::crc32(&m) ^ 0x5354_554e;
            m.extend_from_slice(&[0x80, 0x28, 0, 4]);
            m.extend_from_slice(&crc.to_be_bytes());
        } else {
            let len = (m.len() - 20) as u16;
            m[2..4].copy_from_slice(&len.to_be_bytes());
        }
        // stun_view forces nothing when the first byte is even (0x00 here).
        harness::stun_view(&m);
    }

    #[test]
    fn tunnel_frame(kind in 0u8..9, body in prop::collection::vec(any::<u8>(), 0..64), raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut d = vec![0xF7, 1, kind];
        d.extend_from_slice(&body);
        harness::tunnel_frame(&d);
        harness::tunnel_frame(&raw);
    }

    #[test]
    fn jwt_verify(raw in prop::collection::vec(any::<u8>(), 0..300), parts in "[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,60}") {
        harness::jwt_verify(&raw);
        harness::jwt_verify(parts.as_bytes());
        // A well-formed header naming HS256 with a made-up body and signature.
        let token = format!("eyJhbGciOiJIUzI1NiJ9.{}", parts.split_once('.').map_or("", |p| p.1));
        harness::jwt_verify(token.as_bytes());
    }

    #[test]
    fn core_sequence(data in prop::collection::vec(any::<u8>(), 0..1500)) {
        harness::core_sequence(&data);
    }
}

/// The fast-path body reaches what it checks: over many random runs the twin forwards frames,
/// the kernel alone carries some, links come and go, and the core asks the kernel before
/// expiring a linked allocation.
#[test]
fn fastpath_sequence_reaches_the_kernel_paths() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = prop::collection::vec(any::<u8>(), 200..1500);
    let mut total = harness::Exercised::default();
    for _ in 0..300 {
        let data = proptest::strategy::ValueTree::current(&strategy.new_tree(&mut runner).unwrap());
        let e = harness::fastpath_sequence(&data);
        total.forwarded += e.forwarded;
        total.kernel_only += e.kernel_only;
        total.links_up += e.links_up;
        total.links_down += e.links_down;
        total.kernel_checks += e.kernel_checks;
    }
    println!("{total:?}");
    assert!(total.forwarded > 50 && total.kernel_only > 10, "{total:?}");
    assert!(total.links_up > 20 && total.links_down > 20 && total.kernel_checks > 0, "{total:?}");
}

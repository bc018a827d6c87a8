//! The SDK's peer link on real sockets: a game's datagrams to its peer move to a direct path
//! when one works (loopback here), stay on the relay under the `relay` policy, and arrive once.

mod support;

use std::time::Duration;

use ferry::client::path::{PathConfig, Policy};
use ferry::client::peer::PeerLink;
use ferry::client::RelayClient;
use ferry::wire::AllocationId;
use support::Server;

fn links(srv: &Server, host_policy: Policy, joiner_policy: Policy) -> (PeerLink, PeerLink) {
    let api = srv.api();
    let host = api.allocate(2, None).unwrap();
    let code = api.join_code(&host.allocation_id).unwrap();
    let join = api.join(&code).unwrap();
    let mut h = RelayClient::new(&host).unwrap();
    h.bind().unwrap();
    let mut j = RelayClient::new(&join.allocation).unwrap();
    j.bind().unwrap();
    let host_id = j.connect_b64(&join.host_connection_data).unwrap();
    let joiner_id = AllocationId::parse(&join.allocation.allocation_id).unwrap();
    let cfg = PathConfig::photon(100, 10);
    (
        PeerLink::new(h, joiner_id, host_policy, cfg).unwrap(),
        PeerLink::new(j, host_id, joiner_policy, cfg).unwrap(),
    )
}

/// The joiner sends `n` numbered datagrams; the host echoes each. Returns what came back.
fn exchange(host: &mut PeerLink, joiner: &mut PeerLink, n: u32) -> Vec<u32> {
    std::thread::scope(|s| {
        let echo = s.spawn(|| {
            let mut seen = 0;
            while seen < n {
                match host.recv(Duration::from_secs(10)).unwrap() {
                    Some(d) => {
                        host.send(&d).unwrap();
                        seen += 1;
                    }
                    None => panic!("the host heard nothing for 10 s ({seen} of {n})"),
                }
            }
            // Keep answering probes while the joiner collects the last echoes.
            let _ = host.recv(Duration::from_millis(500));
        });
        let mut back = Vec::new();
        for i in 0..n {
            joiner.send(&i.to_be_bytes()).unwrap();
            while let Some(d) = joiner.recv(Duration::from_millis(20)).unwrap() {
                back.push(u32::from_be_bytes(d[..4].try_into().unwrap()));
            }
        }
        while back.len() < n as usize {
            match joiner.recv(Duration::from_secs(5)).unwrap() {
                Some(d) => back.push(u32::from_be_bytes(d[..4].try_into().unwrap())),
                None => break,
            }
        }
        echo.join().unwrap();
        back
    })
}

#[test]
fn auto_moves_to_the_direct_path_and_nothing_is_lost_or_doubled() {
    let srv = Server::start(|_| {});
    let (mut h, mut j) = links(&srv, Policy::Auto, Policy::Auto);
    let mut back = exchange(&mut h, &mut j, 150);
    back.sort_unstable();
    assert_eq!(back, (0..150).collect::<Vec<_>>(), "every datagram echoed once");
    for (who, l) in [("host", &h), ("joiner", &j)] {
        let st = l.stats();
        assert_eq!(st.route, "direct", "{who}: {st:?}");
        assert!(st.bytes_direct > 0 && st.time_to_direct_ms.is_some(), "{who}: {st:?}");
        assert!(st.rtt_direct_ms.is_some(), "{who}: {st:?}");
    }
}

#[test]
fn the_relay_policy_keeps_everything_on_the_relay() {
    let srv = Server::start(|_| {});
    let (mut h, mut j) = links(&srv, Policy::Relay, Policy::Auto);
    let mut back = exchange(&mut h, &mut j, 60);
    back.sort_unstable();
    assert_eq!(back, (0..60).collect::<Vec<_>>());
    for l in [&h, &j] {
        let st = l.stats();
        assert_eq!((st.route, st.bytes_direct, st.attempts), ("relay", 0, 0), "{st:?}");
        assert!(st.bytes_relay > 0);
    }
}

#[test]
fn a_relay_without_stun_still_gets_candidates_exchanged() {
    // No reflexive address: after 3 s the links offer their interface addresses, so
    // `direct-first` (which waits for a path) does not wait forever.
    let srv = Server::start(|c| c.stun = false);
    let (mut h, mut j) = links(&srv, Policy::DirectFirst, Policy::DirectFirst);
    let mut back = exchange(&mut h, &mut j, 30);
    back.sort_unstable();
    assert_eq!(back, (0..30).collect::<Vec<_>>());
    for l in [&h, &j] {
        let st = l.stats();
        assert_ne!(st.route, "waiting", "{st:?}");
        assert!(st.bytes_direct + st.bytes_relay > 0, "{st:?}");
    }
}

//! Helpers for the tests that build network namespaces (root only).
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::process::Command;

/// Runs a command and fails the test, with its stderr, if it does not succeed.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `f` on a thread inside namespace `ns`: the sockets it makes live there (and stay there
/// wherever they are used later).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
    .join()
    .unwrap()
}

/// Moves the calling thread into the network namespace at `path` (`/run/netns/NAME`).
pub fn enter(path: &str) {
    let fd = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on this thread only, with a namespace descriptor that stays open for the call.
    let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

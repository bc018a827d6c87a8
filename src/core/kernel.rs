//! The core's side of the kernel fast path (`docs/fastpath.md`).
//!
//! With [`CoreConfig::kernel_links`](super::CoreConfig) on, the core publishes each *established*
//! link — a joiner connected to its host, both bound, both addresses confirmed by their clients
//! and allowed by the source policy — as a [`LinkOp::Up`], and withdraws it with a
//! [`LinkOp::Down`] the moment any of that stops being true: DISCONNECT, CLOSE, release, expiry,
//! a rebind of either side, a policy change, or [`Core::withdraw_links`] (drain). The shard applies
//! every queued op before it sends anything the same call produced, so the kernel never forwards
//! to an address the core has stopped using.
//!
//! The kernel forwards a linked pair's RELAYs without the core seeing them, so an allocation
//! with published links is never expired on the spot: when its timer finds it past its deadline
//! the core asks ([`Core::poll_kernel_check`]) when the kernel last forwarded for it, and decides
//! on the answer ([`Core::kernel_seen`]).

use std::net::SocketAddr;

use super::table::{Role, CONFIRMED, NIL};
use super::{Core, ReleaseReason};
use crate::clock::Millis;
use crate::wire::AllocationId;

/// A change to the kernel's table of established links. Each link is two map entries, one per
/// direction, keyed by (sender, recipient) allocation IDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkOp {
    Up { host: AllocationId, host_addr: SocketAddr, joiner: AllocationId, joiner_addr: SocketAddr },
    Down { host: AllocationId, joiner: AllocationId },
}

/// An allocation past its deadline whose traffic the kernel may have carried: the shard looks
/// up these (sender, recipient) entries and answers with [`Core::kernel_seen`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelCheck {
    pub id: AllocationId,
    pub links: Vec<(AllocationId, AllocationId)>,
}

/// How long a check may go unanswered before the timer asks again.
const CHECK_RETRY: Millis = 1_000;

impl Core {
    /// The next change to apply to the kernel's link table.
    pub fn poll_link_op(&mut self) -> Option<LinkOp> {
        self.link_ops.pop_front()
    }

    /// The next allocation whose kernel-side activity decides whether it expires.
    pub fn poll_kernel_check(&mut self) -> Option<KernelCheck> {
        self.kernel_checks.pop_front()
    }

    /// The answer to a [`KernelCheck`]: `seen` is when the kernel last forwarded a RELAY from
    /// `id` (None: never). Expires `id` if it is still past its deadline, re-arms it otherwise.
    pub fn kernel_seen(&mut self, now: Millis, id: &AllocationId, seen: Option<Millis>) {
        self.now = self.now.max(now);
        let super::table::Found::Live(i) = self.table.find(id) else { return };
        let s = &mut self.table.slots[i as usize];
        if let Some(t) = seen {
            s.last_seen = s.last_seen.max(t.min(now));
        }
        if now >= self.deadline(i) {
            self.release(i, ReleaseReason::TimedOut);
        } else {
            self.rearm(i);
        }
    }

    /// Traffic the kernel carried for `id` up to `at`, read from a link's counters before the
    /// link was deleted: it counts toward `id`'s idle timeout like traffic the core saw.
    pub fn kernel_activity(&mut self, id: &AllocationId, at: Millis) {
        if let super::table::Found::Live(i) = self.table.find(id) {
            let s = &mut self.table.slots[i as usize];
            s.last_seen = s.last_seen.max(at.min(self.now));
        }
    }

    /// Withdraws every published link and stops publishing (drain, or a fast path that went
    /// away). Forwarding carries on in userspace.
    pub fn withdraw_links(&mut self) {
        for j in 0..self.table.slots.len() as u32 {
            self.unpublish(j);
        }
        self.cfg.kernel_links = false;
    }

    /// Whether `i` is past its deadline and may be expired on the spot. One whose traffic the
    /// kernel may carry waits for its timer, which asks the kernel first.
    #[inline]
    pub(super) fn lapsed(&self, i: u32, now: Millis) -> bool {
        now >= self.deadline(i) && self.table.slots[i as usize].kernel == 0
    }

    /// A timer found `i` past its deadline with links in the kernel: ask before expiring it.
    #[cold]
    pub(super) fn check_kernel(&mut self, now: Millis, i: u32) {
        let s = &self.table.slots[i as usize];
        let links = match s.role {
            Role::Joiner { host, .. } => vec![(s.id, self.table.slots[host as usize].id)],
            Role::Host { first_joiner, .. } => {
                let mut v = Vec::new();
                let mut j = first_joiner;
                while j != NIL {
                    let js = &self.table.slots[j as usize];
                    let Role::Joiner { next, .. } = js.role else { break };
                    if js.kernel > 0 {
                        v.push((s.id, js.id));
                    }
                    j = next;
                }
                v
            }
        };
        self.kernel_checks.push_back(KernelCheck { id: s.id, links });
        self.table.slots[i as usize].timer = self.wheel.insert(now + CHECK_RETRY, i);
    }

    /// Re-decides the links of `i` after its address, confirmation or linkage changed.
    #[cold]
    pub(super) fn links_changed(&mut self, i: u32) {
        if !self.cfg.kernel_links {
            return;
        }
        match self.table.slots[i as usize].role {
            Role::Joiner { .. } => self.sync_link(i),
            Role::Host { first_joiner, .. } => {
                let mut j = first_joiner;
                while j != NIL {
                    let Role::Joiner { next, .. } = self.table.slots[j as usize].role else { break };
                    self.sync_link(j);
                    j = next;
                }
            }
        }
    }

    /// Re-decides every link (after the source policy changed).
    pub(super) fn resync_links(&mut self) {
        if !self.cfg.kernel_links {
            return;
        }
        for j in 0..self.table.slots.len() as u32 {
            let s = &self.table.slots[j as usize];
            if s.state == super::table::SlotState::Live && matches!(s.role, Role::Joiner { .. }) {
                self.sync_link(j);
            }
        }
    }

    /// Withdraws joiner `j`'s link if it is published (before `j` or its host changes or goes).
    pub(super) fn unpublish(&mut self, j: u32) {
        let s = &self.table.slots[j as usize];
        let (Role::Joiner { host, .. }, true) = (s.role, s.kernel > 0) else { return };
        let op = LinkOp::Down { host: self.table.slots[host as usize].id, joiner: s.id };
        self.link_ops.push_back(op);
        self.table.slots[j as usize].kernel = 0;
        let h = &mut self.table.slots[host as usize];
        h.kernel = h.kernel.saturating_sub(1);
    }

    /// Brings joiner `j`'s published link in line with its state: down first, then up again
    /// with the current addresses if it is still established.
    fn sync_link(&mut self, j: u32) {
        self.unpublish(j);
        let js = &self.table.slots[j as usize];
        let Role::Joiner { host, linked: true, .. } = js.role else { return };
        let hs = &self.table.slots[host as usize];
        let live = super::table::SlotState::Live;
        let (Some(ja), Some(ha)) = (js.bound, hs.bound) else { return };
        let ok = js.state == live
            && hs.state == live
            && js.budget == CONFIRMED
            && hs.budget == CONFIRMED
            && self.cfg.policy.allows(&ja)
            && self.cfg.policy.allows(&ha);
        if !ok {
            return;
        }
        self.link_ops.push_back(LinkOp::Up { host: hs.id, host_addr: ha, joiner: js.id, joiner_addr: ja });
        self.table.slots[j as usize].kernel = 1;
        self.table.slots[host as usize].kernel += 1;
    }
}

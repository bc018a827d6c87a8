//! The relay's control interface as seen from the control plane: create and release allocations
//! and read counters, by message to the owning shard.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::core::{owner_shard, Control, ControlError, ControlReply, Created, Entropy};
use crate::shard::{ShardHandle, ShardMsg, ShardStats};
use crate::wire::AllocationId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayError {
    /// The shard refused the command.
    Control(ControlError),
    /// A shard's mailbox is full or the shard has stopped.
    Unavailable,
    /// The OS CSPRNG failed.
    Entropy,
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Control(e) => write!(f, "{e}"),
            Self::Unavailable => f.write_str("relay unavailable"),
            Self::Entropy => f.write_str("random number generator failed"),
        }
    }
}

impl std::error::Error for RelayError {}

/// A cloneable handle on every shard of one relay process.
#[derive(Clone)]
pub struct RelayHandle {
    shards: Arc<[ShardHandle]>,
    next: Arc<AtomicUsize>,
}

impl RelayHandle {
    pub fn new(shards: Vec<ShardHandle>) -> Self {
        Self { shards: shards.into(), next: Arc::new(AtomicUsize::new(0)) }
    }

    /// The shards' mailboxes (for listeners that feed them directly).
    pub fn shards(&self) -> Arc<[ShardHandle]> {
        self.shards.clone()
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    async fn ask(&self, shard: usize, cmd: Control) -> Result<ControlReply, RelayError> {
        let (tx, rx) = oneshot::channel();
        self.shards[shard].send(ShardMsg::Control(cmd, tx)).map_err(|_| RelayError::Unavailable)?;
        rx.await.map_err(|_| RelayError::Unavailable)?.map_err(RelayError::Control)
    }

    fn created(r: ControlReply) -> Result<Created, RelayError> {
        match r {
            ControlReply::Created(c) => Ok(*c),
            ControlReply::Released | ControlReply::Removed(_) | ControlReply::List(_) => {
                Err(RelayError::Unavailable)
            }
        }
    }

    /// A host allocation on the next shard in turn (skipping full shards). Returns its shard too.
    pub async fn create_host(&self, max_connections: u16) -> Result<(usize, Created), RelayError> {
        let n = self.shards.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = RelayError::Control(ControlError::Full);
        for k in 0..n {
            let shard = (start + k) % n;
            let entropy = Entropy::generate().map_err(|_| RelayError::Entropy)?;
            match self.ask(shard, Control::CreateHost { max_connections, entropy }).await {
                Ok(r) => return Self::created(r).map(|c| (shard, c)),
                Err(e @ RelayError::Control(ControlError::Full)) | Err(e @ RelayError::Unavailable) => {
                    last = e
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// A joiner allocation on the host's shard.
    pub async fn create_joiner(&self, host: AllocationId) -> Result<Created, RelayError> {
        let shard = owner_shard(&host, self.shards.len() as u32) as usize;
        let entropy = Entropy::generate().map_err(|_| RelayError::Entropy)?;
        Self::created(self.ask(shard, Control::CreateJoiner { host, entropy }).await?)
    }

    pub async fn release(&self, id: AllocationId) -> Result<(), RelayError> {
        let shard = owner_shard(&id, self.shards.len() as u32) as usize;
        self.ask(shard, Control::Release { id }).await.map(|_| ())
    }

    /// The host removes one joiner, or every joiner that has not connected (see
    /// [`Control::RemoveJoiners`]). Returns how many were removed.
    pub async fn remove_joiners(
        &self,
        host: AllocationId,
        key: [u8; 64],
        joiner: Option<AllocationId>,
    ) -> Result<u32, RelayError> {
        let shard = owner_shard(&host, self.shards.len() as u32) as usize;
        match self.ask(shard, Control::RemoveJoiners { host, key: Box::new(key), joiner }).await? {
            ControlReply::Removed(n) => Ok(n),
            _ => Err(RelayError::Unavailable),
        }
    }

    /// Applies live settings on every shard; how many shards took them.
    pub async fn reconfigure(&self, r: crate::core::Reconfig) -> usize {
        let mut n = 0;
        for shard in 0..self.shards.len() {
            if self.ask(shard, Control::Reconfigure(Box::new(r.clone()))).await.is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Every live allocation on every shard that answers.
    pub async fn list(&self) -> Vec<crate::core::AllocationInfo> {
        let mut out = Vec::new();
        for shard in 0..self.shards.len() {
            if let Ok(ControlReply::List(v)) = self.ask(shard, Control::List).await {
                out.extend(v);
            }
        }
        out
    }

    /// Counters of every shard that answers.
    pub async fn stats(&self) -> Vec<ShardStats> {
        let mut out = Vec::with_capacity(self.shards.len());
        for s in self.shards.iter() {
            let (tx, rx) = oneshot::channel();
            if s.send(ShardMsg::Stats(tx)).is_ok() {
                if let Ok(st) = rx.await {
                    out.push(st);
                }
            }
        }
        out
    }

    /// Asks every shard to stop.
    /// Takes every link out of the kernel fast path (drain).
    pub fn withdraw_links(&self) {
        for s in self.shards.iter() {
            let _ = s.send(ShardMsg::WithdrawLinks);
        }
    }

    pub fn stop(&self) {
        for s in self.shards.iter() {
            let _ = s.send(ShardMsg::Stop);
        }
    }
}

//! Connection slots: the gateway's cap on open client connections, and a cap per client
//! address so that one pod cannot take every slot. A slot frees itself when dropped; the last
//! one to go wakes whoever waits for the gateway to be idle (the drain).
//!
//! Every accept on every worker thread takes a slot, so the per-client counts live in a
//! sharded map (a lock per shard, not one for the whole gateway).

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use dashmap::DashMap;
use prometheus_client::metrics::gauge::Gauge;

use super::{config::Limits, ip_literal, policy::Deny};

#[derive(Default)]
pub struct Slots {
    active: AtomicUsize,
    per_source: DashMap<IpAddr, usize>,
    /// Woken when the last open connection ends (`idle`).
    no_connections: tokio::sync::Notify,
    /// `egressfw_gateway_active_connections`.
    gauge: Gauge,
}

/// One open connection's place under the caps; frees itself on drop.
pub struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
}

impl Slots {
    pub fn new(gauge: Gauge) -> Self {
        Self { gauge, ..Self::default() }
    }

    /// Open connections.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Takes a slot for `source`, or says which cap is reached.
    pub fn take(self: &Arc<Self>, limits: &Limits, source: IpAddr) -> Result<Slot, Deny> {
        let source = ip_literal::normalize(source);
        {
            let mut n = self.per_source.entry(source).or_insert(0);
            if *n >= limits.max_connections_per_source {
                return Err(Deny::SourceLimit);
            }
            *n += 1;
        }
        let slot = Slot { slots: self.clone(), source };
        if self.active.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.release_source(source);
            std::mem::forget(slot);
            return Err(Deny::TooManyConnections);
        }
        self.gauge.inc();
        Ok(slot)
    }

    fn release_source(&self, source: IpAddr) {
        if let Some(mut n) = self.per_source.get_mut(&source) {
            *n -= 1;
        }
        // Only under the shard's lock, and only if still zero: a connection from the same
        // client may have taken a slot in between.
        self.per_source.remove_if(&source, |_, n| *n == 0);
    }

    /// Returns once no connection is open: woken by the last one to end, no polling.
    pub async fn idle(&self) {
        loop {
            let ended = self.no_connections.notified();
            tokio::pin!(ended);
            // Registered before the check, so an end between the check and the wait is not missed.
            ended.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let slots = &self.slots;
        slots.release_source(self.source);
        if slots.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            slots.no_connections.notify_waiters();
        }
        slots.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_source: usize) -> Limits {
        Limits { max_connections: total, max_connections_per_source: per_source, ..Limits::default() }
    }

    #[test]
    fn caps_per_client_and_in_total_and_frees_on_drop() {
        let slots = Arc::new(Slots::default());
        let l = limits(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = slots.take(&l, a).unwrap();
        // The IPv4-mapped form is the same client.
        let a2 = slots.take(&l, "::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(slots.take(&l, a).err(), Some(Deny::SourceLimit));
        let b1 = slots.take(&l, b).unwrap();
        assert_eq!(slots.take(&l, b).err(), Some(Deny::TooManyConnections));
        assert_eq!(slots.active(), 3);
        drop(a1);
        let b2 = slots.take(&l, b).unwrap();
        drop((a2, b1, b2));
        assert_eq!(slots.active(), 0);
        assert!(slots.per_source.is_empty(), "counts of clients with nothing open are removed");
    }
}

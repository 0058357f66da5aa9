//! The embedded in-memory dedup store, for a sidecar running without Redis.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Claim;

/// The embedded store: the same semantics as the Redis scripts, for one process, with at
/// most `max_entries` keys. Expired keys are purged at every operation.
pub(super) struct MemoryStore {
    max_entries: usize,
    entries: HashMap<Arc<str>, Entry>,
    /// Every entry by (expiry, write sequence): the front expires first.
    by_expiry: BTreeMap<(Instant, u64), Arc<str>>,
    seq: u64,
}

struct Entry {
    held: Held,
    expires_at: Instant,
    seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    Done,
    Owner(Arc<str>),
}

impl MemoryStore {
    pub(super) fn new(max_entries: usize) -> Self {
        Self {
            max_entries: max_entries.max(1),
            entries: HashMap::new(),
            by_expiry: BTreeMap::new(),
            seq: 0,
        }
    }

    pub(super) fn claim(&mut self, key: &str, owner: &str, ttl: Duration, now: Instant) -> Claim {
        self.purge_expired(now);
        match self.entries.get(key).map(|e| &e.held) {
            Some(Held::Done) => Claim::Done,
            Some(Held::Owner(o)) if **o != *owner => Claim::Busy,
            _ => {
                self.put(key, Held::Owner(owner.into()), now + ttl);
                Claim::Claimed
            }
        }
    }

    pub(super) fn mark_done(&mut self, key: &str, ttl: Duration, now: Instant) {
        self.purge_expired(now);
        self.put(key, Held::Done, now + ttl);
    }

    pub(super) fn release(&mut self, key: &str, owner: &str, now: Instant) {
        self.purge_expired(now);
        if matches!(self.entries.get(key), Some(Entry { held: Held::Owner(o), .. }) if **o == *owner) {
            self.remove(key);
        }
    }

    fn put(&mut self, key: &str, held: Held, expires_at: Instant) {
        let key: Arc<str> = match self.entries.get(key) {
            Some(old) => {
                let old_index = (old.expires_at, old.seq);
                self.by_expiry.remove(&old_index).unwrap_or_else(|| key.into())
            }
            None => {
                while self.entries.len() >= self.max_entries && self.evict_first() {}
                key.into()
            }
        };
        self.seq += 1;
        self.by_expiry.insert((expires_at, self.seq), key.clone());
        let entry = Entry {
            held,
            expires_at,
            seq: self.seq,
        };
        self.entries.insert(key, entry);
    }

    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.by_expiry.remove(&(entry.expires_at, entry.seq));
        }
    }

    fn purge_expired(&mut self, now: Instant) {
        while self.by_expiry.first_key_value().is_some_and(|((at, _), _)| *at <= now) {
            self.evict_first();
        }
    }

    /// Drops the entry closest to expiry; false when the store is empty.
    fn evict_first(&mut self) -> bool {
        let Some((_, key)) = self.by_expiry.pop_first() else {
            return false;
        };
        self.entries.remove(&key);
        debug_assert_eq!(self.entries.len(), self.by_expiry.len());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);
    const DONE_TTL: Duration = Duration::from_secs(600);

    impl MemoryStore {
        fn held(&mut self, key: &str, now: Instant) -> Option<Held> {
            self.purge_expired(now);
            assert_eq!(self.entries.len(), self.by_expiry.len(), "index out of step");
            self.entries.get(key).map(|e| e.held.clone())
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_free_key_is_claimed_another_owner_is_busy_and_the_owner_claims_again() {
        let (mut m, t0) = (MemoryStore::new(10), Instant::now());
        assert_eq!(m.claim("k", "a", LEASE, t0), Claim::Claimed);
        assert_eq!(m.claim("k", "b", LEASE, t0), Claim::Busy);
        assert_eq!(m.claim("k", "a", LEASE, t0), Claim::Claimed);
        assert_eq!(m.held("k", t0), Some(Held::Owner("a".into())));
    }

    #[test]
    fn a_done_key_is_done_for_every_owner_whoever_held_it() {
        let (mut m, t0) = (MemoryStore::new(10), Instant::now());
        m.claim("k", "a", LEASE, t0);
        m.mark_done("k", DONE_TTL, t0);
        assert_eq!(m.claim("k", "a", LEASE, t0), Claim::Done);
        assert_eq!(m.claim("k", "b", LEASE, t0), Claim::Done);
        m.mark_done("never-claimed", DONE_TTL, t0);
        assert_eq!(m.claim("never-claimed", "b", LEASE, t0), Claim::Done);
    }

    #[test]
    fn release_deletes_only_our_own_lease() {
        let (mut m, t0) = (MemoryStore::new(10), Instant::now());
        m.claim("k", "a", LEASE, t0);
        m.release("k", "b", t0);
        assert_eq!(m.claim("k", "b", LEASE, t0), Claim::Busy);
        m.release("k", "a", t0);
        assert_eq!(m.held("k", t0), None);
        assert_eq!(m.claim("k", "b", LEASE, t0), Claim::Claimed);
        m.mark_done("k", DONE_TTL, t0);
        m.release("k", "b", t0);
        assert_eq!(m.held("k", t0), Some(Held::Done), "release never undoes done");
    }

    #[test]
    fn an_expired_lease_lets_another_owner_claim() {
        let (mut m, t0) = (MemoryStore::new(10), Instant::now());
        m.claim("k", "a", LEASE, t0);
        assert_eq!(m.claim("k", "b", LEASE, t0 + secs(29)), Claim::Busy);
        assert_eq!(m.claim("k", "b", LEASE, t0 + secs(30)), Claim::Claimed);
    }

    #[test]
    fn claiming_again_refreshes_the_lease() {
        let (mut m, t0) = (MemoryStore::new(10), Instant::now());
        m.claim("k", "a", LEASE, t0);
        m.claim("k", "a", LEASE, t0 + secs(20));
        assert_eq!(m.claim("k", "b", LEASE, t0 + secs(49)), Claim::Busy);
        assert_eq!(m.claim("k", "b", LEASE, t0 + secs(50)), Claim::Claimed);
    }

    #[test]
    fn a_done_mark_expires_after_its_ttl() {
        let (mut m, t0) = (MemoryStore::new(10), Instant::now());
        m.mark_done("k", DONE_TTL, t0);
        assert_eq!(m.claim("k", "a", LEASE, t0 + DONE_TTL - secs(1)), Claim::Done);
        assert_eq!(m.claim("k", "a", LEASE, t0 + DONE_TTL), Claim::Claimed);
    }

    #[test]
    fn the_bound_evicts_expired_keys_first_then_the_closest_to_expiry() {
        let (mut m, t0) = (MemoryStore::new(3), Instant::now());
        m.claim("short", "a", secs(1), t0);
        m.mark_done("done1", DONE_TTL, t0);
        m.mark_done("done2", DONE_TTL, t0);
        // "short" has expired by now: it goes, nothing live is evicted.
        m.claim("lease", "a", LEASE, t0 + secs(2));
        assert_eq!(m.entries.len(), 3);
        assert_eq!(m.held("done1", t0 + secs(2)), Some(Held::Done));
        assert_eq!(m.held("done2", t0 + secs(2)), Some(Held::Done));
        // Full of live keys: the one closest to expiry (the lease) makes room.
        m.mark_done("done3", DONE_TTL, t0 + secs(3));
        assert_eq!(m.entries.len(), 3);
        assert_eq!(m.held("lease", t0 + secs(3)), None);
        // Updating a key already held evicts nothing.
        m.mark_done("done1", DONE_TTL, t0 + secs(4));
        for k in ["done1", "done2", "done3"] {
            assert_eq!(m.held(k, t0 + secs(4)), Some(Held::Done), "{k}");
        }
    }

    #[test]
    fn many_writes_keep_the_store_within_its_bound() {
        let (mut m, t0) = (MemoryStore::new(100), Instant::now());
        for i in 0..1_000u64 {
            let now = t0 + Duration::from_millis(i);
            m.claim(&format!("k{}", i % 250), "a", LEASE, now);
            if i % 3 == 0 {
                m.mark_done(&format!("k{}", i % 170), DONE_TTL, now);
            }
            assert!(m.entries.len() <= 100);
        }
        assert_eq!(m.entries.len(), m.by_expiry.len());
    }
}

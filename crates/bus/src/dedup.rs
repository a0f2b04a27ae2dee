//! A bounded memory of recently processed message ids.
//!
//! Redeliveries (after a lost ack) and re-publications (after a lost confirm) arrive with
//! the id they were born with; a consumer skips ids it has already processed. This set
//! covers one process's lifetime; effects that must survive a crash record their id
//! durably in the same write as the effect (the agent's journal, the conductor's store).

use std::collections::{HashSet, VecDeque};
use uuid::Uuid;

/// The last `capacity` ids, oldest forgotten first.
#[derive(Debug)]
pub struct RecentIds {
    set: HashSet<Uuid>,
    order: VecDeque<Uuid>,
    capacity: usize,
}

impl RecentIds {
    pub fn new(capacity: usize) -> Self {
        Self {
            set: HashSet::with_capacity(capacity.min(4096)),
            order: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
        }
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.set.contains(id)
    }

    /// Remembers `id`; returns false if it was already known.
    pub fn insert(&mut self, id: Uuid) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_beyond_capacity() {
        let mut r = RecentIds::new(2);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        assert!(r.insert(ids[0]));
        assert!(!r.insert(ids[0]));
        r.insert(ids[1]);
        r.insert(ids[2]);
        assert!(!r.contains(&ids[0]));
        assert!(r.contains(&ids[1]) && r.contains(&ids[2]));
        assert_eq!(r.len(), 2);
    }
}

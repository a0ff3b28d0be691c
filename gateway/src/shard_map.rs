//! The card cache's maps behind a small closure API: a DashMap normally, and under loom
//! (`--cfg tapgate_loom`) a HashMap in one loom mutex, so a loom model of the cache goes
//! through every lock the cache takes. Each call holds the key's lock only while its closure
//! runs.

use std::hash::Hash;

#[cfg(not(tapgate_loom))]
pub(crate) struct ShardMap<K, V> {
    map: dashmap::DashMap<K, V>,
}

#[cfg(not(tapgate_loom))]
impl<K: Eq + Hash + Clone, V> ShardMap<K, V> {
    pub(crate) fn with_shards(shards: usize) -> Self {
        Self {
            map: dashmap::DashMap::with_shard_amount(shards),
        }
    }

    /// `f` on the value of `key`, under its lock.
    pub(crate) fn update<R>(&self, key: &K, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.map.get_mut(key).map(|mut value| f(&mut value))
    }

    /// `f` on the value of `key` or on its absence, under the key's lock either way; a value
    /// `f` returns for an absent key is inserted before the lock is released.
    pub(crate) fn slot<R>(&self, key: K, f: impl FnOnce(Option<&mut V>) -> (R, Option<V>)) -> R {
        match self.map.entry(key) {
            dashmap::Entry::Occupied(mut slot) => f(Some(slot.get_mut())).0,
            dashmap::Entry::Vacant(slot) => {
                let (result, value) = f(None);
                if let Some(value) = value {
                    slot.insert(value);
                }
                result
            }
        }
    }

    pub(crate) fn get_or_insert_default(&self, key: K) -> V
    where
        V: Default + Clone,
    {
        self.map.entry(key).or_default().clone()
    }

    pub(crate) fn contains_key(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    pub(crate) fn remove(&self, key: &K) -> Option<V> {
        self.map.remove(key).map(|(_, value)| value)
    }

    pub(crate) fn remove_if(&self, key: &K, f: impl FnOnce(&V) -> bool) {
        self.map.remove_if(key, |_, value| f(value));
    }

    /// Some key of the map, whichever is cheapest to find.
    pub(crate) fn any_key(&self) -> Option<K> {
        self.map.iter().next().map(|entry| entry.key().clone())
    }

    pub(crate) fn clear(&self) {
        self.map.clear();
    }

    /// Read-locks every shard: not for hot paths.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(tapgate_loom)]
pub(crate) struct ShardMap<K, V> {
    map: tapgate_runtime::sync::Mutex<std::collections::HashMap<K, V>>,
}

#[cfg(tapgate_loom)]
impl<K: Eq + Hash + Clone, V> ShardMap<K, V> {
    pub(crate) fn with_shards(_shards: usize) -> Self {
        Self {
            map: tapgate_runtime::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn locked(&self) -> tapgate_runtime::sync::MutexGuard<'_, std::collections::HashMap<K, V>> {
        self.map.lock().expect("shard map lock")
    }

    pub(crate) fn update<R>(&self, key: &K, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.locked().get_mut(key).map(f)
    }

    pub(crate) fn slot<R>(&self, key: K, f: impl FnOnce(Option<&mut V>) -> (R, Option<V>)) -> R {
        let mut map = self.locked();
        match map.get_mut(&key) {
            Some(value) => f(Some(value)).0,
            None => {
                let (result, value) = f(None);
                if let Some(value) = value {
                    map.insert(key, value);
                }
                result
            }
        }
    }

    pub(crate) fn get_or_insert_default(&self, key: K) -> V
    where
        V: Default + Clone,
    {
        self.locked().entry(key).or_default().clone()
    }

    pub(crate) fn contains_key(&self, key: &K) -> bool {
        self.locked().contains_key(key)
    }

    pub(crate) fn remove(&self, key: &K) -> Option<V> {
        self.locked().remove(key)
    }

    pub(crate) fn remove_if(&self, key: &K, f: impl FnOnce(&V) -> bool) {
        let mut map = self.locked();
        if map.get(key).is_some_and(f) {
            map.remove(key);
        }
    }

    pub(crate) fn any_key(&self) -> Option<K> {
        self.locked().keys().next().cloned()
    }

    pub(crate) fn clear(&self) {
        self.locked().clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.locked().len()
    }
}

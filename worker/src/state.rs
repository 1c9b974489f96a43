//! Per-partition state stores: RocksDB underneath, a write-back cache on top.
//!
//! ```text
//!  engine ──get_mut(key)──► cache (HashMap) ──miss──► RocksDB "k/<key>"
//!  commit ──flush(offsets, max event time)──► one WriteBatch (dirty keys + "m/…" metadata), synced
//! ```
//! Every store of a process shares one block cache. The offsets written with the state are
//! the authority on restart: records below them have already been applied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{BlockBasedOptions, Cache, Options, WriteBatch, WriteOptions, DB};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::features::KeyState;

/// A state-store failure.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// RocksDB reported an error.
    #[error("state store {path}: {source}")]
    Rocks {
        /// Store directory.
        path: String,
        /// Cause.
        source: rocksdb::Error,
    },
    /// A stored value could not be decoded.
    #[error("state store {path}: corrupt value for {key:?}: {detail}")]
    Corrupt {
        /// Store directory.
        path: String,
        /// Key.
        key: String,
        /// Cause.
        detail: String,
    },
}

/// Settings shared by every store of a process.
#[derive(Clone)]
pub struct StoreEnv {
    root: PathBuf,
    cache: Cache,
    max_cached_keys: usize,
}

impl std::fmt::Debug for StoreEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreEnv").field("root", &self.root).finish_non_exhaustive()
    }
}

impl StoreEnv {
    /// Stores under `root`, sharing a block cache of `cache_bytes`.
    pub fn new(root: impl Into<PathBuf>, cache_bytes: usize, max_cached_keys: usize) -> Self {
        Self { root: root.into(), cache: Cache::new_lru_cache(cache_bytes), max_cached_keys }
    }

    /// Opens (creating if needed) the store of input partition `partition`.
    pub fn open(&self, partition: i32) -> Result<PartitionStore, StateError> {
        let path = self.root.join(format!("partition-{partition}"));
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_write_buffer_size(8 << 20);
        opts.set_max_write_buffer_number(2);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        let mut block = BlockBasedOptions::default();
        block.set_block_cache(&self.cache);
        opts.set_block_based_table_factory(&block);
        let db =
            DB::open(&opts, &path).map_err(|source| StateError::Rocks { path: path.display().to_string(), source })?;
        let mut store = PartitionStore {
            db: Arc::new(db),
            path,
            cache: HashMap::default(),
            dirty: HashSet::default(),
            offsets: BTreeMap::new(),
            max_time: None,
            max_cached_keys: self.max_cached_keys,
        };
        store.load_meta()?;
        Ok(store)
    }
}

/// The state of one input partition.
pub struct PartitionStore {
    db: Arc<DB>,
    path: PathBuf,
    cache: HashMap<String, KeyState>,
    dirty: HashSet<String>,
    offsets: BTreeMap<String, i64>,
    max_time: Option<i64>,
    max_cached_keys: usize,
}

impl std::fmt::Debug for PartitionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionStore").field("path", &self.path).finish_non_exhaustive()
    }
}

const OFFSET_PREFIX: &str = "m/offset/";
const MAX_TIME_KEY: &str = "m/max_time";

fn entity_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 2);
    k.extend_from_slice(b"k/");
    k.extend_from_slice(key.as_bytes());
    k
}

impl PartitionStore {
    fn rocks(&self, source: rocksdb::Error) -> StateError {
        StateError::Rocks { path: self.path.display().to_string(), source }
    }

    fn load_meta(&mut self) -> Result<(), StateError> {
        let iter = self.db.prefix_iterator(OFFSET_PREFIX.as_bytes());
        for item in iter {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let Some(topic) = k.strip_prefix(OFFSET_PREFIX.as_bytes()) else { break };
            if let Ok(arr) = <[u8; 8]>::try_from(&v[..]) {
                self.offsets.insert(String::from_utf8_lossy(topic).into_owned(), i64::from_be_bytes(arr));
            }
        }
        if let Some(v) = self.db.get(MAX_TIME_KEY).map_err(|e| self.rocks(e))? {
            if let Ok(arr) = <[u8; 8]>::try_from(&v[..]) {
                self.max_time = Some(i64::from_be_bytes(arr));
            }
        }
        Ok(())
    }

    /// Next offset to process for `topic`, as stored with the state (None: never flushed).
    pub fn stored_offset(&self, topic: &str) -> Option<i64> {
        self.offsets.get(topic).copied()
    }

    /// Largest event time applied to this store, as of the last flush.
    pub fn stored_max_time(&self) -> Option<i64> {
        self.max_time
    }

    /// A shared handle for read-only queries.
    pub fn reader(&self) -> StoreReader {
        StoreReader { db: self.db.clone() }
    }

    /// The state of `key`, loaded on first use; marked dirty.
    pub fn get_mut(&mut self, key: &str) -> Result<&mut KeyState, StateError> {
        if !self.dirty.contains(key) {
            self.dirty.insert(key.to_owned());
        }
        if !self.cache.contains_key(key) {
            let state = match self.db.get_pinned(entity_key(key)).map_err(|e| self.rocks(e))? {
                Some(bytes) => bincode::deserialize(&bytes).map_err(|e| StateError::Corrupt {
                    path: self.path.display().to_string(),
                    key: key.to_owned(),
                    detail: e.to_string(),
                })?,
                None => KeyState::default(),
            };
            self.cache.insert(key.to_owned(), state);
        }
        Ok(self.cache.get_mut(key).expect("present: inserted above"))
    }

    /// Writes every dirty key and the given next offsets and max event time in one synced
    /// batch. After it returns, the state up to those offsets survives a crash.
    pub fn flush(&mut self, offsets: &BTreeMap<String, i64>, max_time: Option<i64>) -> Result<usize, StateError> {
        let mut batch = WriteBatch::default();
        let n = self.dirty.len();
        for key in self.dirty.drain() {
            if let Some(state) = self.cache.get(&key) {
                let bytes = bincode::serialize(state).map_err(|e| StateError::Corrupt {
                    path: self.path.display().to_string(),
                    key: key.clone(),
                    detail: e.to_string(),
                })?;
                batch.put(entity_key(&key), bytes);
            }
        }
        for (topic, off) in offsets {
            batch.put(format!("{OFFSET_PREFIX}{topic}"), off.to_be_bytes());
            self.offsets.insert(topic.clone(), *off);
        }
        if let Some(t) = max_time {
            batch.put(MAX_TIME_KEY, t.to_be_bytes());
            self.max_time = Some(t);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(|e| self.rocks(e))?;
        if self.cache.len() > self.max_cached_keys {
            self.cache.clear();
        }
        Ok(n)
    }

    /// Drops unflushed changes (after a failed commit the state is re-read from disk).
    pub fn discard_unflushed(&mut self) {
        for key in self.dirty.drain() {
            self.cache.remove(&key);
        }
    }

    /// Estimated live data size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.db.property_int_value("rocksdb.estimate-live-data-size").ok().flatten().unwrap_or(0)
            + self.db.property_int_value("rocksdb.cur-size-all-mem-tables").ok().flatten().unwrap_or(0)
    }

    /// Store directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Read-only access to a store's flushed state (the query API).
#[derive(Clone)]
pub struct StoreReader {
    db: Arc<DB>,
}

impl std::fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreReader")
    }
}

impl StoreReader {
    /// The flushed state of `key`, if any.
    pub fn get(&self, key: &str) -> Option<KeyState> {
        let bytes = self.db.get_pinned(entity_key(key)).ok().flatten()?;
        bincode::deserialize(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_state_and_offsets_survive_reopen_and_unflushed_changes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let env = StoreEnv::new(dir.path(), 1 << 20, 10);
        {
            let mut s = env.open(3).unwrap();
            s.get_mut("u1").unwrap().max_time = Some(42);
            s.flush(&BTreeMap::from([("in".to_string(), 10)]), Some(42)).unwrap();
            s.get_mut("u2").unwrap().max_time = Some(7); // never flushed
        }
        let mut s = env.open(3).unwrap();
        assert_eq!(s.stored_offset("in"), Some(10));
        assert_eq!(s.stored_max_time(), Some(42));
        assert_eq!(s.get_mut("u1").unwrap().max_time, Some(42));
        assert_eq!(s.get_mut("u2").unwrap().max_time, None);
        assert_eq!(s.reader().get("u1").unwrap().max_time, Some(42));
        assert!(s.path().ends_with("partition-3"));
    }
}

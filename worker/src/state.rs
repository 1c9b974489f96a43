//! Per-partition state stores: RocksDB underneath, a write-back cache on top.
//!
//! ```text
//!  engine ──slot(key)──► cache (slab + index) ──miss──► RocksDB "k/<key>"
//!         ──state_mut(slot): the same key again within a batch, with no second lookup
//!  commit ──begin_snapshot(offsets, max event time): the dirty keys become the snapshot's keys
//!         ──snapshot_step (a slice at a time, between input batches) / get_mut of a snapshot key
//!           (copy-on-write: serialised before it changes) ──► FlushBatch
//!         ──FlushBatch::write (any thread)────► one synced RocksDB write
//!  engine ──add_timer / take_due_timers──► timers in memory until written + RocksDB "t/<end>/<key>"
//! ```
//! Every store of a process shares one block cache. The offsets written with the state are
//! the authority on restart: records below them have already been applied.
//!
//! A snapshot holds every key's state exactly as of its offsets, although the engine goes on
//! processing while it is serialised (a key is serialised before its first change after the
//! snapshot began) and while another thread writes it. The cache is only trimmed when no
//! snapshot is unwritten (`trim_allowed`), so a key is never re-read from RocksDB older than
//! its last snapshot.
//!
//! The cache is a slab: every cached key's state in one vector, found through a hash table of
//! slot numbers. A key is looked up once per event ([`PartitionStore::slot`]); the changed keys
//! are a list of slot numbers, not copies of the keys. Slots move only when the cache is trimmed
//! (in `begin_snapshot`), which ends every [`Slot`] handed out before.
//!
//! The store holds bytes: a key's value is whatever its [`Record`] type encodes (the worker's
//! is [`crate::record::KeyState`], which owns the layout and its version). The version is kept
//! in the store (`m/format`) and checked when it is opened.
//!
//! Timers: `t/<end>/<key>` says that `key` has an open emitted window ending at `end` (`end`
//! big-endian with the sign bit flipped, so that keys sort by end). Timers added or taken go
//! into the same snapshot as the key states whose windows they point to. Until that snapshot
//! is known to be written, added timers also stay in memory, so that `take_due_timers` finds
//! them whether or not the write has happened yet.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{BlockBasedOptions, Cache, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};
use rustc_hash::FxBuildHasher;

/// Hash of a cached key (Fx: the keys are the tenants', but the table is per partition and a
/// key's slot is found by comparing the whole key).
fn key_hash(key: &str) -> u64 {
    FxBuildHasher.hash_one(key)
}

/// What a store keeps per key. The store only moves bytes; the record type owns its encoding
/// and the version of it.
pub trait Record: Default {
    /// Version of the encoding, stored with the state and checked when a store is opened: a
    /// store in another version is refused ([`StateError::Format`]), never misread.
    const FORMAT: u32;
    /// Appends the stored form to `buf`.
    fn encode(&self, buf: &mut Vec<u8>) -> Result<(), String>;
    /// Reads a stored form.
    fn decode(bytes: &[u8]) -> Result<Self, String>;
}

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
    /// The store was written in another state format.
    #[error(
        "state store {path}: written in state format {found}, this worker reads format {expected}; \
         restore the matching worker version or delete the store (the partition is then rebuilt from \
         the input topic's retained events)"
    )]
    Format {
        /// Store directory.
        path: String,
        /// Format found ("unversioned" for stores older than the marker).
        found: String,
        /// Format this build reads.
        expected: u32,
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

/// Free bytes a store needs on its volume to resume after it filled up (RocksDB reserves its
/// memtable budget: 2 write buffers of 8 MiB).
pub const RESUME_FREE_BYTES: u64 = 2 * WRITE_BUFFER_BYTES;
const WRITE_BUFFER_BYTES: u64 = 8 << 20;

impl StateError {
    /// The store's volume is full (RocksDB's `NoSpace` I/O error): writing again can succeed
    /// once space returns. RocksDB resumes a store it stopped on the error by itself, once its
    /// file manager (polling every 5 s) sees the memtable budget free: write buffer × number =
    /// [`RESUME_FREE_BYTES`].
    pub fn is_no_space(&self) -> bool {
        match self {
            StateError::Rocks { source, .. } => {
                let m = source.to_string();
                m.contains("No space left on device") || m.contains("NoSpace")
            }
            _ => false,
        }
    }
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

    /// Directory of the store of input partition `partition`.
    pub fn partition_path(&self, partition: i32) -> PathBuf {
        self.root.join(format!("partition-{partition}"))
    }

    /// Root directory of every store.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether a store exists for `partition`.
    pub fn exists(&self, partition: i32) -> bool {
        self.partition_path(partition).join("CURRENT").exists()
    }

    /// Deletes the store of `partition` (it must not be open).
    pub fn wipe(&self, partition: i32) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.partition_path(partition)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Opens (creating if needed) the store of input partition `partition`.
    pub fn open<R: Record>(&self, partition: i32) -> Result<PartitionStore<R>, StateError> {
        let path = self.partition_path(partition);
        // No preallocation (fallocate): RocksDB would reserve ~13 MB per store (its WAL at 1.1 ×
        // the write buffer, its MANIFEST 4 MB) however small the state, most of a small volume
        // with many partitions; and a full volume then shows at the first write that does not
        // fit (the worker pauses until space returns: `kafka::write_state`), not at some later
        // WAL switch or flush. (The crate has no setter for it.)
        let mut opts = Options::default()
            .get_options_from_string("allow_fallocate=false")
            .map_err(|source| StateError::Rocks { path: path.display().to_string(), source })?;
        opts.create_if_missing(true);
        opts.set_write_buffer_size(WRITE_BUFFER_BYTES as usize);
        opts.set_max_write_buffer_number((RESUME_FREE_BYTES / WRITE_BUFFER_BYTES) as i32);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        // Bloom filters, in the tables and in the memtables: most lookups of a key the cache
        // does not hold are for keys never seen, and without a filter each one searches every
        // memtable and level-0 table.
        opts.set_memtable_whole_key_filtering(true);
        opts.set_memtable_prefix_bloom_ratio(0.1);
        let mut block = BlockBasedOptions::default();
        block.set_bloom_filter(10.0, false);
        block.set_block_cache(&self.cache);
        opts.set_block_based_table_factory(&block);
        let db =
            DB::open(&opts, &path).map_err(|source| StateError::Rocks { path: path.display().to_string(), source })?;
        let mut store = PartitionStore {
            db: Arc::new(db),
            path,
            slots: Vec::new(),
            index: hashbrown::HashTable::new(),
            epoch: 0,
            dirty: Vec::new(),
            snapshot: None,
            offsets: BTreeMap::new(),
            max_time: None,
            max_cached_keys: self.max_cached_keys,
            timers_added: BTreeSet::new(),
            timers_unwritten: BTreeSet::new(),
            timers_taken: Vec::new(),
            timers_taken_through: None,
            snapshot_bytes_per_key: 0,
        };
        store.load_meta()?;
        Ok(store)
    }
}

/// The state of one input partition.
pub struct PartitionStore<R> {
    db: Arc<DB>,
    path: PathBuf,
    /// The cached states, in no order.
    slots: Vec<Cached<R>>,
    /// Slot numbers, by the hash of their key.
    index: hashbrown::HashTable<u32>,
    /// Number of times the slots were compacted: a [`Slot`] of another epoch is void.
    epoch: u32,
    /// Slots changed since the last snapshot began.
    dirty: Vec<u32>,
    snapshot: Option<Snapshot>,
    offsets: BTreeMap<String, i64>,
    max_time: Option<i64>,
    max_cached_keys: usize,
    /// Timers added since the last snapshot began.
    timers_added: BTreeSet<(i64, String)>,
    /// Timers in snapshots that may not be written yet.
    timers_unwritten: BTreeSet<(i64, String)>,
    /// RocksDB keys of timers taken since the last snapshot began (deleted by the next one).
    timers_taken: Vec<Vec<u8>>,
    /// Every stored timer with an end at or before this has been taken.
    timers_taken_through: Option<i64>,
    /// Bytes per key of the last snapshot: the next one's batch is allocated at its expected
    /// size once, instead of being copied as it doubles.
    snapshot_bytes_per_key: usize,
}

impl<R> std::fmt::Debug for PartitionStore<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionStore").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Where a key's state is in its store's cache, from [`PartitionStore::slot`]: valid until the
/// next `begin_snapshot` (which may compact the cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    index: u32,
    epoch: u32,
}

struct Cached<R> {
    /// Inline up to 24 bytes: the lookup compares it without following a pointer.
    key: compact_str::CompactString,
    /// `key_hash(key)`, kept for growing the index without hashing again.
    hash: u64,
    state: R,
    /// The caller's bit for this key while it is cached ([`PartitionStore::state_and_mark`]).
    mark: bool,
    /// In `dirty`.
    dirty: bool,
    /// In the running snapshot and not serialised yet.
    pending: bool,
}

/// A snapshot being serialised.
struct Snapshot {
    /// Slots, in key order.
    slots: Vec<u32>,
    next: usize,
    batch: WriteBatch,
    buf: Vec<u8>,
}

/// Serialises `state` into `batch` under `key` (`buf` is reused scratch space: the RocksDB key,
/// then the value).
fn put_state<R: Record>(
    path: &Path,
    buf: &mut Vec<u8>,
    batch: &mut WriteBatch,
    key: &str,
    state: &R,
) -> Result<(), StateError> {
    buf.clear();
    buf.extend_from_slice(ENTITY_PREFIX);
    buf.extend_from_slice(key.as_bytes());
    let split = buf.len();
    state.encode(buf).map_err(|detail| StateError::Corrupt {
        path: path.display().to_string(),
        key: key.to_owned(),
        detail,
    })?;
    let (k, v) = buf.split_at(split);
    batch.put(k, v);
    Ok(())
}

const TIMER_PREFIX: &[u8] = b"t/";

/// `t/<end>`: the smallest timer key with this end.
fn timer_bound(end: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(TIMER_PREFIX.len() + 8);
    k.extend_from_slice(TIMER_PREFIX);
    k.extend_from_slice(&((end as u64) ^ (1 << 63)).to_be_bytes());
    k
}

fn timer_key(end: i64, key: &str) -> Vec<u8> {
    let mut k = timer_bound(end);
    k.extend_from_slice(key.as_bytes());
    k
}

fn parse_timer_key(k: &[u8]) -> Option<(i64, String)> {
    let rest = k.strip_prefix(TIMER_PREFIX)?;
    let end = <[u8; 8]>::try_from(rest.get(..8)?).ok()?;
    let end = (u64::from_be_bytes(end) ^ (1 << 63)) as i64;
    Some((end, String::from_utf8_lossy(&rest[8..]).into_owned()))
}

const OFFSET_PREFIX: &str = "m/offset/";
const FINGERPRINT_KEY: &str = "m/fingerprint";
/// The input topic's partition count when the state was first written (keys map to partitions
/// by it: under another count, a key's history is in another partition).
const PARTITIONS_KEY: &str = "m/input-partitions";
const FORMAT_KEY: &str = "m/format";
const MAX_TIME_KEY: &str = "m/max_time";

/// The stored state of `key`, or the default when it has none.
fn load<R: Record>(db: &DB, path: &Path, key: &str) -> Result<R, StateError> {
    match db.get_pinned(entity_key(key)) {
        Ok(Some(bytes)) => R::decode(&bytes).map_err(|detail| StateError::Corrupt {
            path: path.display().to_string(),
            key: key.to_owned(),
            detail,
        }),
        Ok(None) => Ok(R::default()),
        Err(source) => Err(StateError::Rocks { path: path.display().to_string(), source }),
    }
}

const ENTITY_PREFIX: &[u8] = b"k/";

fn entity_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 2);
    k.extend_from_slice(ENTITY_PREFIX);
    k.extend_from_slice(key.as_bytes());
    k
}

impl<R: Record> PartitionStore<R> {
    fn rocks(&self, source: rocksdb::Error) -> StateError {
        StateError::Rocks { path: self.path.display().to_string(), source }
    }

    fn check_format(&self) -> Result<(), StateError> {
        let found = match self.db.get(FORMAT_KEY).map_err(|e| self.rocks(e))? {
            Some(v) => <[u8; 4]>::try_from(&v[..])
                .map_or_else(|_| "unreadable".to_owned(), |a| u32::from_be_bytes(a).to_string()),
            None => {
                let empty = self.db.iterator(rocksdb::IteratorMode::Start).next().is_none();
                if empty {
                    self.db.put(FORMAT_KEY, R::FORMAT.to_be_bytes()).map_err(|e| self.rocks(e))?;
                    return Ok(());
                }
                "unversioned".to_owned()
            }
        };
        if found == R::FORMAT.to_string() {
            return Ok(());
        }
        Err(StateError::Format { path: self.path.display().to_string(), found, expected: R::FORMAT })
    }

    fn load_meta(&mut self) -> Result<(), StateError> {
        self.check_format()?;
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

    /// The fingerprint of the definitions the state was computed with (None: never set).
    pub fn fingerprint(&self) -> Result<Option<String>, StateError> {
        let v = self.db.get(FINGERPRINT_KEY).map_err(|e| self.rocks(e))?;
        Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// The input topic's partition count this state was built under (None: not recorded).
    pub fn input_partitions(&self) -> Result<Option<usize>, StateError> {
        let v = self.db.get(PARTITIONS_KEY).map_err(|e| self.rocks(e))?;
        Ok(v.and_then(|b| String::from_utf8_lossy(&b).parse().ok()))
    }

    /// Records the input topic's partition count this state is built under (synced).
    pub fn set_input_partitions(&self, n: usize) -> Result<(), StateError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.put_opt(PARTITIONS_KEY, n.to_string().as_bytes(), &wo).map_err(|e| self.rocks(e))
    }

    /// Records the fingerprint of the definitions the state is computed with (synced).
    pub fn set_fingerprint(&self, fingerprint: &str) -> Result<(), StateError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.put_opt(FINGERPRINT_KEY, fingerprint.as_bytes(), &wo).map_err(|e| self.rocks(e))
    }

    /// Every stored next offset, by topic.
    pub fn stored_offsets(&self) -> &BTreeMap<String, i64> {
        &self.offsets
    }

    /// A handle for taking checkpoints of this store from another thread.
    pub fn handle(&self) -> StoreHandle {
        StoreHandle { db: self.db.clone(), path: self.path.clone() }
    }

    /// A shared handle for read-only queries.
    pub fn reader(&self) -> StoreReader {
        StoreReader { db: self.db.clone() }
    }

    /// The state of `key`, loaded on first use; marked dirty. A key of the running snapshot is
    /// serialised into it first.
    pub fn get_mut(&mut self, key: &str) -> Result<&mut R, StateError> {
        let slot = self.slot(key)?;
        Ok(&mut self.slots[slot.index as usize].state)
    }

    /// The slot of `key`, its state loaded on first use; marked dirty (see [`Self::get_mut`]).
    /// [`Self::state_mut`] then reaches the state again without a lookup, until the next
    /// `begin_snapshot`.
    pub fn slot(&mut self, key: &str) -> Result<Slot, StateError> {
        let hash = key_hash(key);
        let slots = &self.slots;
        let index = match self.index.entry(hash, |&i| slots[i as usize].key == key, |&i| slots[i as usize].hash) {
            hashbrown::hash_table::Entry::Occupied(o) => *o.get(),
            hashbrown::hash_table::Entry::Vacant(v) => {
                let state = load::<R>(&self.db, &self.path, key)?;
                let i = u32::try_from(self.slots.len()).expect("fewer than 2^32 cached keys per partition");
                self.slots.push(Cached { key: key.into(), hash, state, mark: false, dirty: false, pending: false });
                v.insert(i);
                i
            }
        };
        self.touch(index)?;
        Ok(Slot { index, epoch: self.epoch })
    }

    /// The state in `slot` (from [`Self::slot`] since the last `begin_snapshot`), marked dirty
    /// like [`Self::get_mut`].
    pub fn state_mut(&mut self, slot: Slot) -> Result<&mut R, StateError> {
        assert_eq!(slot.epoch, self.epoch, "a slot used after the cache was compacted");
        self.touch(slot.index)?;
        Ok(&mut self.slots[slot.index as usize].state)
    }

    /// Like [`Self::state_mut`], with a bit of the caller's own for the key: false when the key
    /// is loaded into the cache, never stored. (The engine uses it to know that a key's last
    /// score already has its model's shape.)
    pub fn state_and_mark(&mut self, slot: Slot) -> Result<(&mut R, &mut bool), StateError> {
        assert_eq!(slot.epoch, self.epoch, "a slot used after the cache was compacted");
        self.touch(slot.index)?;
        let c = &mut self.slots[slot.index as usize];
        Ok((&mut c.state, &mut c.mark))
    }

    /// Serialises slot `i` into the running snapshot if it is pending there (copy-on-write), and
    /// marks it dirty.
    fn touch(&mut self, i: u32) -> Result<(), StateError> {
        let c = &mut self.slots[i as usize];
        if c.pending {
            c.pending = false;
            if let Some(snap) = &mut self.snapshot {
                put_state(&self.path, &mut snap.buf, &mut snap.batch, &c.key, &c.state)?;
            }
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(i);
        }
        Ok(())
    }

    /// Starts a snapshot of every key changed since the last one, with the given next offsets
    /// and max event time. False (and no snapshot) when nothing changed. `trim_allowed`: no
    /// earlier snapshot is still unwritten, so the cache may shed clean entries.
    pub fn begin_snapshot(
        &mut self,
        offsets: &BTreeMap<String, i64>,
        max_time: Option<i64>,
        trim_allowed: bool,
    ) -> bool {
        assert!(self.snapshot.is_none(), "one snapshot at a time");
        if trim_allowed && self.slots.len() > self.max_cached_keys {
            // Clean entries are durable (no snapshot is unwritten): only changed ones must stay.
            // What stays is compacted (every slot handed out before is void) and every slot left
            // is a dirty one.
            self.slots.retain(|c| c.dirty);
            self.epoch = self.epoch.wrapping_add(1);
            self.index.clear();
            self.dirty.clear();
            let slots = &self.slots;
            for (i, c) in slots.iter().enumerate() {
                let i = i as u32;
                self.index.insert_unique(c.hash, i, |&j| slots[j as usize].hash);
                self.dirty.push(i);
            }
        }
        if trim_allowed {
            // Every earlier snapshot is written: its timers are found in RocksDB from now on.
            self.timers_unwritten.clear();
        }
        let unchanged = self.dirty.is_empty()
            && self.timers_added.is_empty()
            && self.timers_taken.is_empty()
            && &self.offsets == offsets
            && (max_time.is_none() || max_time == self.max_time);
        if unchanged {
            return false;
        }
        let expected = self.dirty.len().saturating_mul(self.snapshot_bytes_per_key) / 4 * 5;
        let mut batch = WriteBatch::with_capacity_bytes(expected.max(1 << 10));
        for (topic, off) in offsets {
            batch.put(format!("{OFFSET_PREFIX}{topic}"), off.to_be_bytes());
        }
        self.offsets.clone_from(offsets);
        if let Some(t) = max_time {
            batch.put(MAX_TIME_KEY, t.to_be_bytes());
            self.max_time = Some(t);
        }
        for (end, key) in &self.timers_added {
            batch.put(timer_key(*end, key), []);
        }
        for k in self.timers_taken.drain(..) {
            batch.delete(k);
        }
        self.timers_unwritten.append(&mut self.timers_added);
        // In key order: RocksDB's memtable inserts a sorted batch much faster (each insert starts
        // its skip-list search where the previous one ended) than one in arrival order.
        let mut slots = std::mem::take(&mut self.dirty);
        slots.sort_unstable_by(|&a, &b| self.slots[a as usize].key.cmp(&self.slots[b as usize].key));
        for &i in &slots {
            let c = &mut self.slots[i as usize];
            c.dirty = false;
            c.pending = true;
        }
        self.snapshot = Some(Snapshot { slots, next: 0, batch, buf: Vec::new() });
        true
    }

    /// Serialises up to `budget` keys of the running snapshot (decreasing it by the keys
    /// visited); returns whether the snapshot is complete.
    pub fn snapshot_step(&mut self, budget: &mut usize) -> Result<bool, StateError> {
        let Some(snap) = &mut self.snapshot else { return Ok(true) };
        let end = snap.next.saturating_add(*budget).min(snap.slots.len());
        *budget -= end - snap.next;
        for &i in &snap.slots[snap.next..end] {
            // Slots do not move while a snapshot runs (only `begin_snapshot` compacts them).
            let c = &mut self.slots[i as usize];
            if c.pending {
                c.pending = false;
                put_state(&self.path, &mut snap.buf, &mut snap.batch, &c.key, &c.state)?;
            }
        }
        snap.next = end;
        Ok(snap.next >= snap.slots.len())
    }

    /// The completed snapshot (None when none is running). Call after `snapshot_step` returned
    /// true.
    pub fn finish_snapshot(&mut self) -> Option<FlushBatch> {
        let snap = self.snapshot.take()?;
        debug_assert!(snap.next >= snap.slots.len());
        if !snap.slots.is_empty() {
            self.snapshot_bytes_per_key = snap.batch.size_in_bytes() / snap.slots.len();
        }
        Some(FlushBatch { db: self.db.clone(), path: self.path.clone(), batch: snap.batch, keys: snap.slots.len() })
    }

    /// Registers that `key` has an open emitted window ending at `end`.
    pub fn add_timer(&mut self, end: i64, key: &str) {
        self.timers_added.insert((end, key.to_owned()));
    }

    /// Removes and returns every timer with an end at or before `horizon`, ordered by
    /// (end, key); a key may appear once per distinct end. The removal goes into the next
    /// snapshot, with the key states the caller changes.
    pub fn take_due_timers(&mut self, horizon: i64) -> Result<Vec<(i64, String)>, StateError> {
        let mut due = BTreeSet::new();
        if self.timers_taken_through.is_none_or(|t| t < horizon) {
            let mut ro = ReadOptions::default();
            let lower = self.timers_taken_through.map_or_else(|| TIMER_PREFIX.to_vec(), |t| timer_bound(t + 1));
            ro.set_iterate_lower_bound(lower);
            ro.set_iterate_upper_bound(horizon.checked_add(1).map_or_else(|| b"t0".to_vec(), timer_bound));
            for item in self.db.iterator_opt(IteratorMode::Start, ro) {
                let (k, _) = item.map_err(|e| self.rocks(e))?;
                if let Some(t) = parse_timer_key(&k) {
                    if due.insert(t) {
                        self.timers_taken.push(k.into_vec());
                    }
                }
            }
            self.timers_taken_through = Some(horizon);
        }
        let first_later = (horizon.saturating_add(1), String::new());
        // In a snapshot that may be unwritten: taken here, deleted by the next snapshot.
        let later = self.timers_unwritten.split_off(&first_later);
        for t in std::mem::replace(&mut self.timers_unwritten, later) {
            if due.insert(t.clone()) {
                self.timers_taken.push(timer_key(t.0, &t.1));
            }
        }
        // Never in a snapshot: nothing to delete.
        let later = self.timers_added.split_off(&first_later);
        due.extend(std::mem::replace(&mut self.timers_added, later));
        Ok(due.into_iter().collect())
    }

    /// Snapshots and writes in one step (no other snapshot may be unwritten). After it returns,
    /// the state up to `offsets` survives a crash. Returns the number of keys written.
    pub fn flush(&mut self, offsets: &BTreeMap<String, i64>, max_time: Option<i64>) -> Result<usize, StateError> {
        if !self.begin_snapshot(offsets, max_time, true) {
            return Ok(0);
        }
        self.snapshot_step(&mut { usize::MAX })?;
        self.finish_snapshot().map_or(Ok(0), |b| b.write())
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

/// The serialised changes of one store, written (synced) by whichever thread holds it.
pub struct FlushBatch {
    db: Arc<DB>,
    path: PathBuf,
    batch: WriteBatch,
    keys: usize,
}

impl std::fmt::Debug for FlushBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushBatch").field("path", &self.path).field("keys", &self.keys).finish()
    }
}

impl FlushBatch {
    /// Writes the batch with fsync; returns the number of keys in it. The batch is kept: a write
    /// that failed (e.g. the volume is full) can be tried again.
    pub fn write(&self) -> Result<usize, StateError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        // RocksDB takes the batch by value: write a copy (a memcpy beside an fsync).
        self.db
            .write_opt(WriteBatch::from_data(self.batch.data()), &wo)
            .map_err(|source| StateError::Rocks { path: self.path.display().to_string(), source })?;
        Ok(self.keys)
    }

    /// Serialised size in bytes.
    pub fn size_bytes(&self) -> usize {
        self.batch.size_in_bytes()
    }
}

/// A store, for taking RocksDB checkpoints (hard links of its files, after a flush of the
/// memtables) while the engine goes on. Each checkpoint holds the state exactly as of the last
/// write: state and offsets are written in one atomic batch.
#[derive(Clone)]
pub struct StoreHandle {
    db: Arc<DB>,
    path: PathBuf,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle").field("path", &self.path).finish()
    }
}

impl StoreHandle {
    /// Writes a RocksDB checkpoint into `dir`, which must not exist.
    pub fn create_checkpoint(&self, dir: &Path) -> Result<(), StateError> {
        let cp = rocksdb::checkpoint::Checkpoint::new(&*self.db)
            .map_err(|source| StateError::Rocks { path: self.path.display().to_string(), source })?;
        cp.create_checkpoint(dir).map_err(|source| StateError::Rocks { path: dir.display().to_string(), source })
    }
}

/// What a checkpoint directory (or any closed store) holds besides the key states, open
/// emitted windows and their timers (which are in its files).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreMeta {
    /// Next input offset per topic.
    pub offsets: BTreeMap<String, i64>,
    /// Largest event time applied (the watermark is derived from it).
    pub max_time: Option<i64>,
    /// Fingerprint of the definitions the state was computed with.
    pub fingerprint: Option<String>,
    /// State format.
    pub format: Option<u32>,
    /// RocksDB's estimate of the stored keys.
    pub estimated_keys: u64,
}

/// Reads the metadata of the closed store (or checkpoint) in `dir`, read-only.
pub fn read_meta(dir: &Path) -> Result<StoreMeta, StateError> {
    let rocks = |source| StateError::Rocks { path: dir.display().to_string(), source };
    let db = DB::open_for_read_only(&Options::default(), dir, false).map_err(rocks)?;
    let mut meta = StoreMeta {
        estimated_keys: db.property_int_value("rocksdb.estimate-num-keys").ok().flatten().unwrap_or(0),
        ..StoreMeta::default()
    };
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(b"m/".to_vec());
    ro.set_iterate_upper_bound(b"m0".to_vec());
    for item in db.iterator_opt(IteratorMode::Start, ro) {
        let (k, v) = item.map_err(rocks)?;
        if let Some(topic) = k.strip_prefix(OFFSET_PREFIX.as_bytes()) {
            if let Ok(arr) = <[u8; 8]>::try_from(&v[..]) {
                meta.offsets.insert(String::from_utf8_lossy(topic).into_owned(), i64::from_be_bytes(arr));
            }
        } else if &*k == MAX_TIME_KEY.as_bytes() {
            meta.max_time = <[u8; 8]>::try_from(&v[..]).ok().map(i64::from_be_bytes);
        } else if &*k == FINGERPRINT_KEY.as_bytes() {
            meta.fingerprint = Some(String::from_utf8_lossy(&v).into_owned());
        } else if &*k == FORMAT_KEY.as_bytes() {
            meta.format = <[u8; 4]>::try_from(&v[..]).ok().map(u32::from_be_bytes);
        }
    }
    Ok(meta)
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
    pub fn get<R: Record>(&self, key: &str) -> Option<R> {
        let bytes = self.db.get_pinned(entity_key(key)).ok().flatten()?;
        R::decode(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of the tests: one optional number, 8 bytes (or none).
    #[derive(Default, Debug, PartialEq)]
    struct Max {
        max_time: Option<i64>,
    }

    impl Record for Max {
        const FORMAT: u32 = 2;

        fn encode(&self, buf: &mut Vec<u8>) -> Result<(), String> {
            buf.extend(self.max_time.map(i64::to_be_bytes).unwrap_or_default());
            Ok(())
        }

        fn decode(bytes: &[u8]) -> Result<Self, String> {
            match bytes.len() {
                0 => Ok(Self { max_time: None }),
                8 => Ok(Self { max_time: Some(i64::from_be_bytes(bytes.try_into().expect("8 bytes"))) }),
                n => Err(format!("{n} bytes")),
            }
        }
    }

    fn open(env: &StoreEnv, partition: i32) -> PartitionStore<Max> {
        env.open(partition).unwrap()
    }

    #[test]
    fn flushed_state_and_offsets_survive_reopen_and_unflushed_changes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let env = StoreEnv::new(dir.path(), 1 << 20, 10);
        {
            let mut s = open(&env, 3);
            s.get_mut("u1").unwrap().max_time = Some(42);
            s.flush(&BTreeMap::from([("in".to_string(), 10)]), Some(42)).unwrap();
            s.get_mut("u2").unwrap().max_time = Some(7); // never flushed
        }
        let mut s = open(&env, 3);
        assert_eq!(s.stored_offset("in"), Some(10));
        assert_eq!(s.stored_max_time(), Some(42));
        assert_eq!(s.get_mut("u1").unwrap().max_time, Some(42));
        assert_eq!(s.get_mut("u2").unwrap().max_time, None);
        assert_eq!(s.reader().get::<Max>("u1").unwrap().max_time, Some(42));
        assert!(s.path().ends_with("partition-3"));
    }

    #[test]
    fn a_snapshot_holds_each_key_as_of_its_offsets_while_processing_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let env = StoreEnv::new(dir.path(), 1 << 20, 10);
        let mut s = open(&env, 0);
        for k in ["a", "b", "c"] {
            s.get_mut(k).unwrap().max_time = Some(1);
        }
        assert!(s.begin_snapshot(&BTreeMap::from([("in".to_string(), 3)]), Some(1), true));
        let mut budget = 1;
        assert!(!s.snapshot_step(&mut budget).unwrap());
        // Changes after the snapshot began (copy-on-write for "b" and "c", a new key "d").
        for k in ["b", "c", "d"] {
            s.get_mut(k).unwrap().max_time = Some(2);
        }
        assert!(s.snapshot_step(&mut { usize::MAX }).unwrap());
        s.finish_snapshot().unwrap().write().unwrap();
        drop(s);
        let mut s = open(&env, 0);
        assert_eq!(s.stored_offset("in"), Some(3));
        for k in ["a", "b", "c"] {
            assert_eq!(s.get_mut(k).unwrap().max_time, Some(1), "{k}");
        }
        assert_eq!(s.get_mut("d").unwrap().max_time, None);
    }

    #[test]
    fn trimming_keeps_changed_keys_and_reloads_the_others_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let env = StoreEnv::new(dir.path(), 1 << 20, 2);
        let mut s = open(&env, 0);
        let keys = ["a", "b", "c", "d", "e"];
        for (i, k) in keys.iter().enumerate() {
            s.get_mut(k).unwrap().max_time = Some(i as i64);
        }
        s.flush(&BTreeMap::from([("in".to_string(), 5)]), Some(4)).unwrap();
        // "d" changes (not written); a slot taken before the trim sees it through the slot.
        let d = s.slot("d").unwrap();
        s.state_mut(d).unwrap().max_time = Some(40);
        assert_eq!(s.slots.len(), 5);
        assert!(s.begin_snapshot(&BTreeMap::from([("in".to_string(), 6)]), Some(40), true));
        assert_eq!(s.slots.len(), 1, "only the changed key stays cached");
        assert!(s.snapshot_step(&mut { usize::MAX }).unwrap());
        s.finish_snapshot().unwrap().write().unwrap();
        // Every key again, in another order: slots are found anew after the compaction.
        for (i, k) in keys.iter().enumerate().rev() {
            let slot = s.slot(k).unwrap();
            let want = if *k == "d" { 40 } else { i as i64 };
            assert_eq!(s.state_mut(slot).unwrap().max_time, Some(want), "{k}");
        }
        assert_ne!(s.slot("d").unwrap(), d, "the slot from before the compaction is void");
        drop(s);
        let mut s = open(&env, 0);
        assert_eq!(s.get_mut("d").unwrap().max_time, Some(40));
        assert_eq!(s.get_mut("a").unwrap().max_time, Some(0));
    }

    #[test]
    fn a_store_in_another_format_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DB::open_default(dir.path().join("partition-1")).unwrap();
            db.put(b"k/u1", b"old layout").unwrap();
        }
        let err = StoreEnv::new(dir.path(), 1 << 20, 10).open::<Max>(1).unwrap_err().to_string();
        assert!(err.contains("written in state format unversioned") && err.contains("format 2"), "{err}");
    }

    #[test]
    fn timers_are_taken_in_end_order_and_their_removal_is_durable_only_when_written() {
        let dir = tempfile::tempdir().unwrap();
        let env = StoreEnv::new(dir.path(), 1 << 20, 10);
        let offsets = BTreeMap::from([("in".to_string(), 1)]);
        let due = |v: &[(i64, &str)]| v.iter().map(|(e, k)| (*e, (*k).to_owned())).collect::<Vec<_>>();
        {
            let mut s = open(&env, 0);
            s.add_timer(2_000, "b");
            s.add_timer(1_000, "a");
            s.add_timer(-5, "neg");
            s.add_timer(3_000, "a");
            s.flush(&offsets, Some(1)).unwrap();
            s.add_timer(1_500, "unflushed");
            assert_eq!(s.take_due_timers(1_999).unwrap(), due(&[(-5, "neg"), (1_000, "a"), (1_500, "unflushed")]));
            assert!(s.take_due_timers(1_999).unwrap().is_empty(), "taken once");
            // crash: nothing written since
        }
        {
            let mut s = open(&env, 0);
            assert_eq!(s.take_due_timers(1_000).unwrap(), due(&[(-5, "neg"), (1_000, "a")]));
            s.flush(&offsets, Some(2)).unwrap();
        }
        let mut s = open(&env, 0);
        assert_eq!(s.take_due_timers(i64::MAX).unwrap(), due(&[(2_000, "b"), (3_000, "a")]));
    }

    #[test]
    fn a_timer_in_a_snapshot_not_written_yet_is_still_found_and_then_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let env = StoreEnv::new(dir.path(), 1 << 20, 10);
        let offsets = BTreeMap::from([("in".to_string(), 1)]);
        {
            let mut s = open(&env, 0);
            s.add_timer(1_000, "a");
            s.add_timer(5_000, "b");
            assert!(s.begin_snapshot(&offsets, Some(1), true));
            s.snapshot_step(&mut { usize::MAX }).unwrap();
            let batch = s.finish_snapshot().unwrap(); // handed to the committer, not written yet
            assert_eq!(s.take_due_timers(1_000).unwrap(), [(1_000, "a".to_owned())]);
            batch.write().unwrap();
            assert!(s.take_due_timers(2_000).unwrap().is_empty(), "not found again once written");
            // The next snapshot deletes it; the other one stays.
            assert!(s.begin_snapshot(&BTreeMap::from([("in".to_string(), 2)]), Some(2), true));
            s.snapshot_step(&mut { usize::MAX }).unwrap();
            s.finish_snapshot().unwrap().write().unwrap();
        }
        let mut s = open(&env, 0);
        assert_eq!(s.take_due_timers(i64::MAX).unwrap(), [(5_000, "b".to_owned())]);
    }
}

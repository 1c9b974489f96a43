//! Checkpoints of the partition stores in an object store, and restore from them: what makes
//! a partition's state follow the partition when it moves to another worker.
//!
//! ```text
//!  committer thread, right after a synced state write
//!    └─ StoreHandle::create_checkpoint ─► <stateDir>/.checkpoints/partition-<p>-<n> (hard links)
//!  uploader thread (one; checkpoints are uploaded in the order they were taken)
//!    ├─ files/<sha256>: every file of the checkpoint the object store does not hold yet
//!    ├─ manifests/<seq>-<nonce>.json, written last: a checkpoint without its manifest does not exist
//!    └─ retention: the newest K manifests stay; files no kept manifest references are deleted
//!  assignment of a partition whose local store is missing or behind the committed offsets
//!    └─ newest manifest with this pipeline's fingerprint ─► download, verify sizes and SHA-256
//!       ─► the partition's store directory (the previous manifest when one is unusable)
//! ```
//! Object layout under the configured URI: `partition-<p>/manifests/<seq:016>-<nonce>.json` and
//! `partition-<p>/files/<sha256>`. Files are content-addressed, so a checkpoint uploads only what
//! changed since the previous one: RocksDB's table files are immutable, and a file this process
//! uploaded (or restored) for the partition is known by name and size without reading it again.
//!
//! Retention and concurrent writers: only the owner of a partition writes its checkpoints, but
//! for a moment after a rebalance the previous owner may still finish one. Manifest names carry
//! a random nonce, so two writers never overwrite each other, and any complete manifest is a
//! consistent checkpoint (state and offsets come from one atomic write). An unreferenced file is
//! deleted only when it is older than the oldest kept manifest, so the files of a checkpoint
//! still being uploaded are never taken away from it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use streamscore_crds::pipeline::StateConfig;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::record::FORMAT as STATE_FORMAT;
use crate::state::{read_meta, StateError, StoreHandle};

/// Layout of the manifest JSON. Bump on an incompatible change.
pub const MANIFEST_FORMAT: u32 = 1;

/// A checkpoint failure.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The store URI cannot be used.
    #[error("state.checkpointStore {uri:?}: {detail}")]
    Config {
        /// The URI.
        uri: String,
        /// What is wrong.
        detail: String,
    },
    /// The object store answered with an error.
    #[error("object store: {op} {path}: {source}")]
    Store {
        /// Operation.
        op: &'static str,
        /// Object path.
        path: String,
        /// Cause.
        source: object_store::Error,
    },
    /// A stored object is not what its manifest says.
    #[error("checkpoint {manifest}: {detail}")]
    Corrupt {
        /// Manifest path.
        manifest: String,
        /// What is wrong, naming the file.
        detail: String,
    },
    /// A local file operation failed.
    #[error("checkpoint directory {path}: {source}")]
    Local {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The uploader thread is gone.
    #[error("checkpoint uploader stopped")]
    Stopped,
}

fn local(path: &FsPath) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Local { path: path.display().to_string(), source }
}

/// One complete checkpoint of one partition's store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub manifest_format: u32,
    /// Input partition.
    pub partition: i32,
    /// Position in the partition's lineage (parent + 1).
    pub seq: u64,
    /// When the checkpoint was taken (ms since the epoch).
    pub created_ms: i64,
    /// Next input offset per topic: the state holds every record below.
    pub offsets: BTreeMap<String, i64>,
    /// Largest event time applied (the watermark is derived from it). Open emitted windows and
    /// their timers are in the files.
    pub max_time: Option<i64>,
    /// Fingerprint of the feature definitions and the state format the state was computed with.
    pub fingerprint: String,
    /// State format of the store.
    pub state_format: u32,
    /// Model version of the worker that took it.
    pub model_version: String,
    /// RocksDB's estimate of the keys stored.
    pub estimated_keys: u64,
    /// The manifest this one follows, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Every file of the store.
    pub files: Vec<FileEntry>,
}

/// A file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    /// File name in the store directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the content (the object is `files/<sha256>`).
    pub sha256: String,
}

/// What an upload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uploaded {
    /// Manifest id (its file name).
    pub id: String,
    /// Files uploaded (the others were in the store already).
    pub files_uploaded: usize,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Bytes of every file of the checkpoint.
    pub bytes_total: u64,
}

/// What this process knows about a partition's checkpoints: its last manifest and the files
/// that manifest references (present in the store as long as the manifest is kept).
#[derive(Clone, Debug, Default)]
pub struct Lineage {
    last: Option<(u64, String)>,
    /// Immutable files (RocksDB tables) by name: (size, sha256).
    files: HashMap<String, (u64, String)>,
}

impl Lineage {
    fn from_manifest(id: &str, m: &Manifest) -> Self {
        let files = m
            .files
            .iter()
            .filter(|f| immutable(&f.name))
            .map(|f| (f.name.clone(), (f.size, f.sha256.clone())))
            .collect();
        Self { last: Some((m.seq, id.to_owned())), files }
    }
}

/// RocksDB never rewrites a table or blob file under the same name; other files (MANIFEST,
/// CURRENT, OPTIONS, logs) may change, so they are hashed every time.
fn immutable(name: &str) -> bool {
    name.ends_with(".sst") || name.ends_with(".blob")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checkpoints in one object store (`s3://`, `gs://`, `az://` or `file://`).
pub struct ObjectCheckpoints {
    store: Arc<dyn ObjectStore>,
    root: Path,
    uri: String,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for ObjectCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectCheckpoints").field("uri", &self.uri).finish()
    }
}

impl ObjectCheckpoints {
    /// Connects to the store at `uri`. Credentials and endpoints come from the environment
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn open(uri: &str) -> Result<Self, CheckpointError> {
        Self::open_with(uri, &[])
    }

    /// [`ObjectCheckpoints::open`] with settings over the environment's: (name, value) pairs
    /// named like the environment variables (see [`read_credentials`]). A name that is not a
    /// setting of the store is skipped with a warning.
    pub fn open_with(uri: &str, settings: &[(String, String)]) -> Result<Self, CheckpointError> {
        let cfg_err = |detail: String| CheckpointError::Config { uri: uri.to_owned(), detail };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| cfg_err("not a URI".into()))?;
        let (store, root): (Arc<dyn ObjectStore>, Path) = match scheme {
            "file" => {
                std::fs::create_dir_all(rest).map_err(|e| cfg_err(format!("cannot create {rest}: {e}")))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(rest)
                    .map_err(|e| cfg_err(e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(fs), Path::default())
            }
            "s3" | "gs" | "az" => {
                let prefix = rest.split_once('/').map_or("", |(_, p)| p);
                let root = Path::parse(prefix.trim_matches('/')).map_err(|e| cfg_err(e.to_string()))?;
                let skipped = |name: &str| {
                    warn!(
                        setting = name,
                        store = uri,
                        "credentials file is not a setting of this object store; ignored"
                    );
                };
                let store: Arc<dyn ObjectStore> = match scheme {
                    "s3" => {
                        let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(uri);
                        for (name, value) in settings {
                            match name.to_ascii_lowercase().parse::<object_store::aws::AmazonS3ConfigKey>() {
                                Ok(key) => b = b.with_config(key, value),
                                Err(_) => skipped(name),
                            }
                        }
                        Arc::new(b.build().map_err(|e| cfg_err(e.to_string()))?)
                    }
                    "gs" => {
                        let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(uri);
                        for (name, value) in settings {
                            match name.to_ascii_lowercase().parse::<object_store::gcp::GoogleConfigKey>() {
                                Ok(key) => b = b.with_config(key, value),
                                Err(_) => skipped(name),
                            }
                        }
                        Arc::new(b.build().map_err(|e| cfg_err(e.to_string()))?)
                    }
                    _ => {
                        let mut b = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(uri);
                        for (name, value) in settings {
                            match name.to_ascii_lowercase().parse::<object_store::azure::AzureConfigKey>() {
                                Ok(key) => b = b.with_config(key, value),
                                Err(_) => skipped(name),
                            }
                        }
                        Arc::new(b.build().map_err(|e| cfg_err(e.to_string()))?)
                    }
                };
                (store, root)
            }
            other => return Err(cfg_err(format!("unsupported scheme {other:?} (s3, gs, az or file)"))),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("checkpoint-io")
            .build()
            .map_err(|e| cfg_err(format!("starting the I/O runtime: {e}")))?;
        Ok(Self { store, root, uri: uri.to_owned(), rt })
    }

    /// The object `name` under the URI, whole, at most `max` bytes (a larger one is refused
    /// before it is downloaded).
    pub fn fetch(&self, name: &str, max: u64) -> Result<Vec<u8>, CheckpointError> {
        let path = self.root.child(name);
        let meta = self.rt.block_on(self.store.head(&path)).map_err(Self::err("head", &path))?;
        if meta.size > max {
            return Err(CheckpointError::Config {
                uri: format!("{}/{name}", self.uri.trim_end_matches('/')),
                detail: format!("{} bytes, more than the limit of {max}", meta.size),
            });
        }
        let got =
            self.rt.block_on(async { self.store.get(&path).await?.bytes().await }).map_err(Self::err("get", &path))?;
        Ok(got.to_vec())
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn path(&self, partition: i32, rel: &str) -> Path {
        let mut p = self.root.clone();
        p = p.child(format!("partition-{partition}"));
        for part in rel.split('/') {
            p = p.child(part);
        }
        p
    }

    fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(object_store::Error) -> CheckpointError + 'a {
        move |source| CheckpointError::Store { op, path: path.to_string(), source }
    }

    fn list(&self, dir: &Path) -> Result<Vec<ObjectMeta>, CheckpointError> {
        let listed = self.rt.block_on(self.store.list_with_delimiter(Some(dir))).map_err(Self::err("list", dir))?;
        Ok(listed.objects)
    }

    /// The partition's manifests, newest first.
    pub fn manifests(&self, partition: i32) -> Result<Vec<ObjectMeta>, CheckpointError> {
        let mut v = self.list(&self.path(partition, "manifests"))?;
        v.retain(|m| m.location.filename().is_some_and(|f| f.ends_with(".json")));
        v.sort_by(|a, b| b.location.filename().cmp(&a.location.filename()));
        Ok(v)
    }

    /// Reads the manifest `id` of `partition`.
    pub fn read_manifest(&self, partition: i32, id: &str) -> Result<Manifest, CheckpointError> {
        let path = self.path(partition, &format!("manifests/{id}"));
        let bytes =
            self.rt.block_on(async { self.store.get(&path).await?.bytes().await }).map_err(Self::err("get", &path))?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| CheckpointError::Corrupt { manifest: path.to_string(), detail: format!("unreadable: {e}") })?;
        if m.manifest_format != MANIFEST_FORMAT || m.partition != partition {
            return Err(CheckpointError::Corrupt {
                manifest: path.to_string(),
                detail: format!("manifest format {} of partition {}", m.manifest_format, m.partition),
            });
        }
        Ok(m)
    }

    /// Uploads the closed store (a RocksDB checkpoint) in `dir` as the next checkpoint of
    /// `partition`: the files the store lacks, then the manifest. `lineage` says what is known
    /// to be there already and is advanced to the new manifest.
    pub fn upload(
        &self,
        partition: i32,
        dir: &FsPath,
        model_version: &str,
        lineage: &mut Lineage,
    ) -> Result<(Uploaded, Manifest), CheckpointError> {
        let meta = read_meta(dir)?;
        let mut files = Vec::new();
        let (mut files_uploaded, mut bytes_uploaded, mut bytes_total) = (0, 0, 0);
        let mut entries: Vec<_> =
            std::fs::read_dir(dir).map_err(local(dir))?.collect::<Result<_, _>>().map_err(local(dir))?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let size = entry.metadata().map_err(local(&entry.path()))?.len();
            bytes_total += size;
            if let Some((s, digest)) = lineage.files.get(&name).filter(|(s, _)| *s == size) {
                files.push(FileEntry { name, size: *s, sha256: digest.clone() });
                continue;
            }
            let bytes = std::fs::read(entry.path()).map_err(local(&entry.path()))?;
            let sha256 = sha256_hex(&bytes);
            let path = self.path(partition, &format!("files/{sha256}"));
            let present = self.rt.block_on(self.store.head(&path)).is_ok_and(|m| m.size == size);
            if !present {
                self.rt.block_on(self.store.put(&path, PutPayload::from(bytes))).map_err(Self::err("put", &path))?;
                files_uploaded += 1;
                bytes_uploaded += size;
            }
            files.push(FileEntry { name, size, sha256 });
        }
        let seq = match &lineage.last {
            Some((seq, _)) => seq + 1,
            None => self
                .manifests(partition)?
                .first()
                .and_then(|m| m.location.filename().and_then(|f| f.split('-').next()?.parse::<u64>().ok()))
                .map_or(1, |s| s + 1),
        };
        let manifest = Manifest {
            manifest_format: MANIFEST_FORMAT,
            partition,
            seq,
            created_ms: chrono::Utc::now().timestamp_millis(),
            offsets: meta.offsets,
            max_time: meta.max_time,
            fingerprint: meta.fingerprint.unwrap_or_default(),
            state_format: meta.format.unwrap_or(STATE_FORMAT),
            model_version: model_version.to_owned(),
            estimated_keys: meta.estimated_keys,
            parent: lineage.last.as_ref().map(|(_, id)| id.clone()),
            files,
        };
        let id = format!("{seq:016}-{:08x}.json", rand::random::<u32>());
        let path = self.path(partition, &format!("manifests/{id}"));
        let body = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Corrupt {
            manifest: path.to_string(),
            detail: format!("cannot encode: {e}"),
        })?;
        self.rt.block_on(self.store.put(&path, PutPayload::from(body))).map_err(Self::err("put", &path))?;
        *lineage = Lineage::from_manifest(&id, &manifest);
        Ok((Uploaded { id, files_uploaded, bytes_uploaded, bytes_total }, manifest))
    }

    /// Downloads the checkpoint `m` (manifest `id`) into `into` (replacing it), verifying each
    /// file's size and SHA-256. Returns the bytes downloaded.
    pub fn download(&self, id: &str, m: &Manifest, into: &FsPath) -> Result<u64, CheckpointError> {
        let manifest = self.path(m.partition, &format!("manifests/{id}")).to_string();
        let tmp = into.with_extension("restoring");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(local(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(local(&tmp))?;
        let mut total = 0;
        for f in &m.files {
            if f.name.contains('/') || f.name.starts_with('.') {
                return Err(CheckpointError::Corrupt { manifest, detail: format!("invalid file name {:?}", f.name) });
            }
            let path = self.path(m.partition, &format!("files/{}", f.sha256));
            let bytes =
                self.rt.block_on(async { self.store.get(&path).await?.bytes().await }).map_err(|e| match e {
                    // Gone (deleted by retention, or never written): this checkpoint is incomplete.
                    object_store::Error::NotFound { .. } => CheckpointError::Corrupt {
                        manifest: manifest.clone(),
                        detail: format!("file {} ({path}) cannot be read: {e}", f.name),
                    },
                    // The store did not answer: nothing is known about the checkpoint.
                    e => CheckpointError::Store { op: "get", path: path.to_string(), source: e },
                })?;
            if bytes.len() as u64 != f.size || sha256_hex(&bytes) != f.sha256 {
                return Err(CheckpointError::Corrupt {
                    manifest,
                    detail: format!(
                        "file {} ({path}) has {} bytes and another digest than the {} bytes the manifest names",
                        f.name,
                        bytes.len(),
                        f.size
                    ),
                });
            }
            let target = tmp.join(&f.name);
            std::fs::write(&target, &bytes).map_err(local(&target))?;
            total += f.size;
        }
        if into.exists() {
            std::fs::remove_dir_all(into).map_err(local(into))?;
        }
        std::fs::rename(&tmp, into).map_err(local(into))?;
        Ok(total)
    }

    /// Keeps the newest `keep` manifests of `partition`, deletes the others, and deletes every
    /// file that no kept manifest references and that is older than the oldest kept manifest.
    /// Returns (manifests deleted, files deleted).
    pub fn retain(&self, partition: i32, keep: usize) -> Result<(usize, usize), CheckpointError> {
        let manifests = self.manifests(partition)?;
        if manifests.len() <= keep.max(1) {
            return Ok((0, 0));
        }
        let (kept, old) = manifests.split_at(keep.max(1));
        let mut referenced = std::collections::HashSet::new();
        for m in kept {
            let id = m.location.filename().unwrap_or_default();
            // An unreadable kept manifest protects nothing, but must not stop retention.
            match self.read_manifest(partition, id) {
                Ok(man) => referenced.extend(man.files.into_iter().map(|f| f.sha256)),
                Err(e) => warn!(partition, error = %e, "kept checkpoint manifest is unreadable"),
            }
        }
        let oldest_kept = kept.iter().map(|m| m.last_modified).min().unwrap_or_default();
        for m in old {
            self.rt.block_on(self.store.delete(&m.location)).map_err(Self::err("delete", &m.location))?;
        }
        let mut deleted = 0;
        for f in self.list(&self.path(partition, "files"))? {
            let digest = f.location.filename().unwrap_or_default();
            if !referenced.contains(digest) && f.last_modified < oldest_kept {
                self.rt.block_on(self.store.delete(&f.location)).map_err(Self::err("delete", &f.location))?;
                deleted += 1;
            }
        }
        Ok((old.len(), deleted))
    }
}

/// Where a restored partition's state came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// Manifest id.
    pub id: String,
    /// Next input offset per topic of the restored state.
    pub offsets: BTreeMap<String, i64>,
    /// Bytes downloaded.
    pub bytes: u64,
}

struct Request {
    partition: i32,
    dir: PathBuf,
    offsets: BTreeMap<String, i64>,
    reply: Option<Sender<Result<String, String>>>,
}

/// The worker's checkpointing: takes RocksDB checkpoints, uploads them on a thread of its own,
/// applies retention, and restores partitions. Shared by the engine (restore) and the Kafka
/// loop (periodic, revoke and shutdown checkpoints).
pub struct Checkpointer {
    store: Arc<ObjectCheckpoints>,
    /// `state.seedStore`: another run's checkpoints, read only.
    seed: Option<Arc<ObjectCheckpoints>>,
    scratch: PathBuf,
    model_version: String,
    retain: usize,
    shared: Arc<Mutex<PartitionsKnown>>,
    metrics: Arc<Metrics>,
    next_dir: AtomicU64,
    /// Partitions with a periodic checkpoint queued or uploading: at most one each, so that a
    /// slow or unreachable object store cannot queue checkpoint directories (hard links that
    /// keep old table files on the state volume) without bound.
    queued: Mutex<std::collections::HashSet<i32>>,
    tx: Mutex<Option<Sender<Request>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").field("store", &self.store.uri()).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct PartitionsKnown {
    lineages: HashMap<i32, Lineage>,
    /// Offsets of the newest checkpoint per partition (written or restored by this process).
    offsets: HashMap<i32, BTreeMap<String, i64>>,
    /// Its manifest id.
    ids: HashMap<i32, String>,
    /// When it was written (Unix ms: completed by this process, or the manifest's time).
    at: HashMap<i32, i64>,
}

impl Checkpointer {
    /// Starts checkpointing to `cfg.checkpoint_store` (None when it is not set).
    pub fn start(
        cfg: &StateConfig,
        state_dir: &FsPath,
        model_version: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<Self>>, CheckpointError> {
        let Some(uri) = &cfg.checkpoint_store else { return Ok(None) };
        let settings = match &cfg.credentials_dir {
            Some(dir) => read_credentials(FsPath::new(dir))?,
            None => Vec::new(),
        };
        let store = Arc::new(ObjectCheckpoints::open_with(uri, &settings)?);
        let seed = match &cfg.seed_store {
            Some(uri) => Some(Arc::new(ObjectCheckpoints::open_with(uri, &settings)?)),
            None => None,
        };
        let scratch = state_dir.join(".checkpoints");
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch).map_err(local(&scratch))?;
        }
        std::fs::create_dir_all(&scratch).map_err(local(&scratch))?;
        let (tx, rx) = channel::<Request>();
        let cp = Arc::new(Self {
            store,
            seed,
            scratch,
            model_version: model_version.to_owned(),
            retain: cfg.retain_checkpoints.max(1) as usize,
            shared: Arc::default(),
            metrics,
            next_dir: AtomicU64::new(0),
            queued: Mutex::default(),
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(None),
        });
        let worker = cp.clone();
        let handle = std::thread::Builder::new()
            .name("checkpoint-upload".into())
            .spawn(move || {
                while let Ok(req) = rx.recv() {
                    let result = worker.upload(req.partition, &req.dir, &req.offsets);
                    let _ = std::fs::remove_dir_all(&req.dir);
                    if let Some(reply) = req.reply {
                        let _ = reply.send(result.map_err(|e| e.to_string()));
                    } else {
                        worker.queued.lock().unwrap_or_else(|e| e.into_inner()).remove(&req.partition);
                        if let Err(e) = result {
                            warn!(partition = req.partition, error = %e, "checkpoint upload failed; the next one retries");
                        }
                    }
                }
            })
            .map_err(local(&cp.scratch))?;
        *cp.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        info!(store = uri, interval = ?cfg.checkpoint_interval, retain = cfg.retain_checkpoints, "checkpoints enabled");
        Ok(Some(cp))
    }

    /// The object store.
    pub fn store(&self) -> &ObjectCheckpoints {
        &self.store
    }

    fn known(&self) -> std::sync::MutexGuard<'_, PartitionsKnown> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether there is nothing to checkpoint: no record applied yet, or the newest checkpoint
    /// of `partition` this process knows has these offsets.
    fn unchanged(&self, partition: i32, offsets: &BTreeMap<String, i64>) -> bool {
        offsets.is_empty() || self.known().offsets.get(&partition) == Some(offsets)
    }

    fn upload(&self, partition: i32, dir: &FsPath, offsets: &BTreeMap<String, i64>) -> Result<String, CheckpointError> {
        let started = Instant::now();
        let mut lineage = self.known().lineages.remove(&partition).unwrap_or_default();
        let result = self.store.upload(partition, dir, &self.model_version, &mut lineage);
        let (up, manifest) = match result {
            Ok(r) => r,
            Err(e) => {
                self.metrics.checkpoint_failures.inc();
                return Err(e);
            }
        };
        {
            let mut k = self.known();
            k.lineages.insert(partition, lineage);
            k.offsets.insert(partition, manifest.offsets.clone());
            k.ids.insert(partition, up.id.clone());
            k.at.insert(partition, chrono::Utc::now().timestamp_millis());
        }
        if &manifest.offsets != offsets {
            warn!(partition, stored = ?manifest.offsets, expected = ?offsets, "checkpoint offsets differ from the commit's");
        }
        self.metrics.checkpoints.inc();
        self.metrics.checkpoint_last_success.set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        self.metrics.checkpoint_uploaded_bytes.inc_by(up.bytes_uploaded);
        self.metrics.checkpoint_seconds.observe(started.elapsed().as_secs_f64());
        info!(
            partition,
            manifest = %up.id,
            files_uploaded = up.files_uploaded,
            bytes_uploaded = up.bytes_uploaded,
            bytes_total = up.bytes_total,
            offsets = ?manifest.offsets,
            took = ?started.elapsed(),
            "checkpoint complete"
        );
        match self.store.retain(partition, self.retain) {
            Ok((0, 0)) => {}
            Ok((m, f)) => info!(partition, manifests_deleted = m, files_deleted = f, "old checkpoints deleted"),
            Err(e) => warn!(partition, error = %e, "checkpoint retention failed; retried after the next checkpoint"),
        }
        Ok(up.id)
    }

    fn take(&self, partition: i32, handle: &StoreHandle) -> Result<PathBuf, CheckpointError> {
        let n = self.next_dir.fetch_add(1, Ordering::Relaxed);
        let dir = self.scratch.join(format!("partition-{partition}-{n}"));
        handle.create_checkpoint(&dir)?;
        Ok(dir)
    }

    /// Takes a checkpoint of `partition` now (call right after a state write, from the thread
    /// that writes) and queues its upload. Nothing happens when `offsets` (the store's) equal
    /// those of the partition's newest checkpoint.
    pub fn submit(
        &self,
        partition: i32,
        handle: &StoreHandle,
        offsets: BTreeMap<String, i64>,
    ) -> Result<(), CheckpointError> {
        if self.unchanged(partition, &offsets) {
            return Ok(());
        }
        if !self.queued.lock().unwrap_or_else(|e| e.into_inner()).insert(partition) {
            // The previous one is still queued or uploading (a slow or unreachable object
            // store): this one is skipped; the next interval takes a newer one.
            self.metrics.checkpoints_skipped.inc();
            tracing::debug!(partition, "previous checkpoint still uploading: this one skipped");
            return Ok(());
        }
        let sent = self.take(partition, handle).and_then(|dir| {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(CheckpointError::Stopped)?;
            tx.send(Request { partition, dir, offsets, reply: None }).map_err(|_| CheckpointError::Stopped)
        });
        if sent.is_err() {
            self.queued.lock().unwrap_or_else(|e| e.into_inner()).remove(&partition);
        }
        sent
    }

    /// Partitions whose periodic checkpoint is queued or uploading.
    pub fn queued(&self) -> usize {
        self.queued.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Takes a checkpoint of `partition` and waits until it is uploaded (revoke, shutdown).
    /// Returns the manifest id, or None when the newest checkpoint already has these offsets.
    pub fn checkpoint_now(
        &self,
        partition: i32,
        handle: &StoreHandle,
        offsets: BTreeMap<String, i64>,
    ) -> Result<Option<String>, CheckpointError> {
        if self.unchanged(partition, &offsets) {
            return Ok(None);
        }
        let dir = self.take(partition, handle)?;
        let (reply, answer) = channel();
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(CheckpointError::Stopped)?;
        tx.send(Request { partition, dir, offsets, reply: Some(reply) }).map_err(|_| CheckpointError::Stopped)?;
        match answer.recv() {
            Ok(Ok(id)) => Ok(Some(id)),
            Ok(Err(e)) => Err(CheckpointError::Corrupt { manifest: format!("partition-{partition}"), detail: e }),
            Err(_) => Err(CheckpointError::Stopped),
        }
    }

    /// Forgets what this process knew of `partition`'s checkpoints (its store was replaced or
    /// rebuilt: its files are not the ones the known manifest references).
    pub fn forget(&self, partition: i32) {
        let mut k = self.known();
        k.lineages.remove(&partition);
        k.offsets.remove(&partition);
        k.ids.remove(&partition);
        k.at.remove(&partition);
    }

    /// The newest checkpoint this process wrote or restored for `partition`: manifest id and
    /// when it was written (Unix ms).
    pub fn newest(&self, partition: i32) -> Option<(String, i64)> {
        let k = self.known();
        Some((k.ids.get(&partition)?.clone(), *k.at.get(&partition)?))
    }

    /// The manifest id of `partition`'s newest checkpoint this process wrote or restored.
    pub fn latest(&self, partition: i32) -> Option<String> {
        self.known().ids.get(&partition).cloned()
    }

    /// Restores into `into` the newest complete checkpoint of `partition` computed with
    /// `fingerprint` whose offsets are ahead of `local` (the local store's, None without one).
    /// A manifest or file that cannot be used is skipped with a warning naming it, and the
    /// previous checkpoint is tried. Returns None when no checkpoint is better than `local`.
    pub fn restore(
        &self,
        partition: i32,
        fingerprint: &str,
        local: Option<&BTreeMap<String, i64>>,
        into: &FsPath,
    ) -> Result<Option<Restored>, CheckpointError> {
        self.restore_from(&self.store.clone(), true, partition, fingerprint, local, into)
    }

    /// Whether a seed store (`state.seedStore`) is configured.
    pub fn has_seed(&self) -> bool {
        self.seed.is_some()
    }

    /// Restores into `into` the newest complete checkpoint of `partition` in the seed store
    /// (`state.seedStore`) computed with `fingerprint`. Its files are not known to this
    /// process's store: the partition's first own checkpoint uploads them all.
    pub fn restore_seed(
        &self,
        partition: i32,
        fingerprint: &str,
        into: &FsPath,
    ) -> Result<Option<Restored>, CheckpointError> {
        let Some(seed) = self.seed.clone() else { return Ok(None) };
        self.restore_from(&seed, false, partition, fingerprint, None, into)
    }

    fn restore_from(
        &self,
        store: &ObjectCheckpoints,
        own: bool,
        partition: i32,
        fingerprint: &str,
        local: Option<&BTreeMap<String, i64>>,
        into: &FsPath,
    ) -> Result<Option<Restored>, CheckpointError> {
        let started = Instant::now();
        // A checkpoint that could not be read because the store failed (not because it is
        // gone or damaged) may be fine: if nothing newer restores, the restore fails with that
        // error (the worker is not ready and retries) rather than going on as if there were no
        // checkpoint, which would start the partition from older or empty state.
        let mut unreachable: Option<CheckpointError> = None;
        for meta in store.manifests(partition)? {
            let id = meta.location.filename().unwrap_or_default().to_owned();
            let m = match store.read_manifest(partition, &id) {
                Ok(m) => m,
                Err(e) => {
                    self.metrics.checkpoint_fallbacks.inc();
                    warn!(partition, manifest = %id, error = %e, "checkpoint unusable; trying the previous one");
                    if is_transient(&e) {
                        unreachable.get_or_insert(e);
                    }
                    continue;
                }
            };
            if m.fingerprint != fingerprint || m.state_format != STATE_FORMAT {
                info!(partition, manifest = %id, "checkpoint computed with other feature definitions; skipped");
                continue;
            }
            if local.is_some_and(|l| !ahead(&m.offsets, l)) {
                return Ok(None);
            }
            match store.download(&id, &m, into) {
                Ok(bytes) => {
                    self.metrics.restore_downloaded_bytes.inc_by(bytes);
                    self.metrics.restore_seconds.observe(started.elapsed().as_secs_f64());
                    if !own {
                        info!(partition, manifest = %id, bytes, offsets = ?m.offsets, took = ?started.elapsed(), store = %store.uri(), "state seeded from another run's checkpoint");
                        return Ok(Some(Restored { id, offsets: m.offsets, bytes }));
                    }
                    let mut k = self.known();
                    k.lineages.insert(partition, Lineage::from_manifest(&id, &m));
                    k.offsets.insert(partition, m.offsets.clone());
                    k.ids.insert(partition, id.clone());
                    k.at.insert(partition, meta.last_modified.timestamp_millis());
                    info!(partition, manifest = %id, bytes, offsets = ?m.offsets, took = ?started.elapsed(), "state restored from checkpoint");
                    return Ok(Some(Restored { id, offsets: m.offsets, bytes }));
                }
                Err(e) => {
                    self.metrics.checkpoint_fallbacks.inc();
                    warn!(partition, manifest = %id, error = %e, "checkpoint unusable; trying the previous one");
                    if is_transient(&e) {
                        unreachable.get_or_insert(e);
                    }
                }
            }
        }
        match unreachable {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Stops the uploader after the queued uploads.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// Whether `e` says the object store failed to answer (network, server error, permissions),
/// rather than that the object is gone or not what its manifest says.
fn is_transient(e: &CheckpointError) -> bool {
    match e {
        CheckpointError::Store { source, .. } => !matches!(source, object_store::Error::NotFound { .. }),
        _ => false,
    }
}

/// The object-store settings in `dir` (`state.credentialsDir`, a mounted Secret): one file per
/// setting, named like its environment variable, holding its value (trailing newlines
/// dropped). Hidden entries (a Secret volume's `..data` links) are skipped.
pub fn read_credentials(dir: &FsPath) -> Result<Vec<(String, String)>, CheckpointError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(local(dir))? {
        let entry = entry.map_err(local(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        let value = std::fs::read_to_string(&path).map_err(local(&path))?;
        out.push((name, value.trim_end_matches(['\n', '\r']).to_owned()));
    }
    out.sort();
    Ok(out)
}

/// Whether `a` holds records that `b` does not: some topic's offset is larger.
fn ahead(a: &BTreeMap<String, i64>, b: &BTreeMap<String, i64>) -> bool {
    a.iter().any(|(t, o)| b.get(t).is_none_or(|x| o > x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::KeyState;
    use crate::state::StoreEnv;

    fn offsets(n: i64) -> BTreeMap<String, i64> {
        BTreeMap::from([("in".to_string(), n)])
    }

    /// A store with `keys` keys written and flushed at offset `at`.
    fn write(env: &StoreEnv, keys: std::ops::Range<u32>, at: i64) {
        let mut s = env.open::<KeyState>(0).unwrap();
        s.set_fingerprint("fp").unwrap();
        for k in keys {
            s.get_mut(&format!("user-{k}")).unwrap().features.max_time = Some(i64::from(k));
        }
        s.flush(&offsets(at), Some(at)).unwrap();
    }

    /// Checkpoints to `uri` on the S3 endpoint `endpoint`, its settings in a credentials
    /// directory under `dir` (as a mounted Secret).
    fn s3_at(dir: &FsPath, endpoint: &str, uri: &str) -> StateConfig {
        let creds = dir.join("creds");
        std::fs::create_dir(&creds).unwrap();
        for (k, v) in [
            ("AWS_ENDPOINT", endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_REGION", "us-east-1"),
        ] {
            std::fs::write(creds.join(k), v).unwrap();
        }
        StateConfig {
            checkpoint_store: Some(uri.into()),
            credentials_dir: Some(creds.display().to_string()),
            ..Default::default()
        }
    }

    fn checkpoint_dir(env: &StoreEnv, dir: &FsPath) {
        let s = env.open::<KeyState>(0).unwrap();
        s.handle().create_checkpoint(dir).unwrap();
    }

    #[test]
    fn credentials_are_read_from_a_secret_volume_and_applied_over_the_environment() {
        // A Secret volume: files behind `..data` links, which are skipped.
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("..2026_11_30");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("AWS_ACCESS_KEY_ID"), "key-id\n").unwrap();
        std::fs::write(data.join("AWS_REGION"), "eu-central-1").unwrap();
        // An S3 endpoint that records the request head and answers an empty listing.
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", server.local_addr().unwrap());
        let seen = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let (mut conn, _) = server.accept().unwrap();
            let mut head = String::new();
            let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
            while r.read_line(&mut head).unwrap() > 2 && !head.ends_with("\r\n\r\n") {}
            let body = r#"<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>bucket</Name><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>"#;
            write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
            head
        });
        std::fs::write(data.join("AWS_ENDPOINT"), &endpoint).unwrap();
        std::fs::write(data.join("AWS_SECRET_ACCESS_KEY"), "secret").unwrap();
        std::fs::write(data.join("AWS_ALLOW_HTTP"), "true").unwrap();
        std::fs::write(data.join("README"), "not a setting").unwrap();
        std::os::unix::fs::symlink("..2026_11_30", tmp.path().join("..data")).unwrap();
        for name in
            ["AWS_ACCESS_KEY_ID", "AWS_REGION", "AWS_ENDPOINT", "AWS_SECRET_ACCESS_KEY", "AWS_ALLOW_HTTP", "README"]
        {
            std::os::unix::fs::symlink(format!("..data/{name}"), tmp.path().join(name)).unwrap();
        }
        let settings = read_credentials(tmp.path()).unwrap();
        let names: Vec<&str> = settings.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["AWS_ACCESS_KEY_ID", "AWS_ALLOW_HTTP", "AWS_ENDPOINT", "AWS_REGION", "AWS_SECRET_ACCESS_KEY", "README"]
        );
        assert_eq!(settings[0].1, "key-id", "trailing newline dropped");
        // Unknown names are skipped; known ones reach the client: the request goes to the
        // endpoint of the file, signed with its key for its region.
        let store = ObjectCheckpoints::open_with("s3://bucket/prefix", &settings).unwrap();
        assert!(store.manifests(0).unwrap().is_empty());
        let head = seen.join().unwrap();
        assert!(head.starts_with("GET /bucket"), "{head}");
        assert!(head.contains("Credential=key-id/") && head.contains("/eu-central-1/s3/"), "{head}");
        assert!(matches!(read_credentials(&tmp.path().join("missing")), Err(CheckpointError::Local { .. })));
    }

    /// An object store that accepts connections and never answers: periodic checkpoints of a
    /// partition do not pile up behind the hanging upload (one queued or uploading per
    /// partition; the rest are skipped and counted), so the state volume does not fill with
    /// checkpoint directories.
    #[test]
    fn a_hanging_object_store_queues_at_most_one_checkpoint_per_partition() {
        let tmp = tempfile::tempdir().unwrap();
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap(); // never accepts
        let cfg = s3_at(tmp.path(), &format!("http://{}", server.local_addr().unwrap()), "s3://bucket/hang");
        let metrics = Arc::new(Metrics::new());
        let state_dir = tmp.path().join("state");
        std::fs::create_dir_all(&state_dir).unwrap();
        let cp = Checkpointer::start(&cfg, &state_dir, "v1", metrics.clone()).unwrap().unwrap();
        let env = StoreEnv::new(state_dir.join("stores"), 1 << 20, 100);
        for round in 1..=6 {
            write(&env, 0..10, round);
            let s = env.open::<KeyState>(0).unwrap();
            cp.submit(0, &s.handle(), offsets(round)).unwrap();
        }
        assert_eq!(cp.queued(), 1);
        assert_eq!(metrics.checkpoints_skipped.get(), 5);
        let dirs = std::fs::read_dir(state_dir.join(".checkpoints")).unwrap().count();
        assert_eq!(dirs, 1, "one checkpoint directory on the state volume");
        drop(server);
    }

    /// A store that lists a checkpoint but refuses to serve it (403 here; an outage, a
    /// permission change): the restore fails with the store's error instead of answering "no
    /// checkpoint", after which the partition would start from empty or older state.
    #[test]
    fn a_checkpoint_the_store_cannot_serve_fails_the_restore_instead_of_starting_empty() {
        use std::io::{BufRead, Write};
        let tmp = tempfile::tempdir().unwrap();
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", server.local_addr().unwrap());
        std::thread::spawn(move || {
            for conn in server.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut head = String::new();
                let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                while r.read_line(&mut head).unwrap_or(0) > 2 && !head.ends_with("\r\n\r\n") {}
                let (status, body) = if head.contains("list-type=2") {
                    (
                        "200 OK",
                        r#"<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>bucket</Name><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated><Contents><Key>pre/partition-0/manifests/0000000000000001-abc.json</Key><LastModified>2026-12-01T00:00:00.000Z</LastModified><ETag>"x"</ETag><Size>100</Size><StorageClass>STANDARD</StorageClass></Contents></ListBucketResult>"#,
                    )
                } else {
                    (
                        "403 Forbidden",
                        r#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>denied</Message></Error>"#,
                    )
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let cfg = s3_at(tmp.path(), &endpoint, "s3://bucket/pre");
        let metrics = Arc::new(Metrics::new());
        let cp = Checkpointer::start(&cfg, tmp.path(), "v1", metrics.clone()).unwrap().unwrap();
        let r = cp.restore(0, "fp", None, &tmp.path().join("into"));
        assert!(matches!(r, Err(CheckpointError::Store { op: "get", .. })), "{r:?}");
        assert_eq!(metrics.checkpoint_fallbacks.get(), 1);
    }

    #[test]
    fn a_changed_key_uploads_new_tables_only_and_restore_verifies_every_file() {
        let tmp = tempfile::tempdir().unwrap();
        let env = StoreEnv::new(tmp.path().join("state"), 1 << 20, 100);
        let store = ObjectCheckpoints::open(&format!("file://{}", tmp.path().join("objects").display())).unwrap();
        let mut lineage = Lineage::default();

        write(&env, 0..2_000, 10);
        checkpoint_dir(&env, &tmp.path().join("cp1"));
        let (first, m1) = store.upload(0, &tmp.path().join("cp1"), "v1", &mut lineage).unwrap();
        assert!(first.files_uploaded >= 2 && first.bytes_uploaded > 0, "{first:?}");
        assert_eq!((m1.seq, m1.offsets.clone(), m1.fingerprint.as_str()), (1, offsets(10), "fp"));
        let tables1: Vec<_> = m1.files.iter().filter(|f| f.name.ends_with(".sst")).cloned().collect();
        assert!(!tables1.is_empty(), "{m1:?}");

        // One key changes: a new table holds it; the old tables are not uploaded again.
        write(&env, 7..8, 11);
        checkpoint_dir(&env, &tmp.path().join("cp2"));
        let (second, m2) = store.upload(0, &tmp.path().join("cp2"), "v1", &mut lineage).unwrap();
        let tables2: Vec<_> = m2.files.iter().filter(|f| f.name.ends_with(".sst")).collect();
        assert!(tables2.len() > tables1.len(), "a new table: {m2:?}");
        for t in &tables1 {
            assert!(m2.files.contains(t), "old table {} kept as it was", t.name);
        }
        let new_table_bytes: u64 = tables2.iter().filter(|t| !tables1.contains(t)).map(|t| t.size).sum();
        let old_table_bytes: u64 = tables1.iter().map(|t| t.size).sum();
        assert!(
            second.bytes_uploaded < old_table_bytes && second.bytes_uploaded >= new_table_bytes,
            "uploaded {second:?}: new tables {new_table_bytes} B, old tables {old_table_bytes} B"
        );
        assert_eq!((m2.seq, m2.parent.as_deref()), (2, Some(first.id.as_str())));

        // Restore of the newest: same offsets, every key there.
        let restored = tmp.path().join("restored");
        store.download(&second.id, &m2, &restored).unwrap();
        let env2 = StoreEnv::new(tmp.path().join("r"), 1 << 20, 100);
        std::fs::create_dir_all(tmp.path().join("r")).unwrap();
        std::fs::rename(&restored, env2.partition_path(0)).unwrap();
        let mut s = env2.open::<KeyState>(0).unwrap();
        assert_eq!(s.stored_offset("in"), Some(11));
        assert_eq!(s.get_mut("user-1999").unwrap().features.max_time, Some(1999));
        assert_eq!(s.get_mut("user-7").unwrap().features.max_time, Some(7));

        // A file whose content differs from its digest is refused, naming the file.
        let victim = &tables1[0];
        let object = tmp.path().join("objects/partition-0/files").join(&victim.sha256);
        std::fs::write(&object, b"not a table").unwrap();
        let err = store.download(&second.id, &m2, &tmp.path().join("again")).unwrap_err().to_string();
        assert!(err.contains(&victim.name) && err.contains(&second.id), "{err}");
    }

    #[test]
    fn retention_keeps_every_file_a_kept_manifest_references() {
        let tmp = tempfile::tempdir().unwrap();
        let env = StoreEnv::new(tmp.path().join("state"), 1 << 20, 100);
        let store = ObjectCheckpoints::open(&format!("file://{}", tmp.path().join("objects").display())).unwrap();
        let mut lineage = Lineage::default();
        let mut ids = Vec::new();
        for i in 0..4u32 {
            write(&env, i * 100..i * 100 + 100, i64::from(i) + 1);
            let dir = tmp.path().join(format!("cp{i}"));
            checkpoint_dir(&env, &dir);
            ids.push(store.upload(0, &dir, "v1", &mut lineage).unwrap().0.id);
            // File times have a resolution; keep uploads of successive checkpoints apart.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let (manifests, files) = store.retain(0, 2).unwrap();
        assert_eq!(manifests, 2);
        let left: Vec<_> =
            store.manifests(0).unwrap().iter().map(|m| m.location.filename().unwrap().to_owned()).collect();
        assert_eq!(left, vec![ids[3].clone(), ids[2].clone()]);
        // Both kept checkpoints still restore completely.
        for id in &left {
            let m = store.read_manifest(0, id).unwrap();
            store.download(id, &m, &tmp.path().join(format!("r-{id}"))).unwrap();
        }
        // The oldest checkpoint had files of its own (its MANIFEST/OPTIONS at least): deleted.
        assert!(files > 0, "unreferenced files deleted");
    }

    #[test]
    fn the_newest_usable_checkpoint_is_restored_and_a_broken_one_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let env = StoreEnv::new(tmp.path().join("state"), 1 << 20, 100);
        let uri = format!("file://{}", tmp.path().join("objects").display());
        let cfg = StateConfig { checkpoint_store: Some(uri), ..StateConfig::default() };
        let metrics = Arc::new(Metrics::new());
        let cp = Checkpointer::start(&cfg, tmp.path(), "v1", metrics.clone()).unwrap().unwrap();
        write(&env, 0..50, 5);
        let handle = env.open::<KeyState>(0).unwrap().handle();
        let first = cp.checkpoint_now(0, &handle, offsets(5)).unwrap().expect("uploaded");
        // Unchanged offsets: nothing is taken or uploaded.
        assert_eq!(cp.checkpoint_now(0, &handle, offsets(5)).unwrap(), None);
        drop(handle);
        write(&env, 50..60, 9);
        let handle = env.open::<KeyState>(0).unwrap().handle();
        let second = cp.checkpoint_now(0, &handle, offsets(9)).unwrap().expect("uploaded");
        drop(handle);
        assert_eq!(metrics.checkpoints.get(), 2);

        // The newest manifest references a file that is gone: the previous checkpoint is used.
        let m2 = cp.store().read_manifest(0, &second).unwrap();
        let m1 = cp.store().read_manifest(0, &first).unwrap();
        let only_in_2 = m2.files.iter().find(|f| !m1.files.iter().any(|g| g.sha256 == f.sha256)).unwrap();
        std::fs::remove_file(tmp.path().join("objects/partition-0/files").join(&only_in_2.sha256)).unwrap();
        let into = tmp.path().join("restored");
        let r = cp.restore(0, "fp", None, &into).unwrap().expect("a checkpoint");
        assert_eq!((r.id.as_str(), r.offsets.clone()), (first.as_str(), offsets(5)));
        assert_eq!(metrics.checkpoint_fallbacks.get(), 1);
        // Another fingerprint: nothing to restore; a local store at least as new: not needed.
        assert_eq!(cp.restore(0, "other", None, &into).unwrap(), None);
        assert_eq!(cp.restore(0, "fp", Some(&offsets(5)), &into).unwrap(), None);
        cp.shutdown();
    }
}

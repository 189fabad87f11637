//! The metadata database: SQLite in WAL mode, shared by every process that uses the root.
//!
//! [`Db`] wraps one connection per process behind a mutex and runs every call on tokio's
//! blocking pool ([`Db::read`], [`Db::write`]). Writes run in `BEGIN IMMEDIATE` transactions:
//! the write lock is taken up front, so a transaction never fails half-way because another
//! process wrote in between, and the garbage collector's mark-and-sweep (one such transaction)
//! is serialized with every write that adds a lease resource.
//!
//! Tables: `images` (name → JSON of an `ImageRecord`), `content_labels`, `snapshots`,
//! `leases` (owner process: pid, start time, boot id, PID namespace) and `lease_resources` (lease → content digests, ingest refs,
//! snapshot keys; see [`Resource`]).
//!
//! Constants: [`BUSY_TIMEOUT`] is long (a minute) because a garbage collection holds the write
//! lock while it unlinks blobs, and a pull in another process should wait for it rather than
//! fail; every other transaction takes milliseconds.
//!
//! A full disk: opening writes nothing when the schema is current, and the store keeps a
//! [`Reserve`] of disk space that is released when the disk is full (before a write
//! transaction, or when opening failed), so that a failed pull's lease can still be deleted, a
//! collection can run and free space, and the store always opens. SQLite's "database or disk
//! is full" becomes an [`Error::Io`] of kind `StorageFull` naming the database file, which
//! reads as resource exhaustion.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::{blocking, fsutil::Reserve};
use crate::{
    backend::{owner::Owner, LeaseId},
    error::{Error, Result},
};

/// How long a statement waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Bumped when the schema changes incompatibly.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS images (
    name   TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS content_labels (
    digest TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (digest, key)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT NOT NULL UNIQUE,
    parent     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    labels     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent);
CREATE TABLE IF NOT EXISTS leases (
    id         TEXT PRIMARY KEY,
    pid        INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    boot_id    TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    pid_ns     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS lease_resources (
    lease TEXT NOT NULL,
    kind  TEXT NOT NULL,
    key   TEXT NOT NULL,
    PRIMARY KEY (lease, kind, key)
);
CREATE INDEX IF NOT EXISTS lease_resources_key ON lease_resources (kind, key);
";

/// The process's connection to the metadata database.
#[derive(Clone)]
pub(crate) struct Db {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
    reserve: Reserve,
}

impl Db {
    /// Opens the database, switching it to WAL mode and creating the schema; on a full disk,
    /// releases `reserve` and tries once more. Makes the reserve when it is missing.
    pub(crate) fn open(path: &Path, reserve: Reserve) -> Result<Db> {
        let conn = match open_connection(path) {
            Ok(conn) => conn,
            Err(e) if reserve.release_if_full() => {
                tracing::debug!("opening the metadata database failed on a full disk ({}); trying again", e.chain());
                open_connection(path)
            }
            .map_err(full(path))?,
            Err(e) => return Err(full(path)(e)),
        };
        reserve.ensure();
        Ok(Db { conn: Arc::new(Mutex::new(conn)), path: Arc::new(path.to_owned()), reserve })
    }

    /// The disk-space reserve of the store.
    pub(crate) fn reserve(&self) -> &Reserve {
        &self.reserve
    }

    /// Runs `f` on the connection, on the blocking pool.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (conn, path) = (self.conn.clone(), self.path.clone());
        blocking(move || f(&conn.lock().unwrap_or_else(PoisonError::into_inner)).map_err(full(&path))).await
    }

    /// Runs `f` in an immediate write transaction, on the blocking pool; commits when `f`
    /// succeeds, rolls back when it fails. `f` may do filesystem work that must not interleave
    /// with another process's transaction (the garbage collector's, in particular). On a full
    /// disk, the reserve is released first.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (conn, path, reserve) = (self.conn.clone(), self.path.clone(), self.reserve.clone());
        blocking(move || {
            reserve.release_if_full();
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        })
        .await
        .map_err(full(&path))
    }
}

/// Opens a connection; writes only when the schema must be created or upgraded.
fn open_connection(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    let version = |conn: &Connection| -> Result<i64> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(Error::FailedPrecondition(format!(
                "{} has schema version {version}, newer than this pullbox's {SCHEMA_VERSION}",
                path.display()
            )));
        }
        Ok(version)
    };
    // Added after version 1 without breaking it: older pullbox binaries insert leases without
    // the column (namespace 0, "unknown") and read it not at all.
    let has_pid_ns = |conn: &Connection| -> Result<bool> {
        Ok(conn.query_row("SELECT COUNT(*) > 0 FROM pragma_table_info('leases') WHERE name = 'pid_ns'", [], |r| {
            r.get(0)
        })?)
    };
    // A current store is opened without a write, so it opens on a full disk.
    if version(&conn)? == SCHEMA_VERSION && has_pid_ns(&conn)? {
        return Ok(conn);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if version(&tx)? < SCHEMA_VERSION {
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    if !has_pid_ns(&tx)? {
        tx.execute_batch("ALTER TABLE leases ADD COLUMN pid_ns INTEGER NOT NULL DEFAULT 0")?;
    }
    tx.commit()?;
    Ok(conn)
}

/// SQLite's "database or disk is full" as an I/O error of kind `StorageFull` naming the
/// database file (resource exhaustion); other errors unchanged.
fn full(path: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::Db(rusqlite::Error::SqliteFailure(code, message)) if code.code == rusqlite::ErrorCode::DiskFull => {
            let source = rusqlite::Error::SqliteFailure(code, message);
            Error::Io {
                context: format!("metadata database {}", path.display()),
                source: std::io::Error::new(std::io::ErrorKind::StorageFull, source),
            }
        }
        e => e,
    }
}

/// The kinds of things a lease holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    /// A committed blob, by digest.
    Content,
    /// A write in progress, by ingest reference.
    Ingest,
    /// A snapshot, by key.
    Snapshot,
}

impl Resource {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Resource::Content => "content",
            Resource::Ingest => "ingest",
            Resource::Snapshot => "snapshot",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Resource> {
        match s {
            "content" => Some(Resource::Content),
            "ingest" => Some(Resource::Ingest),
            "snapshot" => Some(Resource::Snapshot),
            _ => None,
        }
    }
}

/// Records that `lease` holds `key`. `NotFound` when the lease does not exist (deleted, or
/// collected because its owner died): a write under it would be unprotected.
pub(crate) fn add_resource(conn: &Connection, lease: &LeaseId, kind: Resource, key: &str) -> Result<()> {
    let exists = conn.query_row("SELECT 1 FROM leases WHERE id = ?1", [&lease.0], |_| Ok(())).optional()?.is_some();
    if !exists {
        return Err(Error::NotFound(format!("lease {}", lease.0)));
    }
    conn.execute(
        "INSERT OR IGNORE INTO lease_resources (lease, kind, key) VALUES (?1, ?2, ?3)",
        params![lease.0, kind.as_str(), key],
    )?;
    Ok(())
}

/// Forgets `key` in every lease (the object is gone or was renamed).
pub(crate) fn drop_resource(conn: &Connection, kind: Resource, key: &str) -> Result<()> {
    conn.execute("DELETE FROM lease_resources WHERE kind = ?1 AND key = ?2", params![kind.as_str(), key])?;
    Ok(())
}

/// The lease owner in columns `pid, start_time, boot_id, pid_ns` of the `leases` table, which
/// start at column `first` of `row`.
pub(crate) fn owner_from_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Owner> {
    Ok(Owner {
        pid: row.get(first)?,
        start_time: row.get::<_, i64>(first + 1)? as u64,
        boot_id: row.get(first + 2)?,
        pid_ns: row.get::<_, i64>(first + 3)? as u64,
    })
}

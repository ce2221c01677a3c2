//! SQLite: the embedded default. One file in the server's data dir (mode 0600: it holds sealed CA
//! keys and token hashes), WAL journal, foreign keys on. Writers that must not interleave use
//! `BEGIN IMMEDIATE`, which takes SQLite's write lock up front.

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite, Transaction};
use std::path::Path;
use std::time::Duration;

pub struct SqliteStore {
    pool: Pool<Sqlite>,
    path: std::path::PathBuf,
    /// (device, inode) of the file opened, to notice it being removed or replaced.
    identity: (u64, u64),
}

fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl SqliteStore {
    pub async fn open(path: &Path) -> crate::Result<Self> {
        let location = path.display().to_string();
        let open_err = |detail: String| crate::StoreError::Open {
            location: location.clone(),
            detail,
        };
        if !path.exists() {
            create_private(path).map_err(|e| open_err(e.to_string()))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            // A COMMIT that fails (SQLITE_FULL on a full disk) is rolled back by SQLite, but sqlx
            // keeps the connection's transaction depth at 1, so every later BEGIN on it fails
            // ("non-zero transaction depth") and audit appends were lost long after the disk had
            // room again. Such a connection is closed instead of reused. The ping first lets the
            // queued rollback of a dropped transaction finish before the depth is read.
            .after_release(|conn, _| {
                Box::pin(async move {
                    use sqlx::{Connection, TransactionManager};
                    if conn.ping().await.is_err() {
                        return Ok(false);
                    }
                    Ok(<Sqlite as sqlx::Database>::TransactionManager::get_transaction_depth(conn) == 0)
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        crate::postgres::check_schema(&pool).await?;
        sqlx::migrate!("migrations/sqlite")
            .run(&pool)
            .await
            .map_err(crate::postgres::migrate_error)?;
        let identity = file_identity(path).map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            pool,
            path: path.to_owned(),
            identity,
        })
    }

    pub(crate) fn check_file(&self) -> crate::Result<()> {
        let gone = |detail: String| crate::StoreError::Open {
            location: self.path.display().to_string(),
            detail,
        };
        match file_identity(&self.path) {
            Ok(id) if id == self.identity => Ok(()),
            Ok(_) => Err(gone("the store file was replaced while the server ran; restart the server so it opens the file now there".into())),
            Err(e) => Err(gone(format!("the store file is gone while the server ran ({e}); writes would be lost: restore it from a backup"))),
        }
    }

    async fn begin_write(&self) -> crate::Result<Transaction<'static, Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(crate::error::q)
    }

    /// SQLite has no notifications; other processes (the CLI) change the file, so listeners look
    /// once a second. Reading one aggregate from a local file is cheap.
    async fn change_listener(&self) -> crate::Result<Box<dyn crate::ChangeListener>> {
        Ok(Box::new(Ticker))
    }

    async fn notify(&self) -> crate::Result<()> {
        Ok(())
    }

    /// `BEGIN IMMEDIATE` already holds the database's write lock.
    async fn lock_audit(_: &mut Transaction<'static, Sqlite>) -> crate::Result<()> {
        Ok(())
    }
}

struct Ticker;

#[async_trait::async_trait]
impl crate::ChangeListener for Ticker {
    async fn next(&mut self) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

crate::backend::impl_store!(SqliteStore, sqlx::Sqlite, "sqlite");

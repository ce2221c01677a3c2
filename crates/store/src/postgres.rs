//! PostgreSQL: for several server replicas sharing one database. Audit appends take a
//! transaction-scoped advisory lock so replicas never fork the hash chain; token consumption and
//! serial uniqueness rely on conditional updates and primary keys, which hold across replicas.

use crate::SCHEMA_VERSION;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Pool, Postgres, Transaction};
use std::time::Duration;

/// Arbitrary but fixed: the advisory-lock key for audit-log appends ("tapa" in ASCII).
const AUDIT_LOCK: i64 = 0x7461_7061;

/// The LISTEN/NOTIFY channel replicas use to tell each other to look again.
const CHANNEL: &str = "tapproof_changes";
/// A look now and then even without notices, in case one was lost with a dropped connection.
const SAFETY_NET: Duration = Duration::from_secs(30);

pub struct PostgresStore {
    pool: Pool<Postgres>,
}

struct Listener(Option<sqlx::postgres::PgListener>);

#[async_trait::async_trait]
impl crate::ChangeListener for Listener {
    async fn next(&mut self) {
        match self.0.as_mut() {
            Some(listener) => {
                // recv reconnects on its own after a dropped connection; the caller re-reads.
                let _ = tokio::time::timeout(SAFETY_NET, listener.recv()).await;
            }
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

impl PostgresStore {
    pub async fn open(url: &str) -> crate::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| StoreError::Open {
                location: redact(url),
                detail: e.to_string(),
            })?;
        check_schema(&pool).await?;
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .map_err(migrate_error)?;
        Ok(Self { pool })
    }

    async fn change_listener(&self) -> crate::Result<Box<dyn crate::ChangeListener>> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .map_err(crate::error::q)?;
        listener.listen(CHANNEL).await.map_err(crate::error::q)?;
        Ok(Box::new(Listener(Some(listener))))
    }

    async fn notify(&self) -> crate::Result<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&self.pool)
            .await
            .map_err(crate::error::q)?;
        Ok(())
    }

    /// A server holds no file of its own: nothing to check.
    pub(crate) fn check_file(&self) -> crate::Result<()> {
        Ok(())
    }

    async fn begin_write(&self) -> crate::Result<Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(crate::error::q)
    }

    async fn lock_audit(tx: &mut Transaction<'static, Postgres>) -> crate::Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(AUDIT_LOCK)
            .execute(&mut **tx)
            .await
            .map_err(crate::error::q)?;
        Ok(())
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`, for error messages and logs.
impl PostgresStore {
    /// The URL with its password masked.
    pub fn redacted(url: &str) -> String {
        redact(url)
    }
}

pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Refuses a database migrated by a newer tapproof before touching it.
pub(crate) async fn check_schema<DB: sqlx::Database>(pool: &Pool<DB>) -> crate::Result<()>
where
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    i64: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    use sqlx::Row;
    // The table does not exist in a new database: that error just means "version 0".
    let found = match sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM _sqlx_migrations")
        .fetch_one(pool)
        .await
    {
        Ok(row) => row.try_get::<i64, _>(0usize).unwrap_or(0),
        Err(_) => 0,
    };
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found,
            known: SCHEMA_VERSION,
        });
    }
    Ok(())
}

pub(crate) fn migrate_error(e: sqlx::migrate::MigrateError) -> StoreError {
    match e {
        sqlx::migrate::MigrateError::VersionMissing(v) => StoreError::NewerSchema {
            found: v,
            known: SCHEMA_VERSION,
        },
        sqlx::migrate::MigrateError::Execute(inner) => match StoreError::from_sqlx(inner, "row", "") {
            e @ (StoreError::ReadOnly(_) | StoreError::Unavailable(_)) => e,
            other => StoreError::Migrate(other.to_string()),
        },
        other => StoreError::Migrate(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("postgres:///db"), "postgres:///db");
    }
}

crate::backend::impl_store!(PostgresStore, sqlx::Postgres, "postgres");

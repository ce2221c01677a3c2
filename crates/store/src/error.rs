//! Store errors. No sqlx type crosses this crate's API: callers see what went wrong in words and
//! a kind they can map to an API error code.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("is unknown")]
    Unknown,
    #[error("has a wrong secret")]
    WrongSecret,
    #[error("expired at {at} (unix seconds); create a new one with `tapproof server token create`")]
    Expired { at: i64 },
    #[error("was already used at {at} (unix seconds); tokens are single-use")]
    AlreadyUsed { at: i64 },
    #[error("has had all of its {max} uses (the last at {at}, unix seconds); create a new one")]
    UsesSpent { max: i64, at: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store {location}: {detail}")]
    Open { location: String, detail: String },
    #[error("store schema is version {found}, newer than this tapproof knows ({known}); upgrade tapproof before using this store")]
    NewerSchema { found: i64, known: i64 },
    #[error("store migration failed: {0}")]
    Migrate(String),
    #[error("store is read-only: {0}")]
    ReadOnly(String),
    #[error("store is unreachable: {0}")]
    Unavailable(String),
    #[error("{what} {value} already exists")]
    Duplicate { what: &'static str, value: String },
    #[error("join token {0}")]
    Token(TokenRejection),
    #[error("no {what} {value}")]
    NotFound { what: &'static str, value: String },
    #[error("store holds a malformed {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("store query failed: {0}")]
    Query(String),
}

impl StoreError {
    /// Stable code for API errors and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Open { .. } => "store_open_failed",
            Self::NewerSchema { .. } => "store_schema_newer",
            Self::Migrate(_) => "store_migration_failed",
            Self::ReadOnly(_) => "store_read_only",
            Self::Unavailable(_) => "store_unavailable",
            Self::Duplicate { .. } => "duplicate",
            Self::Token(TokenRejection::Unknown) | Self::Token(TokenRejection::WrongSecret) => {
                "token_invalid"
            }
            Self::Token(TokenRejection::Expired { .. }) => "token_expired",
            Self::Token(TokenRejection::AlreadyUsed { .. } | TokenRejection::UsesSpent { .. }) => {
                "token_used"
            }
            Self::NotFound { .. } => "not_found",
            Self::Corrupt { .. } => "store_corrupt",
            Self::Query(_) => "store_query_failed",
        }
    }

    /// Maps a sqlx error; `what`/`value` name the row for unique violations.
    pub(crate) fn from_sqlx(e: sqlx::Error, what: &'static str, value: &str) -> Self {
        match &e {
            sqlx::Error::Database(db) => {
                if db.is_unique_violation() {
                    return Self::Duplicate {
                        what,
                        value: value.to_owned(),
                    };
                }
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let msg = db.message().to_owned();
                // PostgreSQL 25006 read_only_sql_transaction; SQLite SQLITE_READONLY is 8, and its
                // extended codes keep 8 in the low byte.
                let sqlite_readonly = code.parse::<i32>().is_ok_and(|c| c & 0xff == 8);
                if code == "25006" || sqlite_readonly {
                    return Self::ReadOnly(msg);
                }
                Self::Query(format!("{msg} (code {code})"))
            }
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_) => Self::Unavailable(e.to_string()),
            _ => Self::Query(e.to_string()),
        }
    }
}

pub(crate) fn q(e: sqlx::Error) -> StoreError {
    StoreError::from_sqlx(e, "row", "")
}

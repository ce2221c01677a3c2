//! What an error means for the exit code: 2 for a problem with what the operator gave us
//! (config, identity files, arguments), 1 for everything else. `main.rs` turns them into codes.

use tapproof_server::ServerError;

/// A problem with what the operator gave us (config, identity files): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigProblem(pub String);

/// A server error as the CLI reports it: bad input, a missing or wrong data dir or KEK are
/// configuration problems.
pub fn classify(e: ServerError) -> anyhow::Error {
    match e {
        ServerError::Invalid(_)
        | ServerError::Kek(_)
        | ServerError::DataDir { .. }
        | ServerError::NotInitialised
        | ServerError::AlreadyInitialised => ConfigProblem(e.to_string()).into(),
        other => anyhow::Error::new(other),
    }
}

//! The process raises its own soft limit on open files to the hard limit at start, as nginx and
//! HAProxy do: a shell or a unit without `LimitNOFILE` gives 1,024, which a few hundred tunnels
//! and app connections exhaust. The limits that bound connections are then set below what it
//! got, keeping a reserve so established tunnels and the control plane always get an fd.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises the soft limit to the hard one; returns the soft limit now in force.
pub fn raise() -> Option<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "raised the open-file limit");
                return Some(hard);
            }
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        }
    }
    Some(soft)
}

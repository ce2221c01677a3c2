//! What a listener admits: places counted in total and per key (a source address before the
//! handshake, a peer identity after it), each held by a guard until it drops. The tunnel listener
//! and the control plane's listener both ask it before they spend a handshake on a connection,
//! and the agent counts tunnels and streams per peer identity with it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Places in total and per key; 0 means no cap.
/// How long a listener waits after accept() failed (EMFILE, ENFILE, ENOBUFS): retrying at once
/// would spin a core while nothing frees up (nginx and HAProxy pause their accepts too). Agent
/// and server listeners both use it.
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug)]
pub struct Admission<K: Hash + Eq + Clone> {
    max_total: usize,
    max_per_key: usize,
    open: Mutex<(usize, HashMap<K, usize>)>,
}

/// Which cap refused a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    PerKey,
}

/// One admitted place, given back when dropped.
#[derive(Debug)]
pub struct Admitted<K: Hash + Eq + Clone> {
    admission: Arc<Admission<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Admission<K> {
    pub fn new(max_total: usize, max_per_key: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_key,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    pub fn admit(self: &Arc<Self>, key: K) -> Result<Admitted<K>, Full> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if self.max_total > 0 && open.0 >= self.max_total {
            return Err(Full::Total);
        }
        let here = open.1.entry(key.clone()).or_insert(0);
        if self.max_per_key > 0 && *here >= self.max_per_key {
            if *here == 0 {
                open.1.remove(&key);
            }
            return Err(Full::PerKey);
        }
        *here += 1;
        open.0 += 1;
        Ok(Admitted {
            admission: self.clone(),
            key,
        })
    }

    /// Places held now, in total.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl<K: Hash + Eq + Clone> Drop for Admitted<K> {
    fn drop(&mut self) {
        let mut open = self.admission.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.1.remove(&self.key);
            }
        }
    }
}

/// A log line at most every `every`: anyone can make handshakes fail, and must not fill the logs.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)`: write the line now, saying `n` more like it were not written since the last.
    pub fn tick(&self) -> Option<u64> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.0 {
            Some(t) if now.duration_since(t) < self.every => {
                st.1 += 1;
                None
            }
            _ => {
                let suppressed = st.1;
                *st = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_throttle_writes_one_line_per_window_and_counts_the_rest() {
        let t = LogThrottle::new(Duration::from_secs(3600));
        assert_eq!(t.tick(), Some(0));
        assert_eq!(t.tick(), None);
        assert_eq!(t.tick(), None);
        let t = LogThrottle::new(Duration::ZERO);
        assert_eq!(t.tick(), Some(0));
    }

    #[test]
    fn caps_total_and_per_key_and_frees_on_drop() {
        let a = Admission::new(3, 2);
        let one = a.admit("x").unwrap();
        let _two = a.admit("x").unwrap();
        assert_eq!(a.admit("x").unwrap_err(), Full::PerKey);
        let _three = a.admit("y").unwrap();
        assert_eq!(a.admit("y").unwrap_err(), Full::Total);
        drop(one);
        assert_eq!(a.open(), 2);
        a.admit("x").unwrap();
        let unlimited = Admission::new(0, 0);
        let held: Vec<_> = (0..1000).map(|_| unlimited.admit(1).unwrap()).collect();
        assert_eq!(unlimited.open(), held.len());
    }
}

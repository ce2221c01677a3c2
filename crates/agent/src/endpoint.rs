//! Peer and forward addresses: an IP address and port, or a host name and port. A name is
//! resolved by the system resolver when it is used: a peer's at every dial of a tunnel (so a
//! reconnect follows a changed DNS record), a forward's at most once per `FORWARD_TTL` (it is
//! used per stream). The system resolver gives no record TTL, so that one is ours.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a forward's resolved addresses are reused.
pub const FORWARD_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

impl Endpoint {
    /// Whether this surely stays on the host: a loopback address, or the name `localhost`.
    pub fn is_loopback(&self) -> bool {
        match self {
            Self::Addr(a) => a.ip().is_loopback(),
            Self::Name { host, .. } => host.eq_ignore_ascii_case("localhost"),
        }
    }

    /// The address, when it is one (not a name).
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Addr(a) => Some(*a),
            Self::Name { .. } => None,
        }
    }

    /// The addresses it stands for now (a name: asked of the system resolver).
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        match self {
            Self::Addr(a) => Ok(vec![*a]),
            Self::Name { host, port } => {
                let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port)).await?.collect();
                if found.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{host} has no address"),
                    ));
                }
                Ok(found)
            }
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Self::Addr(a)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Self::Addr(a));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| {
            format!("{s:?} is not HOST:PORT or IP:PORT (e.g. db-1.example.org:15008, 10.0.0.2:15008)")
        })?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: port {port:?} is not 1 to 65535"))?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let name = host.strip_suffix('.').unwrap_or(host);
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) || host.contains(['[', ']'])
        {
            return Err(format!(
                "{s:?}: {host:?} is neither an IP address nor a host name (IPv6 addresses go in brackets: [::1]:15008)"
            ));
        }
        Ok(Self::Name {
            host: name.to_ascii_lowercase(),
            port,
        })
    }
}

impl<'de> serde::Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Resolved forward names, each reused for `FORWARD_TTL`.
#[derive(Debug, Default)]
pub struct ForwardCache {
    table: Mutex<HashMap<Endpoint, (Instant, Vec<SocketAddr>)>>,
}

impl ForwardCache {
    /// The addresses of `forward` (cached for a name), in the resolver's order.
    pub async fn addresses(&self, forward: &Endpoint) -> std::io::Result<Vec<SocketAddr>> {
        if let Endpoint::Addr(a) = forward {
            return Ok(vec![*a]);
        }
        if let Some((at, addrs)) = self.table.lock().unwrap_or_else(|p| p.into_inner()).get(forward) {
            if at.elapsed() < FORWARD_TTL {
                return Ok(addrs.clone());
            }
        }
        let addrs = forward.resolve().await?;
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the config's forwards; a reload may leave stale names, dropped here.
        table.retain(|_, (at, _)| at.elapsed() < FORWARD_TTL);
        table.insert(forward.clone(), (Instant::now(), addrs.clone()));
        Ok(addrs)
    }

    /// Connects to the first address of `forward` that answers.
    /// Connects to the first of `forward`'s addresses that answers, from a socket with `mark`
    /// (`socket::connect`).
    pub async fn connect(
        &self,
        forward: &Endpoint,
        mark: Option<u32>,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let mut last = None;
        for addr in self.addresses(forward).await? {
            match crate::socket::connect(addr, mark).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names_parse_and_bad_ones_are_named() {
        assert_eq!(
            "10.0.0.2:15008".parse::<Endpoint>().unwrap(),
            Endpoint::Addr("10.0.0.2:15008".parse().unwrap())
        );
        assert_eq!(
            "[::1]:5432".parse::<Endpoint>().unwrap(),
            Endpoint::Addr("[::1]:5432".parse().unwrap())
        );
        assert_eq!(
            "DB-1.Example.org:15008".parse::<Endpoint>().unwrap(),
            Endpoint::Name {
                host: "db-1.example.org".into(),
                port: 15008
            }
        );
        assert!("localhost:5432".parse::<Endpoint>().unwrap().is_loopback());
        assert!(!"db-1:5432".parse::<Endpoint>().unwrap().is_loopback());
        for bad in [
            "db-1",
            "db-1:0",
            "db-1:99999",
            ":15008",
            "-db:1",
            "db..x:1",
            "a b:1",
            "::1:5432",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn localhost_resolves_and_is_cached() {
        let e: Endpoint = "localhost:5432".parse().unwrap();
        let cache = ForwardCache::default();
        let first = cache.addresses(&e).await.unwrap();
        assert!(
            first.iter().all(|a| a.ip().is_loopback() && a.port() == 5432),
            "{first:?}"
        );
        assert_eq!(cache.addresses(&e).await.unwrap(), first);
    }
}

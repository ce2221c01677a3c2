//! Socket options for tunnel connections (the ones that cross a network).
//!
//! A peer host that vanishes without a FIN (power loss, a cut link) would otherwise leave a pooled
//! tunnel looking alive for the kernel's full retransmission timeout (about 15 minutes), and every
//! app connection in that time would be sent into it. Keepalive probes find an idle dead peer in
//! about a minute; TCP_USER_TIMEOUT bounds how long sent data may stay unacknowledged.

use socket2::{SockRef, TcpKeepalive};
use std::time::Duration;
use tokio::net::TcpStream;

pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_PROBES: u32 = 3;
pub const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// TCP_NODELAY (the tunnel batches writes itself), keepalive and a user timeout. Failures are
/// logged, not fatal: the tunnel still works, only dead-peer detection is slower.
pub fn tune_tunnel(tcp: &TcpStream) {
    let sock = SockRef::from(tcp);
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let result = tcp
        .set_nodelay(true)
        .and_then(|()| sock.set_tcp_keepalive(&keepalive))
        .and_then(|()| sock.set_tcp_user_timeout(Some(USER_TIMEOUT)));
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot set tunnel socket options");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tunnel_sockets_get_keepalive_and_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        tune_tunnel(&tcp);
        let sock = SockRef::from(&tcp);
        assert!(tcp.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
    }
}

//! The helpers: a half-close-aware echo server, one-shot and holding clients for tests inside
//! network namespaces (where the test process itself cannot open sockets), the plain relay, and
//! the dispatch to the load generators (loadgen.rs).

use crate::DevCommand;
use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub async fn run(command: DevCommand) -> anyhow::Result<()> {
    match command {
        DevCommand::EchoServer { listen } => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!("listening {}", listener.local_addr()?);
            echo_forever(listener).await
        }
        DevCommand::Send { connect, data } => {
            let mut tcp = TcpStream::connect(connect)
                .await
                .with_context(|| format!("cannot connect to {connect}"))?;
            tcp.write_all(data.as_bytes()).await?;
            tcp.shutdown().await?;
            let mut back = Vec::new();
            tcp.read_to_end(&mut back).await?;
            println!("{}", String::from_utf8_lossy(&back));
            Ok(())
        }
        DevCommand::Hold { connect, data } => {
            let mut tcp = TcpStream::connect(connect)
                .await
                .with_context(|| format!("cannot connect to {connect}"))?;
            tcp.write_all(data.as_bytes()).await?;
            let mut back = vec![0u8; data.len()];
            tcp.read_exact(&mut back).await?;
            println!("held {}", tcp.local_addr()?);
            // Stays until the peer closes or the process is killed.
            let mut rest = Vec::new();
            tcp.read_to_end(&mut rest).await?;
            Ok(())
        }
        DevCommand::Relay { listen, to } => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!("listening {}", listener.local_addr()?);
            relay_forever(listener, to).await
        }
        DevCommand::Handshakes {
            pki,
            trust_domain,
            seconds,
            profile,
        } => crate::loadgen::handshakes(&pki, &trust_domain, seconds, profile).await,
        DevCommand::SignLoad {
            node,
            concurrency,
            seconds,
        } => crate::loadgen::sign_load(&node, concurrency, seconds).await,
        DevCommand::FeedLoad { node, agents, then } => crate::loadgen::feed_load(&node, agents, &then).await,
    }
}

/// Joins each accepted connection to a new connection to `to`, bytes both ways, half-close
/// carried through; 64 KiB buffers, TCP_NODELAY, like the agents' app sockets.
async fn relay_forever(listener: TcpListener, to: std::net::SocketAddr) -> anyhow::Result<()> {
    loop {
        let (mut app, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut up) = TcpStream::connect(to).await else {
                return;
            };
            let _ = (app.set_nodelay(true), up.set_nodelay(true));
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut app, &mut up, 64 * 1024, 64 * 1024).await;
        });
    }
}

/// Echoes each connection until the client half-closes, then closes its own side.
pub async fn echo_forever(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (mut tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes cross a chain of two relays to the echo server and back; the client's half-close
    /// reaches the echo server through both, whose close comes back as EOF.
    #[tokio::test]
    async fn two_chained_relays_carry_bytes_and_half_close() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(echo_forever(echo));
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back_addr = back.local_addr().unwrap();
        tokio::spawn(relay_forever(back, echo_addr));
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        tokio::spawn(relay_forever(front, back_addr));

        let mut tcp = TcpStream::connect(front_addr).await.unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let (mut r, mut w) = tcp.split();
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let (_, read) = tokio::join!(send, r.read_to_end(&mut back));
        read.unwrap();
        assert_eq!(back, data);
    }
}

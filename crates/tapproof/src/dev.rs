//! Hidden helpers for tests and benchmarks that run inside network namespaces, where the test
//! process itself cannot open sockets: a half-close-aware echo server and a one-shot client; and
//! the load generators of bench/ (loadgen.rs).

use crate::cli::{DevArgs, DevCommand};
use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    match args.command {
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
        DevCommand::Handshakes {
            pki,
            trust_domain,
            seconds,
        } => crate::loadgen::handshakes(&pki, &trust_domain, seconds).await,
        DevCommand::SignLoad {
            node,
            concurrency,
            seconds,
        } => crate::loadgen::sign_load(&node, concurrency, seconds).await,
        DevCommand::FeedLoad { node, agents, then } => crate::loadgen::feed_load(&node, agents, &then).await,
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

//! A loopback TCP proxy that can make connections go silent without closing them,
//! as a dead peer or a cut network does.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

#[derive(Debug, Default)]
struct ProxyState {
    /// Epoch given to the next accepted connection.
    next_epoch: AtomicU64,
    /// Connections with an epoch below this are silent.
    silent_below: AtomicU64,
    /// While set, new connections are accepted and then stay silent too.
    blackhole: AtomicBool,
    /// Epochs of the connections open now.
    open: Mutex<BTreeSet<u64>>,
}

/// Forwards 127.0.0.1:`addr().port()` to a target address.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Starts a proxy on an ephemeral loopback port that forwards to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(ProxyState::default());
        let mut tasks = JoinSet::new();

        let accept_state = state.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let epoch = accept_state.next_epoch.fetch_add(1, Ordering::SeqCst);
                let state = accept_state.clone();
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    state.open.lock().unwrap().insert(epoch);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let upstream = pipe(client_read, server_write, state.clone(), epoch);
                    let downstream = pipe(server_read, client_write, state.clone(), epoch);
                    tokio::join!(upstream, downstream);
                    state.open.lock().unwrap().remove(&epoch);
                });
            }
        });

        Proxy { addr, state, tasks }
    }

    /// Returns the proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes every open connection silent for good: bytes are no longer forwarded in
    /// either direction, and the sockets stay open. New connections work. Returns how
    /// many open connections were silenced by this call.
    pub fn silence_open_connections(&self) -> usize {
        let next = self.state.next_epoch.load(Ordering::SeqCst);
        let before = self.state.silent_below.fetch_max(next, Ordering::SeqCst);
        self.state.open.lock().unwrap().range(before..next).count()
    }

    /// While on, new connections are accepted but nothing is forwarded, as behind a
    /// network cut; open connections are silenced as well.
    pub fn set_blackhole(&self, on: bool) {
        if on {
            let _ = self.silence_open_connections();
        }
        self.state.blackhole.store(on, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<ProxyState>,
    epoch: u64,
) {
    let born_in_blackhole = state.blackhole.load(Ordering::SeqCst);
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let silent = born_in_blackhole || epoch < state.silent_below.load(Ordering::SeqCst);
        if silent {
            // Hold both sockets open and forward nothing, forever.
            std::future::pending::<()>().await;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if epoch < state.silent_below.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

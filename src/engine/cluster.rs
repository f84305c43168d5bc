//! Connects the processes of a cluster run to each other before timely starts, as timely's
//! own networking would (each process connects to every process before it in the hostfile and
//! accepts a connection from every one after it, announcing its index as a big-endian `u64`),
//! but with a deadline and messages of our own: timely's retries forever and prints to stdout.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

/// How long to wait between attempts to reach a process that is not listening yet.
const RETRY: Duration = Duration::from_millis(200);

/// A connected socket to every other process, by process index (None for this one), or an
/// error naming the processes that did not connect within `timeout`.
pub fn connect(
    addresses: &[String],
    me: usize,
    timeout: Duration,
) -> Result<Vec<Option<TcpStream>>> {
    let deadline = Instant::now() + timeout;
    let listener = TcpListener::bind(&addresses[me]).with_context(|| {
        format!(
            "process {me} could not listen on {} (its line of the hostfile)",
            addresses[me]
        )
    })?;
    listener.set_nonblocking(true)?;
    let mut sockets: Vec<Option<TcpStream>> = (0..addresses.len()).map(|_| None).collect();
    // Earlier processes are connected to; later ones connect here.
    for (index, address) in addresses.iter().enumerate().take(me) {
        let mut stream = connect_before(address, deadline).with_context(|| {
            format!("process {index} ({address}) did not answer within {timeout:?}")
        })?;
        stream.write_all(&(me as u64).to_be_bytes())?;
        sockets[index] = Some(stream);
    }
    while sockets.iter().skip(me + 1).any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut index = [0u8; 8];
                stream.read_exact(&mut index)?;
                stream.set_read_timeout(None)?;
                let index = u64::from_be_bytes(index) as usize;
                if index <= me || index >= addresses.len() || sockets[index].is_some() {
                    return Err(anyhow!(
                        "a connection announced itself as process {index}, which is not \
                         expected here (process {me} of {})",
                        addresses.len()
                    ));
                }
                stream.set_nodelay(true)?;
                sockets[index] = Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (me + 1..addresses.len())
                        .filter(|&i| sockets[i].is_none())
                        .map(|i| format!("{i} ({})", addresses[i]))
                        .collect();
                    return Err(anyhow!(
                        "process {} did not connect within {timeout:?}",
                        missing.join(", ")
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accepting a connection from another process"),
        }
    }
    Ok(sockets)
}

/// Connects to `address`, trying again until `deadline`.
fn connect_before(address: &str, deadline: Instant) -> Result<TcpStream> {
    loop {
        let tried = address
            .to_socket_addrs()
            .map_err(anyhow::Error::from)
            .and_then(|mut addrs| {
                let addr = addrs
                    .next()
                    .ok_or_else(|| anyhow!("{address} names no address"))?;
                let left = deadline.saturating_duration_since(Instant::now());
                Ok(TcpStream::connect_timeout(
                    &addr,
                    left.max(Duration::from_millis(10)),
                )?)
            });
        match tried {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(RETRY),
        }
    }
}

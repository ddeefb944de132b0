//! Relaying bytes: TCP to TCP, and TCP to an HTTP/2 (HBONE) stream. Both
//! directions run until both end, or until one fails — then the other is
//! abandoned and the workload-facing sockets are reset, never closed as if
//! the relay had completed. Buffers grow with traffic, so an idle
//! connection holds little.
use std::{
    future::poll_fn,
    pin::{Pin, pin},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{drain, record::Outcome};

/// Read sizes of the TCP side of a tunnel: a connection starts with the
/// first and moves to the next each time a read fills what it had, so an
/// idle or chatty connection holds 1 KiB and a bulk one reads 256 KiB at a
/// time (as ztunnel's buffers grow).
const READ_CHUNKS: [usize; 3] = [1024, 16 * 1024, 256 * 1024];

/// Runs both directions of a relay until both end, or until the first one
/// fails: the other is then abandoned and the error returned, so that the
/// caller resets what is left instead of closing it as if complete. The
/// directions must not close their sockets on drop (borrowed halves).
/// They are pinned by the caller: taken by value, each would be held twice
/// in this future (as its argument and as the pinned local), for as long
/// as the connection lives.
pub async fn both_directions(
    mut up: Pin<&mut impl std::future::Future<Output = std::io::Result<()>>>,
    mut down: Pin<&mut impl std::future::Future<Output = std::io::Result<()>>>,
) -> std::io::Result<()> {
    let forced = drain::forced();
    tokio::pin!(forced);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            () = &mut forced => {
                return Err(std::io::Error::other("the agent's drain time is over"));
            }
            r = &mut up, if !up_done => {
                r?;
                up_done = true;
            }
            r = &mut down, if !down_done => {
                r?;
                down_done = true;
            }
        }
    }
    Ok(())
}

/// Copies both ways until both sides are done. Returns the outcome and the
/// bytes (workload → destination, destination → workload), counted even when
/// one side breaks. When either side fails, both connections are reset: a
/// relay that broke never ends with a clean close.
pub async fn tcp_to_tcp(
    mut client: tokio::net::TcpStream,
    mut upstream: tokio::net::TcpStream,
) -> (Outcome, (u64, u64)) {
    let (mut sent, mut received) = (0, 0);
    let result = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let up = pin!(pump(cr, uw, &mut sent));
        let down = pin!(pump(ur, cw, &mut received));
        both_directions(up, down).await
    };
    match result {
        Ok(()) => (Outcome::Ok, (sent, received)),
        Err(e) => {
            tracing::debug!(error = %e, "relay failed; resetting both connections");
            reset(client);
            reset(upstream);
            (Outcome::broken(), (sent, received))
        }
    }
}

/// One direction: copies until EOF, then half-closes the writer (its reset
/// disarmed first: this side of the relay has really ended).
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    total: &mut u64,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // Grows with traffic: 1 KiB, then 16 KiB, then 64 KiB, each time a read
    // fills the buffer (an idle connection holds 1 KiB per direction).
    let mut buf = vec![0u8; 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            disarm_reset(to.as_ref());
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        *total += n as u64;
        if n == buf.len() && buf.len() < 64 * 1024 {
            buf.resize(buf.len() * if buf.len() < 16 * 1024 { 16 } else { 4 }, 0);
        }
    }
}

/// Closes with RST so the peer sees an error rather than a clean EOF.
pub fn reset(stream: tokio::net::TcpStream) {
    arm_reset(&stream);
    drop(stream);
}

/// Makes a workload-facing socket close with RST (linger 0) however it is
/// closed — by this process, or by the kernel when this process dies
/// (`kill -9`, OOM, panic=abort) — until [`disarm_reset`]: a relay cut
/// short by the agent's own death is never seen as a complete one. Armed
/// when the socket is accepted or connected.
pub fn arm_reset(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// The relay's other side ended cleanly: this socket may now end with a
/// FIN after its last byte (a close with linger 0 would discard unsent
/// data). Called just before the write side is shut down.
pub fn disarm_reset(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(None);
}

/// Copies a TCP read half into an HTTP/2 stream, honouring flow control, and
/// ends the stream at EOF. `total` counts the bytes handed to HTTP/2.
pub async fn tcp_to_h2(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: SendStream<Bytes>,
    total: &mut u64,
) -> std::io::Result<()> {
    let mut step = 0;
    let mut buf = BytesMut::with_capacity(READ_CHUNKS[0]);
    loop {
        // Refill only when little room is left: reserving a full chunk on
        // every read would allocate a chunk per small message once the
        // previous one is handed to HTTP/2.
        let chunk = READ_CHUNKS[step];
        if buf.capacity() < chunk / 16 {
            buf.reserve(chunk);
        }
        let room = buf.capacity() - buf.len();
        let n = match from.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                to.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
        };
        if n == 0 {
            return to
                .send_data(Bytes::new(), true)
                .map_err(std::io::Error::other);
        }
        if n == room && step + 1 < READ_CHUNKS.len() {
            step += 1;
            buf.reserve(READ_CHUNKS[step]);
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            to.reserve_capacity(chunk.len());
            let cap = match poll_fn(|cx| to.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by peer",
                    ));
                }
            };
            let part = chunk.split_to(cap.min(chunk.len()));
            let len = part.len() as u64;
            to.send_data(part, false).map_err(std::io::Error::other)?;
            *total += len;
        }
    }
}

/// Copies an HTTP/2 stream into a TCP write half, releasing flow-control
/// capacity as data is written, and half-closes the socket at end of stream.
/// `total` counts the bytes written.
pub async fn h2_to_tcp(
    mut from: RecvStream,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    total: &mut u64,
) -> std::io::Result<()> {
    while let Some(data) = from.data().await {
        let data = data.map_err(std::io::Error::other)?;
        to.write_all(&data).await?;
        *total += data.len() as u64;
        let _ = from.flow_control().release_capacity(data.len());
    }
    crate::copy::disarm_reset(to.as_ref());
    to.shutdown().await
}

/// Both directions between a TCP connection and an HBONE stream. Returns
/// the outcome and (TCP → stream bytes, stream → TCP bytes), as
/// [`tcp_to_tcp`]. When either side fails, the TCP connection is reset and
/// the stream is cancelled: neither end sees a clean close of a relay that
/// broke.
pub async fn tcp_to_stream(
    mut tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
) -> (Outcome, (u64, u64)) {
    let (mut up, mut down) = (0, 0);
    let result = {
        let (r, w) = tcp.split();
        let to_h2 = pin!(tcp_to_h2(r, send, &mut up));
        let to_tcp = pin!(h2_to_tcp(recv, w, &mut down));
        crate::copy::both_directions(to_h2, to_tcp).await
    };
    match result {
        Ok(()) => (Outcome::Ok, (up, down)),
        Err(e) => {
            tracing::debug!(error = %e, "relay over HBONE failed; resetting the TCP side");
            reset(tcp);
            (Outcome::broken(), (up, down))
        }
    }
}

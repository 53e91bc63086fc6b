//! The socket a client's frames are written to and read from: the client's TCP connection, or,
//! when the listener serves TLS itself, one end of a local socket pair whose other end a pump
//! task encrypts onto the TLS connection ([`tls_pump`]). Either way the fan-out writes
//! plaintext frames to a kernel socket without waking a task, and a full socket backs up into
//! the client's outbox exactly as before.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl From<TcpStream> for Socket {
    fn from(s: TcpStream) -> Socket {
        Socket::Tcp(s)
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Socket::Tcp($s) => $e,
            Socket::Unix($s) => $e,
        }
    };
}

impl Socket {
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        each!(self, s => s.try_read(buf))
    }

    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        each!(self, s => s.try_write(buf))
    }

    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        each!(self, s => s.try_write_vectored(bufs))
    }

    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read_ready(cx))
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_write_ready(cx))
    }

    pub async fn writable(&self) -> io::Result<()> {
        each!(self, s => s.writable().await)
    }
}

/// Carries a TLS connection's plaintext to and from `inner`, the pump's end of a socket pair
/// whose other end the session uses as its [`Socket`]. Ends when the session lets go of its
/// end (after sending `close_notify` to the client), or when the client has gone and the
/// session has seen it.
pub async fn tls_pump<T>(tls: T, inner: UnixStream)
where
    T: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (mut tls_read, mut tls_write) = tokio::io::split(tls);
    let (mut inner_read, mut inner_write) = inner.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut tls_read, &mut inner_write).await;
        let _ = inner_write.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut inner_read, &mut tls_write).await;
        let _ = tls_write.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut down => {}
        _ = &mut up => down.await,
    }
}

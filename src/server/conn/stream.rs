//! The connection's socket on either side of the handshake: [`Transport`] (the accepted
//! socket, or TLS over it, on the async runtime) and [`BlockingStream`] (the same socket
//! handed to the blocking transmission threads).

use std::io::{IoSlice, Read, Write};
use std::net::Shutdown;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

use crate::server::tls::{BlockingTls, PlainSocket};

/// The socket after the handshake: the accepted one, or TLS over it.
pub(super) enum Transport<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

/// A socket that can leave the async runtime for blocking transmission threads.
pub(crate) trait IntoBlocking: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn into_blocking(self) -> std::io::Result<BlockingStream>;
}

impl IntoBlocking for tokio::net::TcpStream {
    fn into_blocking(self) -> std::io::Result<BlockingStream> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(BlockingStream::Tcp(s))
    }
}

impl IntoBlocking for tokio::net::UnixStream {
    fn into_blocking(self) -> std::io::Result<BlockingStream> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(BlockingStream::Unix(s))
    }
}

/// A blocking TCP or Unix stream, or TLS over one.
pub(crate) enum BlockingStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
    Tls(BlockingTls),
}

impl BlockingStream {
    pub(super) fn try_clone(&self) -> std::io::Result<BlockingStream> {
        Ok(match self {
            BlockingStream::Tcp(s) => BlockingStream::Tcp(s.try_clone()?),
            BlockingStream::Unix(s) => BlockingStream::Unix(s.try_clone()?),
            BlockingStream::Tls(s) => BlockingStream::Tls(s.try_clone()?),
        })
    }
    /// Sets `SO_RCVTIMEO` and `SO_SNDTIMEO` (shared by every clone of the socket).
    pub(super) fn set_timeouts(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        match self {
            BlockingStream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            BlockingStream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            BlockingStream::Tls(s) => s.set_timeouts(t),
        }
    }
    pub(super) fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            BlockingStream::Tcp(s) => s.shutdown(how),
            BlockingStream::Unix(s) => s.shutdown(how),
            BlockingStream::Tls(s) => {
                s.shutdown(how);
                Ok(())
            }
        };
    }
}

impl Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Tcp(s) => s.read(buf),
            BlockingStream::Unix(s) => s.read(buf),
            BlockingStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for BlockingStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Tcp(s) => s.write(buf),
            BlockingStream::Unix(s) => s.write(buf),
            BlockingStream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Tcp(s) => s.write_vectored(bufs),
            BlockingStream::Unix(s) => s.write_vectored(bufs),
            BlockingStream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<S: IntoBlocking> Transport<S> {
    /// The blocking stream the transmission threads use. A TLS session moves with its
    /// socket (and any plaintext it has already received) to the threads, which encrypt
    /// and decrypt themselves (see `tls::BlockingTls`); a plaintext socket is unchanged.
    pub(super) fn into_blocking(self) -> std::io::Result<BlockingStream> {
        match self {
            Transport::Plain(s) => s.into_blocking(),
            Transport::Tls(tls) => {
                let (io, session) = tls.into_inner();
                let sock = match io.into_blocking()? {
                    BlockingStream::Tcp(s) => PlainSocket::Tcp(s),
                    BlockingStream::Unix(s) => PlainSocket::Unix(s),
                    BlockingStream::Tls(_) => {
                        return Err(std::io::Error::other("TLS over TLS is not supported"))
                    }
                };
                Ok(BlockingStream::Tls(BlockingTls::new(sock, session)?))
            }
        }
    }
}

//! The relay's server side of WebSocket (RFC 6455), built for fan-out.
//!
//! Outgoing frames are encoded once ([`Wire`]: header and payload in one buffer) and written
//! by the client's [`Outbox`] straight to the socket, from the fan-out loop itself when the
//! client is keeping up: one `send` per delivery and nothing else, no task woken, no copy into a
//! per-connection buffer. Incoming frames are read by tungstenite ([`Inbound`] is its socket), so
//! masking, fragmentation, UTF-8, size limits and protocol errors are handled by a proven
//! implementation; the few frames tungstenite itself wants to send (pong, close reply) go
//! through the same outbox, in order with everything else.
//!
//! [`Outbox`]: outbox::Outbox

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;

pub mod deflate;
pub mod outbox;
pub mod socket;

use crate::protocol::close;
pub use outbox::{Close, Outbox, Pushed, Tally};
pub use socket::Socket;

/// A complete server-to-client frame (FIN set, unmasked), shared by every client it goes to;
/// for clients that negotiated permessage-deflate, its compressed form, made the first time one
/// of them needs it and shared by all of them ([`Wire::for_client`]).
#[derive(Clone)]
pub struct Wire(Arc<WireInner>);

struct WireInner {
    frame: Bytes,
    /// The opcode of a data frame that may be compressed; 0 for control frames and frames
    /// encoded elsewhere.
    data_opcode: u8,
    /// Compressed for a compressing client even where that is not smaller (the Autobahn echo).
    always: bool,
    /// The frame compressed with the full window, or `None` where that is not smaller.
    deflated: std::sync::OnceLock<Option<Bytes>>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Wire").field(&self.0.frame).finish()
    }
}

impl PartialEq for Wire {
    fn eq(&self, other: &Wire) -> bool {
        self.0.frame == other.0.frame
    }
}

impl Eq for Wire {}

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
/// RFC 6455 §5.5: control frame payloads are at most 125 bytes.
const MAX_CONTROL_PAYLOAD: usize = 125;

impl Wire {
    pub fn text(payload: &str) -> Wire {
        Wire::frame(OP_TEXT, payload.as_bytes())
    }

    pub fn binary(payload: &[u8]) -> Wire {
        Wire::frame(OP_BINARY, payload)
    }

    pub fn ping() -> Wire {
        Wire::plain(Bytes::from_static(&[0x80 | OP_PING, 0]))
    }

    fn plain(frame: Bytes) -> Wire {
        Wire(Arc::new(WireInner {
            frame,
            data_opcode: 0,
            always: false,
            deflated: std::sync::OnceLock::new(),
        }))
    }

    /// A close frame with `code` and as much of `reason` as fits (whole characters).
    /// [`close::NO_STATUS`] gives an empty close frame, the reply to one that had no code.
    pub fn close(code: u16, reason: &str) -> Wire {
        if code == close::NO_STATUS {
            return Wire::frame(OP_CLOSE, &[]);
        }
        let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut payload = Vec::with_capacity(2 + end);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        Wire::frame(OP_CLOSE, &payload)
    }

    /// Frame bytes as they arrived from another writer (tungstenite's pong and close replies),
    /// already encoded.
    pub fn encoded(bytes: Bytes) -> Wire {
        Wire::plain(bytes)
    }

    fn frame(opcode: u8, payload: &[u8]) -> Wire {
        let frame = encode(0x80 | opcode, payload);
        if opcode == OP_TEXT || opcode == OP_BINARY {
            Wire(Arc::new(WireInner {
                frame,
                data_opcode: opcode,
                always: false,
                deflated: std::sync::OnceLock::new(),
            }))
        } else {
            Wire::plain(frame)
        }
    }

    /// The frame as a client with `deflate` (its negotiated window, if it negotiated
    /// permessage-deflate) receives it: compressed where that is smaller, else as it is.
    pub fn for_client(&self, deflate: Option<u8>) -> std::borrow::Cow<'_, Bytes> {
        use std::borrow::Cow;
        let inner = &*self.0;
        let Some(bits) = deflate.filter(|_| inner.data_opcode != 0) else {
            return Cow::Borrowed(&inner.frame);
        };
        if bits == deflate::MAX_WINDOW_BITS {
            let shared = inner.deflated.get_or_init(|| self.deflate(bits));
            return Cow::Borrowed(shared.as_ref().unwrap_or(&inner.frame));
        }
        // A client that asked for a smaller window: compressed for it alone.
        match self.deflate(bits) {
            Some(frame) => Cow::Owned(frame),
            None => Cow::Borrowed(&inner.frame),
        }
    }

    /// The same frame, compressed for every compressing client however small or
    /// incompressible: for the Autobahn echo, whose 12.*/13.* harness takes an echo it receives
    /// uncompressed for a failure. RFC 7692 allows both; `/ws` sends such messages plain.
    pub fn always_compressed(self) -> Wire {
        let inner = &self.0;
        Wire(Arc::new(WireInner {
            frame: inner.frame.clone(),
            data_opcode: inner.data_opcode,
            always: true,
            deflated: std::sync::OnceLock::new(),
        }))
    }

    fn deflate(&self, bits: u8) -> Option<Bytes> {
        let packed = deflate::compress(self.payload(), bits, self.0.always)?;
        // RSV1 marks a compressed message (RFC 7692 §6).
        Some(encode(0x80 | 0x40 | self.0.data_opcode, &packed))
    }
}

/// A frame with header byte `first` around `payload` (unmasked: server to client).
fn encode(first: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    buf.put_u8(first);
    put_len(&mut buf, 0, payload.len());
    buf.extend_from_slice(payload);
    buf.freeze()
}

/// A frame header's second byte (`mask_bit` or'ed in) and extended length, in the shortest
/// form (RFC 6455 §5.2).
pub(crate) fn put_len(buf: &mut impl BufMut, mask_bit: u8, n: usize) {
    if n < 126 {
        buf.put_u8(mask_bit | n as u8);
    } else if let Ok(n) = u16::try_from(n) {
        buf.put_u8(mask_bit | 126);
        buf.put_u16(n);
    } else {
        buf.put_u8(mask_bit | 127);
        buf.put_u64(n as u64);
    }
}

impl Wire {
    /// The frame as sent to a client without compression.
    pub fn bytes(&self) -> &Bytes {
        &self.0.frame
    }

    pub fn len(&self) -> usize {
        self.0.frame.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.frame.is_empty()
    }

    /// The payload (frames written by this module only).
    pub fn payload(&self) -> &[u8] {
        let b = &self.0.frame;
        let skip = match b.get(1).map(|l| l & 0x7f) {
            Some(126) => 4,
            Some(127) => 10,
            Some(_) => 2,
            None => return &[],
        };
        b.get(skip..).unwrap_or_default()
    }
}

/// A validated WebSocket upgrade request for a handler to accept.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
    /// The client's permessage-deflate offer the relay can honour, if any.
    deflate: Option<deflate::Negotiated>,
}

/// Why a request to a WebSocket endpoint was not an upgrade. Plain HTTP clients (curl) get a
/// JSON body saying what is missing, like every other error of the API.
#[derive(Debug)]
pub enum NotUpgrade {
    Method,
    Headers,
    Version,
    Key,
    /// The connection cannot be taken over (not HTTP/1.1 with upgrades).
    Unsupported,
}

impl IntoResponse for NotUpgrade {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            NotUpgrade::Method => (StatusCode::METHOD_NOT_ALLOWED, "use GET for a WebSocket upgrade"),
            NotUpgrade::Headers => (
                StatusCode::UPGRADE_REQUIRED,
                "this endpoint speaks WebSocket: send Connection: Upgrade and Upgrade: websocket (use wscat, websocat or a browser)",
            ),
            NotUpgrade::Version => (StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13"),
            NotUpgrade::Key => (StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing"),
            NotUpgrade::Unsupported => (
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded; use HTTP/1.1",
            ),
        };
        let mut resp = crate::api_error::error_body(
            status,
            crate::api_error::HttpCode::WebsocketUpgradeRequired.as_str(),
            message,
        );
        if status == StatusCode::UPGRADE_REQUIRED {
            resp.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        resp
    }
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, NotUpgrade> {
        if parts.method != Method::GET {
            return Err(NotUpgrade::Method);
        }
        if !header_has(&parts.headers, header::CONNECTION, "upgrade")
            || !header_has(&parts.headers, header::UPGRADE, "websocket")
        {
            return Err(NotUpgrade::Headers);
        }
        if !header_has(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(NotUpgrade::Version);
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or(NotUpgrade::Key)?;
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(NotUpgrade::Unsupported)?;
        let offers = parts
            .headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let deflate = deflate::negotiate(offers);
        Ok(Upgrade {
            key,
            on_upgrade,
            deflate,
        })
    }
}

impl Upgrade {
    /// Declines any permessage-deflate offer (`server.compression = false`).
    pub fn without_compression(mut self) -> Upgrade {
        self.deflate = None;
        self
    }

    /// Answers 101 (accepting the client's permessage-deflate offer where it made one the
    /// relay can honour) and, once the connection is handed over, runs `serve` with the
    /// socket, whatever the client sent after its request (usually nothing) and what was
    /// agreed on compression.
    pub fn on_upgrade<F, Fut>(self, serve: F) -> Response
    where
        F: FnOnce(Arc<Socket>, Bytes, Option<deflate::Negotiated>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accept =
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        let deflate = self.deflate;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(error) => {
                    tracing::debug!(%error, "WebSocket upgrade failed");
                    return;
                }
            };
            // One `serve(..).await` for both kinds of socket: the session's future is large, and
            // two await points for it could make this task hold room for two.
            let (socket, read_buf) = match plain_or_tls(upgraded) {
                Some(pair) => pair,
                None => return,
            };
            serve(Arc::new(socket), read_buf, deflate).await
        });
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(Ok(v)) = deflate.map(|d| HeaderValue::from_str(&d.response())) {
            h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
        }
        resp
    }
}

/// The client's socket from an upgraded connection: the TCP stream itself, or, for a TLS
/// connection, one end of a socket pair whose other end a pump task encrypts onto it. Also the
/// bytes hyper read past the upgrade request.
fn plain_or_tls(upgraded: hyper::upgrade::Upgraded) -> Option<(Socket, Bytes)> {
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return Some((Socket::Tcp(parts.io.into_inner()), parts.read_buf)),
        Err(other) => other,
    };
    let Ok(parts) = upgraded.downcast::<TokioIo<tokio_rustls::server::TlsStream<TcpStream>>>()
    else {
        tracing::error!("upgraded connection is neither TCP nor TLS; dropped");
        return None;
    };
    let tls = parts.io.into_inner();
    let (ours, pumps) = match tokio::net::UnixStream::pair() {
        Ok(pair) => pair,
        Err(error) => {
            tracing::warn!(%error, "no socket pair for a TLS client; dropped");
            return None;
        }
    };
    // The session's end backs up like the TCP socket it stands for.
    let sock = socket2::SockRef::from(tls.get_ref().0);
    if let Ok(n) = sock.send_buffer_size() {
        let _ = socket2::SockRef::from(&ours).set_send_buffer_size(n);
    }
    tokio::spawn(socket::tls_pump(tls, pumps));
    Some((Socket::Unix(ours), parts.read_buf))
}

/// The socket tungstenite reads client frames from. What it writes (pongs, close replies) is
/// queued on the client's outbox, behind whatever is already there.
pub struct Inbound {
    socket: Arc<Socket>,
    /// Bytes hyper read past the upgrade request.
    prefix: Bytes,
    /// Where tungstenite's own frames go: the client's outbox.
    client: Arc<dyn AsRef<Outbox> + Send + Sync>,
    /// With permessage-deflate: what inflates the client's compressed messages before
    /// tungstenite reads them, the bytes read and not yet turned over, and those turned over
    /// and not yet handed to tungstenite.
    inflate: Option<Box<Inflating>>,
}

struct Inflating {
    frames: deflate::ClientFrames,
    raw: BytesMut,
    ready: Vec<u8>,
    /// How much of `ready` tungstenite has taken.
    taken: usize,
}

/// A client's incoming side: tungstenite over [`Inbound`].
pub type Incoming = WebSocketStream<Inbound>;

/// The incoming side of an upgraded connection, with the relay's limits: `max_message_bytes`
/// per message and frame, and a 1 KiB read buffer (client requests are small; tungstenite grows
/// it for a larger frame, and every KiB here is a KiB per connection).
pub async fn incoming(
    socket: Arc<Socket>,
    prefix: Bytes,
    client: Arc<dyn AsRef<Outbox> + Send + Sync>,
    max_message_bytes: usize,
    deflate: Option<deflate::Negotiated>,
) -> Incoming {
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes));
    // The prefix is a view into hyper's read buffer: copy it out (rarely anything) so the
    // buffer itself is freed rather than kept for the life of the connection.
    let prefix = if prefix.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&prefix)
    };
    let inflate = deflate.map(|n| {
        Box::new(Inflating {
            frames: deflate::ClientFrames::new(&n, max_message_bytes),
            raw: BytesMut::new(),
            ready: Vec::new(),
            taken: 0,
        })
    });
    let inbound = Inbound {
        socket,
        prefix,
        client,
        inflate,
    };
    WebSocketStream::from_raw_socket(inbound, Role::Server, Some(config)).await
}

impl Inbound {
    /// Reads from the socket (after the prefix) into `buf`.
    fn poll_socket(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.socket.poll_read_ready(cx))?;
            match self.socket.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for Inbound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(mut inf) = this.inflate.take() else {
            return this.poll_socket(cx, buf);
        };
        let result = loop {
            if inf.taken < inf.ready.len() {
                let n = (inf.ready.len() - inf.taken).min(buf.remaining());
                buf.put_slice(&inf.ready[inf.taken..inf.taken + n]);
                inf.taken += n;
                if inf.taken == inf.ready.len() {
                    inf.ready.clear();
                    inf.taken = 0;
                }
                break Poll::Ready(Ok(()));
            }
            let Inflating {
                frames, raw, ready, ..
            } = &mut *inf;
            if let deflate::Step::Progress = frames.step(raw, ready) {
                continue;
            }
            let mut chunk = [0u8; 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match this.poll_socket(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    // End of the stream: what is left goes as it is (tungstenite sees the cut).
                    let rest = inf.raw.split();
                    inf.ready.extend_from_slice(&rest);
                    if inf.ready.is_empty() {
                        break Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => inf.raw.extend_from_slice(rb.filled()),
                other => break other,
            }
        };
        this.inflate = Some(inf);
        result
    }
}

impl AsyncWrite for Inbound {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // tungstenite hands over whole frames and only ever after writing the previous ones,
        // so each call is one or more complete frames.
        self.client
            .as_ref()
            .as_ref()
            .push_wire(Wire::encoded(Bytes::copy_from_slice(buf)));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The close a peer's WebSocket violation calls for (RFC 6455 §7.4.1): 1009 for a frame over
/// the size limit, 1007 for a text frame that is not UTF-8, 1002 for any other protocol
/// violation; `None` when the connection itself failed (nothing to say it to).
pub fn protocol_close(e: &WsError) -> Option<(u16, &'static str)> {
    match e {
        WsError::Capacity(_) => Some((close::TOO_BIG, "message too large")),
        WsError::Utf8(_) => Some((close::INVALID_DATA, "text frame is not valid UTF-8")),
        WsError::Protocol(_) => Some((close::PROTOCOL_ERROR, "WebSocket protocol violation")),
        _ => None,
    }
}

/// The answer to a client's close frame: at once, with its code and reason (RFC 6455 §5.5.1;
/// tungstenite has already turned a code that may not be sent into 1002), dropping whatever
/// was still queued for the client.
pub fn echo(frame: Option<CloseFrame>) -> Close {
    let (code, reason) = frame.map_or((close::NO_STATUS, String::new()), |f| {
        (f.code.into(), f.reason.to_string())
    });
    Close {
        code,
        reason: reason.into(),
        last_words: None,
        abort: true,
    }
}

/// Writes `frames` in order, waiting for room as needed.
pub async fn write_all(socket: &Socket, frames: &[Bytes]) -> io::Result<()> {
    for frame in frames {
        let mut rest = &frame[..];
        while !rest.is_empty() {
            socket.writable().await?;
            match socket.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_length_in_the_shortest_form() {
        let short = Wire::text("hi");
        assert_eq!(&short.bytes()[..], b"\x81\x02hi");
        let medium = Wire::text(&"x".repeat(300));
        assert_eq!(&medium.bytes()[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(medium.payload().len(), 300);
        let long = Wire::binary(&vec![7u8; 70_000]);
        assert_eq!(&long.bytes()[..2], &[0x82, 127]);
        assert_eq!(&long.bytes()[2..10], &70_000u64.to_be_bytes());
        assert_eq!(long.payload().len(), 70_000);
    }

    #[test]
    fn a_frame_is_compressed_once_and_every_compressing_client_shares_the_bytes() {
        let w = Wire::text(&"{\"type\":\"depth\",\"bids\":[[\"1.0\",\"2.0\"]]}".repeat(20));
        let (a, b) = (w.for_client(Some(15)), w.for_client(Some(15)));
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "the same bytes, not a second compression"
        );
        assert_eq!(a[0], 0x80 | 0x40 | OP_TEXT, "FIN, RSV1, text");
        assert!(a.len() < w.len() / 4);
        assert_eq!(w.for_client(None).as_ptr(), w.bytes().as_ptr());
        // Control frames and small messages stay as they are.
        assert_eq!(
            Wire::ping().for_client(Some(15)).as_ptr(),
            Wire::ping().bytes().as_ptr()
        );
        let small = Wire::text("{}");
        assert_eq!(small.for_client(Some(15)).as_ptr(), small.bytes().as_ptr());
    }

    #[test]
    fn close_frames_fit_the_control_limit_on_a_character_boundary() {
        let c = Wire::close(1013, &"é".repeat(100));
        assert_eq!(c.bytes()[0], 0x88);
        assert!(c.payload().len() <= MAX_CONTROL_PAYLOAD);
        assert_eq!(&c.payload()[..2], &1013u16.to_be_bytes());
        assert!(std::str::from_utf8(&c.payload()[2..]).is_ok());
        assert_eq!(&Wire::close(close::NO_STATUS, "x").bytes()[..], &[0x88, 0]);
        assert_eq!(&Wire::ping().bytes()[..], &[0x89, 0]);
    }
}

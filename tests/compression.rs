//! permessage-deflate (RFC 7692) on `/ws`, spoken frame by frame over a real socket: the
//! negotiation, compressed data frames shared byte for byte between clients, compressed client
//! messages (fragmented too), a decompression bomb, and the protocol errors. Python
//! `websockets`, Node `ws` and Chromium negotiate it in `examples/check.sh` and the console
//! check; the Autobahn 12.*/13.* cases in `.ci/run`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A WebSocket client by hand: what it offers, what it got back, and its frames.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The `Sec-WebSocket-Extensions` answer, lower case.
    extensions: Option<String>,
}

/// One server frame: the header's first byte, and the payload.
struct Frame {
    first: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn compressed(&self) -> bool {
        self.first & 0x40 != 0
    }

    fn opcode(&self) -> u8 {
        self.first & 0x0f
    }

    /// The message: inflated if compressed.
    fn text(&self) -> String {
        let bytes = if self.compressed() {
            inflate(&self.payload)
        } else {
            self.payload.clone()
        };
        String::from_utf8(bytes).unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text()).unwrap()
    }
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    loop {
        let done = c.total_in() as usize;
        c.compress_vec(&data[done..], &mut out, FlushCompress::Sync)
            .unwrap();
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(input.len() * 8 + 1024);
    loop {
        let used = d.total_in() as usize;
        d.decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
            .unwrap();
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// A masked client frame; `first` is the whole first header byte (FIN, RSV, opcode).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65_536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

impl Raw {
    async fn open(relay: &Relay, offer: Option<&str>) -> Raw {
        let mut stream = TcpStream::connect(relay.addr).await.unwrap();
        let offer = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        let extensions = head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-extensions:"))
            .map(|v| v.trim().to_string());
        buf.drain(..end);
        let mut raw = Raw {
            stream,
            buf,
            extensions,
        };
        assert_eq!(raw.next().await.json()["type"], "connected");
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn next(&mut self) -> Frame {
        self.try_next().await.expect("connection closed")
    }

    async fn try_next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 2 {
                let (len, hdr) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= hdr + len {
                    let f = Frame {
                        first: self.buf[0],
                        payload: self.buf[hdr..hdr + len].to_vec(),
                    };
                    self.buf.drain(..hdr + len);
                    if f.opcode() == 0x9 {
                        continue; // ping
                    }
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("timed out waiting for a frame")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Frames until one whose message matches.
    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Frame {
        loop {
            let f = self.next().await;
            if f.opcode() == 0x1 && pred(&f.json()) {
                return f;
            }
        }
    }

    /// The close frame's code, after the messages before it.
    async fn close_code(&mut self) -> (u16, Vec<Value>) {
        let mut before = Vec::new();
        loop {
            let Some(f) = self.try_next().await else {
                return (1006, before);
            };
            match f.opcode() {
                0x8 => return (u16::from_be_bytes([f.payload[0], f.payload[1]]), before),
                0x1 => before.push(f.json()),
                _ => {}
            }
        }
    }
}

fn subscribe(channels: &[&str]) -> Vec<u8> {
    json!({"type": "subscribe", "channels": channels, "id": 1})
        .to_string()
        .into_bytes()
}

#[tokio::test]
async fn a_deflate_offer_gets_compressed_frames_shared_by_every_compressing_client() {
    let (_sim, relay) = start().await;
    let offer = "permessage-deflate; client_max_window_bits";
    let mut a = Raw::open(&relay, Some(offer)).await;
    let mut b = Raw::open(&relay, Some(offer)).await;
    let mut plain = Raw::open(&relay, None).await;
    // As a browser offers it: the client is asked for a small window (what it sends is small).
    assert_eq!(
        a.extensions.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_max_window_bits=9")
    );
    assert_eq!(plain.extensions, None);

    for c in [&mut a, &mut b, &mut plain] {
        c.send(&frame(0x81, &subscribe(&["depth:BTCUSDT:20"])))
            .await;
    }
    // The same depth message (by seq) on each: compressed, byte for byte the same frame on
    // both compressing clients, and plain on the other.
    let on_a = a
        .until(|v| v["type"] == "depth" && v["seq"].as_u64() > Some(1))
        .await;
    let seq = on_a.json()["seq"].clone();
    let on_b = b.until(|v| v["type"] == "depth" && v["seq"] == seq).await;
    let on_plain = plain
        .until(|v| v["type"] == "depth" && v["seq"] == seq)
        .await;
    assert!(on_a.compressed() && on_b.compressed());
    assert_eq!(on_a.payload, on_b.payload, "one compression, shared");
    assert!(!on_plain.compressed());
    assert_eq!(on_a.text(), on_plain.text());
    assert!(
        on_a.payload.len() * 2 < on_plain.payload.len(),
        "{} compressed vs {} plain bytes",
        on_a.payload.len(),
        on_plain.payload.len()
    );
    // A request compressed with the window it was asked for is read.
    let mut z = Compress::new_with_window_bits(Compression::default(), false, 9);
    let mut packed = Vec::with_capacity(256);
    z.compress_vec(
        br#"{"type":"ping","id":2}"#,
        &mut packed,
        FlushCompress::Sync,
    )
    .unwrap();
    packed.truncate(packed.len() - 4);
    a.send(&frame(0xc1, &packed)).await;
    // Small control replies go uncompressed (RSV1 clear), which the RFC allows.
    let pong = a.until(|v| v["type"] == "pong").await;
    assert!(!pong.compressed());
}

#[tokio::test]
async fn compressed_client_messages_are_read_whole_and_fragmented() {
    let (_sim, relay) = start().await;
    let mut c = Raw::open(
        &relay,
        Some("permessage-deflate; client_no_context_takeover"),
    )
    .await;
    assert!(c
        .extensions
        .as_deref()
        .unwrap()
        .contains("client_no_context_takeover"));
    // One compressed frame (RSV1 + text).
    c.send(&frame(0xc1, &deflate(&subscribe(&["trades:BTCUSDT"]))))
        .await;
    c.until(|v| v["type"] == "subscribed" && v["channel"] == "trades:BTCUSDT")
        .await;
    // One compressed message in three fragments, a ping between two of them.
    let packed = deflate(&subscribe(&["price:BTCUSDT"]));
    let (x, rest) = packed.split_at(packed.len() / 3);
    let (y, z) = rest.split_at(rest.len() / 2);
    c.send(&frame(0x41, x)).await; // RSV1, text, not FIN
    c.send(&frame(0x89, b"hi")).await; // a ping may come between fragments
    c.send(&frame(0x00, y)).await; // continuation
    c.send(&frame(0x80, z)).await; // continuation, FIN
    c.until(|v| v["type"] == "subscribed" && v["channel"] == "price:BTCUSDT")
        .await;
    // Plain messages still work on the same connection.
    c.send(&frame(0x81, br#"{"type":"list","id":5}"#)).await;
    let list = c.until(|v| v["type"] == "subscriptions").await;
    assert_eq!(list.json()["channels"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_decompression_bomb_is_refused_with_1009_and_nobody_else_notices() {
    let (_sim, relay) = start().await;
    let mut other = Raw::open(&relay, Some("permessage-deflate")).await;
    other
        .send(&frame(0x81, &subscribe(&["trades:BTCUSDT"])))
        .await;
    other.until(|v| v["type"] == "subscribed").await;

    let mut bomb = Raw::open(&relay, Some("permessage-deflate")).await;
    // 64 MiB of spaces inside a JSON string: a few tens of KiB compressed.
    let mut text = br#"{"type":"ping","pad":""#.to_vec();
    text.extend(std::iter::repeat_n(b' ', 64 << 20));
    text.extend_from_slice(b"\"}");
    let packed = deflate(&text);
    assert!(packed.len() < 200_000, "{}", packed.len());
    bomb.send(&frame(0xc1, &packed)).await;
    let (code, before) = bomb.close_code().await;
    assert_eq!(code, 1009);
    let e = before.last().unwrap();
    assert_eq!(error_code(e), "INVALID_JSON");
    assert!(
        e["data"]["message"].as_str().unwrap().contains("65536"),
        "{e}"
    );
    // The other client still gets its trades.
    other.until(|v| v["type"] == "trade").await;
    let stats = relay.stats().await;
    assert_eq!(stats["connectedClients"], 1, "{stats}");
}

#[tokio::test]
async fn rsv1_where_it_may_not_be_and_corrupt_data_close_with_1002() {
    let (_sim, relay) = start().await;
    let cases: [(&str, Option<&str>, Vec<u8>); 4] = [
        // RSV1 on a control frame.
        ("rsv1 ping", Some("permessage-deflate"), frame(0xc9, b"")),
        // RSV1 without the extension negotiated.
        (
            "rsv1 unnegotiated",
            None,
            frame(0xc1, &deflate(b"{\"type\":\"ping\"}")),
        ),
        // RSV1 on a continuation.
        ("rsv1 continuation", Some("permessage-deflate"), {
            let mut f = frame(0x01, b"{\"type\"");
            f.extend(frame(0xc0, b":\"ping\"}"));
            f
        }),
        // Not deflate data at all.
        (
            "corrupt",
            Some("permessage-deflate"),
            frame(0xc1, &[0xff; 32]),
        ),
    ];
    for (what, offer, bytes) in cases {
        let mut c = Raw::open(&relay, offer).await;
        c.send(&bytes).await;
        let (code, _) = c.close_code().await;
        assert_eq!(code, 1002, "{what}");
    }
}

#[tokio::test]
async fn offers_it_cannot_honour_are_declined_and_compression_can_be_switched_off() {
    let sim = start_sim().await;
    let relay = start_relay(config_for(&sim)).await;
    let declined = Raw::open(&relay, Some("permessage-deflate; server_max_window_bits=8")).await;
    assert_eq!(declined.extensions, None);
    let second = Raw::open(
        &relay,
        Some("permessage-deflate; bogus, permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(
        second.extensions.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=10")
    );
    // A client that asked for a smaller window gets frames compressed with it, which inflate.
    let mut small = second;
    small
        .send(&frame(0x81, &subscribe(&["depth:BTCUSDT:20"])))
        .await;
    let depth = small.until(|v| v["type"] == "depth").await;
    assert!(depth.compressed());

    let mut cfg = config_for(&sim);
    cfg.server.compression = false;
    let off = start_relay(cfg).await;
    let c = Raw::open(&off, Some("permessage-deflate")).await;
    assert_eq!(c.extensions, None);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_compressing_client_that_stops_reading_is_closed_with_1013_and_a_fast_one_misses_nothing()
{
    let mut opts = exchange_relay::sim::SimOptions::fast();
    opts.rate_scale = 20.0;
    let sim = start_sim_with(opts).await;
    let mut cfg = config_for(&sim);
    cfg.server.client_queue_capacity = 64;
    cfg.server.client_send_buffer_bytes = 16 * 1024;
    let relay = start_relay(cfg).await;
    let channels = [
        "trades:BTCUSDT",
        "trades:ETHUSDT",
        "trades:SOLUSDT",
        "trades:XRPUSDT",
    ];
    let mut fast = Raw::open(&relay, Some("permessage-deflate")).await;
    fast.send(&frame(0x81, &subscribe(&channels))).await;
    let reader = tokio::spawn(async move {
        let mut last = std::collections::HashMap::new();
        let mut n = 0;
        while n < 3_000 {
            let f = fast.next().await;
            if f.opcode() != 0x1 {
                continue;
            }
            let m = f.json();
            if m["type"] != "trade" {
                continue;
            }
            assert!(f.compressed(), "trades go compressed");
            let id = m["data"]["tradeId"].as_u64().unwrap();
            let prev = last.insert(m["channel"].as_str().unwrap().to_string(), id);
            assert!(prev.is_none_or(|p| id == p + 1), "gap on {}", m["channel"]);
            n += 1;
        }
    });
    // A compressing client with a tiny receive window that subscribes and never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(relay.addr).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        )
        .await
        .unwrap();
    stream
        .write_all(&frame(0x81, &subscribe(&channels)))
        .await
        .unwrap();
    until("the compressing slow client is closed", || async {
        let s = relay.stats().await;
        (s["slowConsumerDisconnects"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    drop(stream);
}

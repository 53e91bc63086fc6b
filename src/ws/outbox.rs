//! A client's outgoing path: fan-out and replies write straight to the socket while the client
//! keeps up, and queue (bounded) when it does not.
//!
//! While nothing is queued, a push writes the frame to the socket at once, without waiting: a
//! delivery costs one `send`, made by the fan-out loop itself, with no task woken. When the
//! socket is full the frame is queued (or the rest of it, if the socket took part), the client's
//! own task is woken and drains the queue as the socket drains (several frames per `writev`),
//! and until it is empty every later frame queues behind it, so frames never overtake each other.
//!
//! Policy when a client falls behind (PROTOCOL.md `SLOW_CONSUMER`):
//! - Conflatable messages (`price`, `ticker`, `depth`, a forming kline) keep one queued entry per
//!   channel: a newer value replaces the older one in place, so a lagging client always catches
//!   up on current data and conflatable entries never exceed the number of subscriptions.
//! - Reliable messages (trades, final klines, published messages) are never dropped silently:
//!   when `capacity` of them are queued the client is closed with 1013 after a `SLOW_CONSUMER`
//!   error, and its queue is freed at once.
//! - Control replies (acks, errors, and the current values sent right after an ack) get their
//!   own room: enough for the largest legitimate request (a subscribe to every allowed channel,
//!   each answered by an ack and a value) on top of the reliable capacity, so a flood of
//!   requests cannot grow memory either, and a full-size subscribe never trips it.
//!
//! Pushing never blocks and never waits for the socket: the fan-out and the upstream reader are
//! never slowed by a client.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use super::Socket;
use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;

use super::Wire;
use crate::events::Delivery;
use crate::protocol::{close, msg, ErrorCode, Frame};

/// Frames per `writev` when draining a queue.
const WRITE_BATCH: usize = 64;

/// Why and how the connection must be closed.
#[derive(Debug, Clone, PartialEq)]
pub struct Close {
    pub code: u16,
    pub reason: Cow<'static, str>,
    /// Sent just before the close frame (an `error`, so CLI users see text).
    pub last_words: Option<Frame>,
    /// Drop whatever is still queued instead of delivering it first.
    pub abort: bool,
}

/// What a burst of data messages came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Written to the socket or queued behind earlier frames.
    pub queued: u64,
    /// Replaced older queued values of the same channel.
    pub conflated: u64,
    /// The client could not keep up: it is being closed with 1013.
    pub overflowed: bool,
}

/// A frame to write, alone or with how it is delivered.
trait AsWire {
    fn wire(&self) -> &Wire;
}

impl AsWire for Wire {
    fn wire(&self) -> &Wire {
        self
    }
}

impl AsWire for (Wire, Delivery) {
    fn wire(&self) -> &Wire {
        &self.0
    }
}

/// How far [`Outbox::write_now`] got.
enum Written {
    All,
    /// This many frames went (the last perhaps only partly); the rest must queue.
    Frames(usize),
    /// The socket failed.
    Lost,
}

/// What happened to a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Written to the socket or queued behind earlier frames.
    Queued,
    /// Replaced an older queued value of the same channel.
    Conflated,
    /// The client could not keep up: it is being closed with 1013.
    Overflowed,
    /// The client is already closing; the message was dropped with it.
    Closed,
}

struct Entry {
    wire: Wire,
    /// The channel whose conflation slot this entry is, if any.
    slot: Option<Arc<str>>,
}

struct State {
    /// The unwritten rest of a frame the socket took only part of: it goes before anything
    /// queued, and nothing can replace it.
    partial: Option<Bytes>,
    queue: VecDeque<Entry>,
    /// Sequence number of `queue.front()`; entries are numbered as pushed.
    head_seq: u64,
    /// Channel name → sequence number of its queued conflatable entry.
    slots: HashMap<Arc<str>, u64>,
    closing: Option<Close>,
}

impl State {
    /// Nothing is waiting: a new frame may go straight to the socket.
    fn idle(&self) -> bool {
        self.partial.is_none() && self.queue.is_empty()
    }

    fn pop_front(&mut self) -> Option<Wire> {
        let entry = self.queue.pop_front()?;
        let seq = self.head_seq;
        self.head_seq += 1;
        if let Some(slot) = entry.slot {
            if self.slots.get(&slot) == Some(&seq) {
                self.slots.remove(&slot);
            }
        }
        Some(entry.wire)
    }

    /// Accounts for `n` bytes the socket took, from the front (frames as a client with
    /// `deflate` gets them).
    fn consume(&mut self, mut n: usize, deflate: Option<u8>) {
        if let Some(partial) = &mut self.partial {
            if n < partial.len() {
                partial.advance(n);
                return;
            }
            n -= partial.len();
            self.partial = None;
        }
        while n > 0 {
            let Some(wire) = self.pop_front() else {
                return;
            };
            let out = wire.for_client(deflate);
            if n < out.len() {
                self.partial = Some(out.slice(n..));
                return;
            }
            n -= out.len();
        }
    }

    fn drop_queued(&mut self) {
        self.queue.clear();
        self.slots.clear();
    }
}

pub struct Outbox {
    state: Mutex<State>,
    /// The client's socket; `None` for in-process subscribers (benchmarks, tests), whose frames
    /// only queue.
    socket: Option<Arc<Socket>>,
    /// Wakes the client's task when the queue turns non-empty or closing starts. One consumer,
    /// so a lock-free waker slot rather than a `Notify` waiter list.
    waker: AtomicWaker,
    /// Reliable entries a client may have queued before it counts as a slow consumer.
    capacity: usize,
    /// Entries of any kind beyond which even a control reply counts as overflow.
    control_capacity: usize,
    /// The window of permessage-deflate, if the client negotiated it: data frames go out in
    /// their shared compressed form.
    deflate: Option<u8>,
}

impl Outbox {
    /// `capacity` reliable frames; control replies may add room for `max_subscriptions` acks
    /// and current values on top.
    pub fn new(
        capacity: usize,
        max_subscriptions: usize,
        socket: Option<Arc<Socket>>,
        deflate: Option<u8>,
    ) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                partial: None,
                queue: VecDeque::new(),
                head_seq: 0,
                slots: HashMap::new(),
                closing: None,
            }),
            socket,
            waker: AtomicWaker::new(),
            capacity,
            control_capacity: capacity + 4 * max_subscriptions + 64,
            deflate,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only a queue behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a reply to the client's own request (ack, error, pong).
    pub fn push_control(&self, frame: Frame) -> Pushed {
        self.push_wire(Wire::text(frame.as_str()))
    }

    /// Sends an encoded frame with the room of a control reply (pings, tungstenite's replies).
    pub fn push_wire(&self, wire: Wire) -> Pushed {
        let mut st = self.lock();
        if st.closing.is_some() {
            return Pushed::Closed;
        }
        match self.write_now(&mut st, std::slice::from_ref(&wire)) {
            Written::All => return Pushed::Queued,
            Written::Lost => return Pushed::Closed,
            Written::Frames(_) => {}
        }
        if st.queue.len() >= self.control_capacity {
            self.overflow(&mut st);
            return Pushed::Overflowed;
        }
        self.append(&mut st, wire, None);
        Pushed::Queued
    }

    /// Sends a burst of data messages of `channel`, in order: while the client keeps up, all
    /// of them in one write.
    pub fn push_data(&self, channel: &Arc<str>, frames: &[(Wire, Delivery)]) -> Tally {
        let mut tally = Tally::default();
        let mut st = self.lock();
        if st.closing.is_some() {
            return tally;
        }
        let rest = match self.write_now(&mut st, frames) {
            Written::All => {
                tally.queued = frames.len() as u64;
                return tally;
            }
            Written::Lost => return tally,
            Written::Frames(n) => {
                tally.queued = n as u64;
                &frames[n..]
            }
        };
        for (wire, delivery) in rest {
            match self.enqueue(&mut st, channel, wire, *delivery) {
                Pushed::Queued => tally.queued += 1,
                Pushed::Conflated => tally.conflated += 1,
                Pushed::Overflowed => {
                    tally.overflowed = true;
                    break;
                }
                Pushed::Closed => break,
            }
        }
        tally
    }

    fn enqueue(
        &self,
        st: &mut State,
        channel: &Arc<str>,
        wire: &Wire,
        delivery: Delivery,
    ) -> Pushed {
        match delivery {
            Delivery::Conflate => {
                if let Some(&seq) = st.slots.get(channel) {
                    if let Some(idx) = seq.checked_sub(st.head_seq) {
                        if let Some(entry) = st.queue.get_mut(idx as usize) {
                            entry.wire = wire.clone();
                            return Pushed::Conflated;
                        }
                    }
                }
                // Conflatable entries are bounded by the subscription count, so they always fit.
                let seq = st.head_seq + st.queue.len() as u64;
                st.slots.insert(channel.clone(), seq);
                self.append(st, wire.clone(), Some(channel.clone()));
                Pushed::Queued
            }
            Delivery::Reliable => {
                if st.queue.len() >= self.capacity {
                    self.overflow(st);
                    return Pushed::Overflowed;
                }
                // A forming kline queued before this final one must not be overwritten by the
                // next forming kline, or the stream would go backwards: seal its slot.
                if !st.slots.is_empty() {
                    st.slots.remove(channel);
                }
                self.append(st, wire.clone(), None);
                Pushed::Queued
            }
        }
    }

    /// Writes `frames` to the socket now if nothing is waiting before them, as far as the
    /// socket takes them: a frame it took part of is finished by the client's task.
    fn write_now<F: AsWire>(&self, st: &mut State, frames: &[F]) -> Written {
        let Some(socket) = self.socket.as_ref().filter(|_| st.idle()) else {
            return Written::Frames(0);
        };
        // Plain non-blocking sends: tokio's readiness bookkeeping (a cache miss per client at
        // this rate) is left to the writer path, which re-learns it on its first WouldBlock.
        let sock = socket2::SockRef::from(&**socket);
        let mut done = 0;
        for chunk in frames.chunks(WRITE_BATCH) {
            if let [frame] = chunk {
                // The common case, one frame: nothing is built but the one send.
                let out = frame.wire().for_client(self.deflate);
                let n = match sock.send_with_flags(&out, libc::MSG_NOSIGNAL) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Written::Frames(done)
                    }
                    Err(e) => {
                        self.lost(st, &e);
                        return Written::Lost;
                    }
                };
                if n < out.len() {
                    if n > 0 {
                        st.partial = Some(out.slice(n..));
                        self.waker.wake();
                        done += 1;
                    }
                    return Written::Frames(done);
                }
                done += 1;
                continue;
            }
            // Each frame as this client gets it (compressed, shared, where it negotiated that).
            let outs: [Option<std::borrow::Cow<'_, Bytes>>; WRITE_BATCH] =
                std::array::from_fn(|i| chunk.get(i).map(|f| f.wire().for_client(self.deflate)));
            let outs = &outs[..chunk.len()];
            let mut slices = [IoSlice::new(&[]); WRITE_BATCH];
            for (slot, out) in slices.iter_mut().zip(outs.iter().flatten()) {
                *slot = IoSlice::new(out);
            }
            let sent = sock.send_vectored_with_flags(&slices[..chunk.len()], libc::MSG_NOSIGNAL);
            let mut n = match sent {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Written::Frames(done),
                Err(e) => {
                    self.lost(st, &e);
                    return Written::Lost;
                }
            };
            for out in outs.iter().flatten() {
                if n < out.len() {
                    if n > 0 {
                        st.partial = Some(out.slice(n..));
                        self.waker.wake();
                        done += 1;
                    }
                    return Written::Frames(done);
                }
                n -= out.len();
                done += 1;
            }
        }
        Written::All
    }

    fn append(&self, st: &mut State, wire: Wire, slot: Option<Arc<str>>) {
        let was_idle = st.idle();
        st.queue.push_back(Entry { wire, slot });
        if was_idle {
            self.waker.wake();
        }
    }

    fn overflow(&self, st: &mut State) {
        st.drop_queued();
        st.closing = Some(Close {
            code: close::TRY_AGAIN_LATER,
            reason: "client too slow to keep up".into(),
            last_words: Some(msg::error(
                None,
                ErrorCode::SlowConsumer,
                "you are not reading messages fast enough to keep up; reconnect and subscribe to fewer channels",
                &None,
            )),
            abort: true,
        });
        self.waker.wake();
    }

    /// The socket failed: nothing more can be sent, not even a close frame.
    fn lost(&self, st: &mut State, error: &io::Error) {
        tracing::debug!(%error, "client socket failed");
        st.drop_queued();
        st.partial = None;
        st.closing = Some(Close {
            code: close::ABNORMAL,
            reason: "connection lost".into(),
            last_words: None,
            abort: true,
        });
        self.waker.wake();
    }

    /// Asks the client's task to close the connection. The first close wins.
    pub fn close(&self, close: Close) {
        let mut st = self.lock();
        if st.closing.is_some() {
            return;
        }
        if close.abort {
            st.drop_queued();
        }
        st.closing = Some(close);
        self.waker.wake();
    }

    pub fn is_closing(&self) -> bool {
        self.lock().closing.is_some()
    }

    /// Takes everything queued, as a writer that delivered it would. For in-process subscribers
    /// (benchmarks, tests), which have no socket.
    pub fn take_queued(&self) -> Vec<Wire> {
        let mut st = self.lock();
        let mut out = Vec::with_capacity(st.queue.len());
        while let Some(wire) = st.pop_front() {
            out.push(wire);
        }
        out
    }

    /// The client's task: writes what queued while the socket was full, as it drains. Completes
    /// only with the close to perform, once nothing is left to deliver before it (at once for
    /// an aborting close).
    pub async fn deliver(&self) -> Close {
        std::future::poll_fn(|cx| self.poll_deliver(cx)).await
    }

    fn poll_deliver(&self, cx: &mut Context<'_>) -> Poll<Close> {
        loop {
            let mut st = self.lock();
            if let Some(close) = st.closing.as_ref().filter(|c| c.abort || st.idle()) {
                return Poll::Ready(close.clone());
            }
            // Registered under the lock a pusher needs to wake it: no wake-up is missed, and an
            // aborting close reaches a writer that waits for room.
            self.waker.register(cx.waker());
            let Some(socket) = self.socket.as_ref().filter(|_| !st.idle()) else {
                return Poll::Pending;
            };
            let written = {
                let outs: [Option<std::borrow::Cow<'_, Bytes>>; WRITE_BATCH] =
                    std::array::from_fn(|i| {
                        st.queue.get(i).map(|e| e.wire.for_client(self.deflate))
                    });
                let mut slices = [IoSlice::new(&[]); WRITE_BATCH + 1];
                let mut n = 0;
                if let Some(partial) = &st.partial {
                    slices[0] = IoSlice::new(partial);
                    n = 1;
                }
                for out in outs.iter().flatten() {
                    slices[n] = IoSlice::new(out);
                    n += 1;
                }
                socket.try_write_vectored(&slices[..n])
            };
            match written {
                Ok(n) => st.consume(n, self.deflate),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(st);
                    match socket.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => self.lost(&mut self.lock(), &e),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(e) => self.lost(&mut st, &e),
            }
        }
    }

    /// Completes a close: the rest of a frame cut short (so the client can parse what follows),
    /// then `close`'s last words and the close frame. Nothing else is sent any more: the close
    /// was decided, so pushes are refused.
    pub async fn write_close(&self, close: &Close) -> io::Result<()> {
        let Some(socket) = &self.socket else {
            return Ok(());
        };
        let mut frames = Vec::with_capacity(3);
        frames.extend(self.lock().partial.take());
        if let Some(words) = &close.last_words {
            frames.push(
                Wire::text(words.as_str())
                    .for_client(self.deflate)
                    .into_owned(),
            );
        }
        frames.push(Wire::close(close.code, &close.reason).bytes().clone());
        super::write_all(socket, &frames).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn f(s: &str) -> Wire {
        Wire::text(s)
    }

    /// Pushes one data message; what became of it.
    fn one(o: &Outbox, channel: &Arc<str>, text: &str, delivery: Delivery) -> Pushed {
        let t = o.push_data(channel, &[(f(text), delivery)]);
        match t {
            Tally {
                overflowed: true, ..
            } => Pushed::Overflowed,
            Tally { conflated: 1, .. } => Pushed::Conflated,
            Tally { queued: 1, .. } => Pushed::Queued,
            _ => Pushed::Closed,
        }
    }

    fn drain(o: &Outbox) -> Vec<String> {
        o.take_queued()
            .iter()
            .map(|w| String::from_utf8_lossy(w.payload()).into_owned())
            .collect()
    }

    #[test]
    fn conflatable_values_keep_only_the_newest_per_channel() {
        let o = Outbox::new(4, 1, None, None);
        let price: Arc<str> = Arc::from("price:BTCUSDT");
        let eth: Arc<str> = Arc::from("price:ETHUSDT");
        assert_eq!(one(&o, &price, "p1", Delivery::Conflate), Pushed::Queued);
        assert_eq!(one(&o, &eth, "e1", Delivery::Conflate), Pushed::Queued);
        assert_eq!(one(&o, &price, "p2", Delivery::Conflate), Pushed::Conflated);
        assert_eq!(one(&o, &price, "p3", Delivery::Conflate), Pushed::Conflated);
        assert_eq!(drain(&o), ["p3", "e1"]);
        // After delivery a new value queues again rather than replacing a sent one.
        assert_eq!(one(&o, &price, "p4", Delivery::Conflate), Pushed::Queued);
        assert_eq!(drain(&o), ["p4"]);
    }

    #[test]
    fn a_final_kline_seals_the_forming_slot() {
        let o = Outbox::new(8, 1, None, None);
        let k: Arc<str> = Arc::from("klines:BTCUSDT:1m");
        one(&o, &k, "forming t0", Delivery::Conflate);
        one(&o, &k, "final t0", Delivery::Reliable);
        assert_eq!(
            one(&o, &k, "forming t1", Delivery::Conflate),
            Pushed::Queued
        );
        assert_eq!(
            one(&o, &k, "forming t1b", Delivery::Conflate),
            Pushed::Conflated
        );
        assert_eq!(drain(&o), ["forming t0", "final t0", "forming t1b"]);
    }

    #[tokio::test]
    async fn too_many_reliable_messages_close_with_1013() {
        let o = Outbox::new(3, 1, None, None);
        let t: Arc<str> = Arc::from("trades:BTCUSDT");
        for i in 0..3 {
            assert_eq!(
                one(&o, &t, &i.to_string(), Delivery::Reliable),
                Pushed::Queued
            );
        }
        assert_eq!(one(&o, &t, "x", Delivery::Reliable), Pushed::Overflowed);
        assert_eq!(one(&o, &t, "y", Delivery::Reliable), Pushed::Closed);
        assert!(
            drain(&o).is_empty(),
            "an aborted queue is dropped, not delivered"
        );
        let close = o.deliver().await;
        assert_eq!(close.code, 1013);
        assert!(close.last_words.unwrap().as_str().contains("SLOW_CONSUMER"));
    }

    #[tokio::test]
    async fn graceful_close_waits_for_what_is_queued() {
        let o = Outbox::new(3, 1, None, None);
        o.push_control(Frame::from("bye"));
        o.close(Close {
            code: 1001,
            reason: "shutting down".into(),
            last_words: None,
            abort: false,
        });
        let pending = tokio::time::timeout(Duration::from_millis(50), o.deliver()).await;
        assert!(pending.is_err(), "the close waits for the queued reply");
        assert_eq!(drain(&o), ["bye"]);
        assert_eq!(o.deliver().await.code, 1001);
    }

    use std::time::Duration;
    use tokio::net::TcpStream;

    /// A connected loopback pair whose buffers are small, so a reader that stops fills them.
    async fn pair() -> (Arc<Socket>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let (client, accepted) = tokio::join!(sock.connect(addr), listener.accept());
        let (server, _) = accepted.unwrap();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        (Arc::new(Socket::from(server)), client.unwrap())
    }

    /// The client's task, as far as writing goes.
    fn spawn_writer(o: &Arc<Outbox>) -> tokio::task::JoinHandle<Close> {
        let o = o.clone();
        tokio::spawn(async move { o.deliver().await })
    }

    /// Closes normally and checks the writer ends with that close.
    async fn close_normally(o: &Outbox, writer: tokio::task::JoinHandle<Close>) {
        o.close(Close {
            code: 1000,
            reason: "done".into(),
            last_words: None,
            abort: false,
        });
        assert_eq!(writer.await.unwrap().code, 1000);
    }

    /// Reads `n` text frames written by [`Wire`] (unmasked, FIN).
    async fn read_frames(s: &mut TcpStream, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            let mut head = [0u8; 2];
            s.read_exact(&mut head).await.unwrap();
            assert_eq!(head[0], 0x81);
            let len = match head[1] {
                126 => s.read_u16().await.unwrap() as usize,
                127 => s.read_u64().await.unwrap() as usize,
                l => l as usize,
            };
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await.unwrap();
            out.push(String::from_utf8(body).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_client_that_keeps_up_is_written_at_once() {
        let (server, mut client) = pair().await;
        let o = Outbox::new(8, 1, Some(server), None);
        let t: Arc<str> = Arc::from("trades:X");
        assert_eq!(one(&o, &t, "one", Delivery::Reliable), Pushed::Queued);
        assert_eq!(o.push_control(Frame::from("two")), Pushed::Queued);
        assert!(o.take_queued().is_empty(), "nothing queued: both went out");
        assert_eq!(read_frames(&mut client, 2).await, ["one", "two"]);
    }

    #[tokio::test]
    async fn a_full_socket_queues_and_the_writer_catches_up_in_order() {
        let (server, mut client) = pair().await;
        let o = Arc::new(Outbox::new(100_000, 1, Some(server), None));
        let t: Arc<str> = Arc::from("trades:X");
        let p: Arc<str> = Arc::from("price:X");
        // Frames of 3,000 bytes and a reader that is not reading: the socket fills mid-frame.
        let body = |i: usize| format!("{i:05}{}", "x".repeat(2995));
        for i in 0..200 {
            assert_eq!(one(&o, &t, &body(i), Delivery::Reliable), Pushed::Queued);
        }
        // A conflatable value behind them: replaced in the queue, never reordered.
        one(&o, &p, "price 1", Delivery::Conflate);
        assert_eq!(
            one(&o, &p, "price 2", Delivery::Conflate),
            Pushed::Conflated
        );
        let writer = spawn_writer(&o);
        let got = read_frames(&mut client, 201).await;
        for (i, frame) in got.iter().take(200).enumerate() {
            assert_eq!(frame, &body(i), "frame {i}");
        }
        assert_eq!(got[200], "price 2");
        // Caught up: the next frame goes straight out again.
        tokio::time::sleep(Duration::from_millis(20)).await;
        o.push_control(Frame::from("after"));
        assert_eq!(read_frames(&mut client, 1).await, ["after"]);
        close_normally(&o, writer).await;
    }

    #[tokio::test]
    async fn a_burst_is_written_together_and_what_does_not_fit_queues_in_order() {
        let (server, mut client) = pair().await;
        let o = Arc::new(Outbox::new(1_000, 1, Some(server), None));
        let t: Arc<str> = Arc::from("trades:X");
        let body = |i: usize| format!("{i:05}{}", "z".repeat(1995));
        let small: Vec<_> = ["a", "b", "c"].map(|s| (f(s), Delivery::Reliable)).to_vec();
        assert_eq!(o.push_data(&t, &small).queued, 3);
        assert!(
            o.take_queued().is_empty(),
            "three frames fit the socket at once"
        );
        assert_eq!(read_frames(&mut client, 3).await, ["a", "b", "c"]);
        // 200 frames (400 KB) against a few KB of socket buffer: most queue.
        let burst: Vec<_> = (0..200)
            .map(|i| (f(&body(i)), Delivery::Reliable))
            .collect();
        assert_eq!(o.push_data(&t, &burst).queued, 200);
        let writer = spawn_writer(&o);
        let got = read_frames(&mut client, 200).await;
        for (i, frame) in got.iter().enumerate() {
            assert_eq!(frame, &body(i), "frame {i}");
        }
        close_normally(&o, writer).await;
    }

    #[tokio::test]
    async fn an_aborting_close_still_completes_the_frame_cut_short() {
        let (server, mut client) = pair().await;
        let o = Outbox::new(1_000, 1, Some(server), None);
        let t: Arc<str> = Arc::from("trades:X");
        let big = "y".repeat(50_000);
        one(&o, &t, &big, Delivery::Reliable);
        one(&o, &t, "dropped", Delivery::Reliable);
        o.close(Close {
            code: 1013,
            reason: "slow".into(),
            last_words: Some(Frame::from("last words")),
            abort: true,
        });
        let close = o.deliver().await;
        let write = o.write_close(&close);
        let read = async {
            let frames = read_frames(&mut client, 2).await;
            let mut tail = [0u8; 8];
            client.read_exact(&mut tail[..2]).await.unwrap();
            (frames, tail)
        };
        let (written, (frames, tail)) = tokio::join!(write, read);
        written.unwrap();
        assert_eq!(frames, [big, "last words".to_string()]);
        assert_eq!(tail[0], 0x88, "then the close frame");
    }
}

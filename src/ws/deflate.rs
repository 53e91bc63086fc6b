//! permessage-deflate (RFC 7692): the negotiation, one message's compression, and the inflating
//! of what a client sends.
//!
//! The relay always answers with `server_no_context_takeover`: each message it sends is
//! compressed on its own, so one compressed frame serves every client that negotiated the
//! extension ([`super::Wire::for_client`] compresses a frame once, the first time one needs it).
//! Compression uses zlib-rs through flate2 (pure Rust, and it takes a window size, which
//! `server_max_window_bits` needs).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The window the relay compresses with unless a client asks for a smaller one.
pub const MAX_WINDOW_BITS: u8 = 15;
/// Payloads shorter than this are sent plain: deflate's few bytes of framing would not pay.
pub const MIN_COMPRESS_BYTES: usize = 64;
/// What a deflate block flushed with SYNC_FLUSH ends with; RFC 7692 §7.2.1 drops it on the
/// wire and the receiver appends it again.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What a connection agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The window the relay's messages to this client may use (`server_max_window_bits`).
    pub server_window_bits: u8,
    /// The client compresses each message on its own (`client_no_context_takeover`): the
    /// relay need not keep an inflater between its messages.
    pub client_no_context_takeover: bool,
    /// The window the client was asked to compress with (`client_max_window_bits`, where it
    /// said it can limit its window): small, because what a client sends is a few hundred
    /// bytes, and a connection that keeps an inflater then keeps a 512-byte window, not 32 KiB.
    pub client_window_bits: Option<u8>,
}

/// What a client that can limit its window is asked to use.
pub const CLIENT_WINDOW_BITS: u8 = 9;

impl Negotiated {
    /// The `Sec-WebSocket-Extensions` answer.
    pub fn response(&self) -> String {
        let mut r = String::from("permessage-deflate; server_no_context_takeover");
        if self.client_no_context_takeover {
            r.push_str("; client_no_context_takeover");
        }
        if self.server_window_bits < MAX_WINDOW_BITS {
            r.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_window_bits
            ));
        }
        if let Some(bits) = self.client_window_bits {
            r.push_str(&format!("; client_max_window_bits={bits}"));
        }
        r
    }
}

/// The first `permessage-deflate` offer among `headers` (each a `Sec-WebSocket-Extensions`
/// value, offers comma-separated, in the client's order of preference) that the relay can
/// honour. An offer with an unknown or repeated parameter, or a value out of range, is
/// declined (RFC 7692 §5.1) and the next one tried.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Negotiated> {
    headers
        .into_iter()
        .flat_map(|h| h.split(','))
        .find_map(accept_offer)
}

fn accept_offer(offer: &str) -> Option<Negotiated> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen = Vec::new();
    let mut n = Negotiated {
        server_window_bits: MAX_WINDOW_BITS,
        client_no_context_takeover: false,
        client_window_bits: None,
    };
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover", None) => {}
            ("client_no_context_takeover", None) => n.client_no_context_takeover = true,
            // The client can limit its own window: it is asked for a small one.
            ("client_max_window_bits", None) => n.client_window_bits = Some(CLIENT_WINDOW_BITS),
            ("client_max_window_bits", Some(v)) => {
                n.client_window_bits = Some(window_bits(v, 8)?.min(CLIENT_WINDOW_BITS));
            }
            // zlib cannot compress raw deflate with a 256-byte window: 8 is declined.
            ("server_max_window_bits", Some(v)) => n.server_window_bits = window_bits(v, 9)?,
            _ => return None,
        }
        seen.push(name);
    }
    Some(n)
}

fn window_bits(value: &str, min: u8) -> Option<u8> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits: u8 = value.parse().ok()?;
    (min..=MAX_WINDOW_BITS).contains(&bits).then_some(bits)
}

/// `payload` compressed as one message with a `bits` window (RFC 7692 §7.2.1: raw deflate,
/// flushed, its empty-block tail removed); `None` where that would not be smaller, unless
/// `always`.
pub fn compress(payload: &[u8], bits: u8, always: bool) -> Option<Vec<u8>> {
    thread_local! {
        /// One compressor per window size and thread, reset for each message: allocating
        /// zlib's state per message would cost more than compressing it.
        static COMPRESSORS: std::cell::RefCell<Vec<Option<Compress>>> =
            std::cell::RefCell::new((0..=MAX_WINDOW_BITS).map(|_| None).collect());
    }
    if payload.len() < MIN_COMPRESS_BYTES && !always {
        return None;
    }
    let bits = bits.clamp(9, MAX_WINDOW_BITS);
    COMPRESSORS.with(|cell| {
        let mut all = cell.borrow_mut();
        let c = all[usize::from(bits)].get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::default(), false, bits)
        });
        c.reset();
        let mut out = Vec::with_capacity(payload.len() + 64);
        loop {
            let consumed = usize::try_from(c.total_in()).ok()?;
            c.compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
                .ok()?;
            // A sync flush is complete once it leaves output room unused.
            if c.total_in() as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity());
        }
        if !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (always || out.len() < payload.len()).then_some(out)
    })
}

/// Why a compressed message from a client could not be inflated.
#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit: 1009, and no more of it is inflated.
    TooBig,
    /// Not valid deflate data: the connection fails (1002... RFC 7692 §8).
    Corrupt,
}

/// Inflates a client's compressed messages, one fragment at a time, never past `limit` bytes a
/// message.
pub struct Inflater {
    inner: Option<Decompress>,
    /// The window to inflate with: at least the client's.
    window_bits: u8,
    /// Keep the inflater (and its window) between messages: the client takes its context over.
    keep: bool,
    limit: usize,
    /// Inflated bytes of the current message.
    produced: usize,
}

impl Inflater {
    pub fn new(negotiated: &Negotiated, limit: usize) -> Inflater {
        Inflater {
            inner: None,
            // zlib inflates raw deflate with 9..15; a window of 8 fits in 9.
            window_bits: negotiated
                .client_window_bits
                .map_or(MAX_WINDOW_BITS, |b| b.max(9)),
            keep: !negotiated.client_no_context_takeover,
            limit,
            produced: 0,
        }
    }

    /// Inflates one fragment of a message (`last`: the message ends with it) into `out`.
    pub fn inflate(
        &mut self,
        input: &[u8],
        last: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        self.run(input, out)?;
        if last {
            self.run(&TAIL, out)?;
            self.produced = 0;
            if !self.keep {
                self.inner = None;
            }
        }
        Ok(())
    }

    fn run(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), InflateError> {
        let bits = self.window_bits;
        let d = self
            .inner
            .get_or_insert_with(|| Decompress::new_with_window_bits(false, bits));
        let mut chunk = [0u8; 8 * 1024];
        loop {
            let (before_in, before_out) = (d.total_in(), d.total_out());
            let status = d
                .decompress(input, &mut chunk, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            let used = (d.total_in() - before_in) as usize;
            let made = (d.total_out() - before_out) as usize;
            input = &input[used..];
            self.produced += made;
            if self.produced > self.limit {
                self.inner = None;
                return Err(InflateError::TooBig);
            }
            out.extend_from_slice(&chunk[..made]);
            if status == Status::StreamEnd {
                // A block with BFINAL set ends the stream; what follows starts a new one.
                *d = Decompress::new_with_window_bits(false, bits);
                if input.is_empty() {
                    return Ok(());
                }
                continue;
            }
            if input.is_empty() && made < chunk.len() {
                return Ok(());
            }
            if used == 0 && made == 0 {
                return Err(InflateError::Corrupt);
            }
        }
    }
}

/// Turns a client's byte stream with compressed messages into the same stream with those
/// messages inflated, for tungstenite (which knows no extensions) to read: a compressed frame
/// (RSV1 on a message's first frame, and the continuations of that message) becomes a frame of
/// the same opcode and FIN with the inflated payload, RSV1 clear, masked with a zero key. Every
/// other frame passes as it came, so tungstenite judges it (RSV1 on a control frame or a lone
/// continuation is its protocol error, 1002). A message that inflates past the limit becomes a
/// frame header over the limit (tungstenite's 1009) and is not inflated further; data that is
/// not deflate becomes a header with RSV2 set (1002).
pub struct ClientFrames {
    inflater: Inflater,
    limit: usize,
    /// Inside a compressed message that has more fragments to come.
    in_message: bool,
    /// Bytes of a frame being passed through that have not arrived yet.
    passing: usize,
    /// Failed: everything after is passed through untouched (tungstenite has stopped reading).
    failed: bool,
}

/// What [`ClientFrames::step`] did.
pub enum Step {
    /// Moved bytes to the output; call again.
    Progress,
    /// Needs more input.
    More,
}

impl ClientFrames {
    pub fn new(negotiated: &Negotiated, limit: usize) -> ClientFrames {
        ClientFrames {
            inflater: Inflater::new(negotiated, limit),
            limit,
            in_message: false,
            passing: 0,
            failed: false,
        }
    }

    /// Consumes what it can of `raw` into `out`.
    pub fn step(&mut self, raw: &mut bytes::BytesMut, out: &mut Vec<u8>) -> Step {
        if raw.is_empty() {
            return Step::More;
        }
        if self.failed {
            out.extend_from_slice(&raw.split());
            return Step::Progress;
        }
        if self.passing > 0 {
            let n = self.passing.min(raw.len());
            out.extend_from_slice(&raw.split_to(n));
            self.passing -= n;
            return Step::Progress;
        }
        let Some(head) = Header::parse(raw) else {
            return Step::More;
        };
        let opcode = head.first & 0x0f;
        let rsv1 = head.first & 0x40 != 0;
        let compressed = head.masked
            && head.first & 0x30 == 0
            && if self.in_message {
                opcode == 0 && !rsv1
            } else {
                rsv1 && (opcode == 1 || opcode == 2)
            };
        if !compressed {
            // As it came; tungstenite decides what it is worth.
            self.passing = head.len;
            out.extend_from_slice(&raw.split_to(head.size));
            return Step::Progress;
        }
        if head.len > self.limit {
            return self.fail(out, Failure::TooBig);
        }
        if raw.len() < head.size + head.len {
            raw.reserve(head.size + head.len - raw.len());
            return Step::More;
        }
        let frame = raw.split_to(head.size + head.len);
        let mut payload = frame[head.size..].to_vec();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= head.mask[i % 4];
        }
        let fin = head.first & 0x80 != 0;
        let mut inflated = Vec::with_capacity(payload.len() * 3);
        match self.inflater.inflate(&payload, fin, &mut inflated) {
            Ok(()) => {}
            Err(InflateError::TooBig) => return self.fail(out, Failure::TooBig),
            Err(InflateError::Corrupt) => return self.fail(out, Failure::Corrupt),
        }
        self.in_message = !fin;
        // FIN and opcode as sent, RSV bits clear; masked with a zero key, so the payload stands.
        out.push(head.first & 0x8f);
        super::put_len(out, 0x80, inflated.len());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&inflated);
        Step::Progress
    }

    fn fail(&mut self, out: &mut Vec<u8>, why: Failure) -> Step {
        self.failed = true;
        match why {
            // A text frame announcing one byte more than the limit.
            Failure::TooBig => {
                out.push(0x81);
                super::put_len(out, 0x80, self.limit + 1);
                out.extend_from_slice(&[0, 0, 0, 0]);
            }
            // RSV2 set: a protocol error.
            Failure::Corrupt => out.extend_from_slice(&[0xa1, 0x80, 0, 0, 0, 0]),
        }
        Step::Progress
    }
}

enum Failure {
    TooBig,
    Corrupt,
}

struct Header {
    first: u8,
    masked: bool,
    mask: [u8; 4],
    /// Header bytes, mask included.
    size: usize,
    /// Payload bytes.
    len: usize,
}

impl Header {
    fn parse(raw: &[u8]) -> Option<Header> {
        let (&first, rest) = raw.split_first()?;
        let (&second, rest) = rest.split_first()?;
        let masked = second & 0x80 != 0;
        let (len, ext) = match second & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
                2,
            ),
            127 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 8),
            n => (u64::from(n), 0),
        };
        let mut mask = [0u8; 4];
        if masked {
            mask.copy_from_slice(rest.get(ext..ext + 4)?);
        }
        Some(Header {
            first,
            masked,
            mask,
            size: 2 + ext + if masked { 4 } else { 0 },
            len: usize::try_from(len).unwrap_or(usize::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(offer: &str) -> Option<Negotiated> {
        negotiate([offer])
    }

    fn agreed(client_no_context_takeover: bool) -> Negotiated {
        Negotiated {
            server_window_bits: 15,
            client_no_context_takeover,
            client_window_bits: None,
        }
    }

    #[test]
    fn offers_are_accepted_or_declined_by_their_parameters() {
        let plain = agreed(false);
        assert_eq!(n("permessage-deflate"), Some(plain));
        // What browsers send: they are asked for a small window.
        let browser = n("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(browser.client_window_bits, Some(9));
        assert_eq!(
            browser.response(),
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=9"
        );
        assert_eq!(
            n("permessage-deflate; client_max_window_bits=8")
                .unwrap()
                .client_window_bits,
            Some(8)
        );
        let cnct = n("permessage-deflate; client_no_context_takeover; server_no_context_takeover")
            .unwrap();
        assert!(cnct.client_no_context_takeover);
        assert_eq!(
            cnct.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(
            n("permessage-deflate; server_max_window_bits=10")
                .unwrap()
                .server_window_bits,
            10
        );
        for declined in [
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; unknown_param",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
        ] {
            assert_eq!(n(declined), None, "{declined}");
        }
        // The first acceptable offer wins.
        let two = negotiate(["permessage-deflate; server_max_window_bits=8, permessage-deflate; client_no_context_takeover"]);
        assert!(two.unwrap().client_no_context_takeover);
        assert_eq!(negotiate(Vec::<&str>::new()), None);
    }

    #[test]
    fn a_compressed_message_inflates_back_and_small_ones_stay_plain() {
        let text = br#"{"type":"depth","channel":"depth:BTCUSDT:20","data":{"bids":[["67000.10","0.5"],["67000.00","1.2"],["66999.90","0.3"]],"asks":[["67000.20","0.7"],["67000.30","2.0"]]}}"#.repeat(4);
        for bits in [9, 12, 15] {
            let packed = compress(&text, bits, false).unwrap();
            assert!(packed.len() < text.len() / 2, "{bits}: {}", packed.len());
            let mut inf = Inflater::new(&agreed(true), 1 << 20);
            let mut out = Vec::new();
            let (a, b) = packed.split_at(packed.len() / 3);
            inf.inflate(a, false, &mut out).unwrap();
            inf.inflate(b, true, &mut out).unwrap();
            assert_eq!(out, text);
        }
        assert_eq!(compress(b"{\"type\":\"pong\"}", 15, false), None);
    }

    #[test]
    fn a_bomb_stops_at_the_limit_and_garbage_is_corrupt() {
        let zeros = vec![0u8; 10 << 20];
        let bomb = compress(&zeros, 15, false).unwrap();
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        let mut inf = Inflater::new(&agreed(false), 65_536);
        let mut out = Vec::new();
        assert_eq!(
            inf.inflate(&bomb, true, &mut out),
            Err(InflateError::TooBig)
        );
        assert!(out.len() <= 65_536 + 16 * 1024);
        let mut inf = Inflater::new(&agreed(false), 65_536);
        assert_eq!(
            inf.inflate(&[0xff, 0xff, 0xff, 0xff, 0x12], true, &mut Vec::new()),
            Err(InflateError::Corrupt)
        );
    }
}

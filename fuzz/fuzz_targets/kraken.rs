//! Kraken frames through a subscribed session (books, trades, candles): never panic.
#![no_main]
use std::sync::Arc;

use exchange_relay::exchange::{kraken, Adapter, InstrumentSet, ProtocolContext};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let ctx = ProtocolContext { instruments: Arc::new(InstrumentSet::default()) };
    let mut session = kraken::Kraken::new().new_protocol(ctx);
    let mut out = Vec::new();
    session.subscribe(&["book:BTC/USD".into(), "trade:BTC/USD".into(), "candles:1s:BTC/USD".into(), "ticker:BTC/USD".into(), "ohlc:5:BTC/USD".into()], 0, &mut out);
    // Two frames: the second can update what the first set up (a book, a candle).
    for part in s.splitn(2, '\n') {
        let _ = session.decode(part, 0, &mut out);
    }
    session.on_tick(i64::MAX / 2, &mut out);
});

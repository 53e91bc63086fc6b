//! Binance frames: never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let mut out = Vec::new();
        let _ = exchange_relay::exchange::binance::decode(s, &mut out);
    }
});

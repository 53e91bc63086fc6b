//! Channel names: never panic, and whatever parses displays back to itself.
#![no_main]
use exchange_relay::domain::Channel;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(channel) = s.parse::<Channel>() {
            let shown = channel.to_string();
            assert_eq!(shown.parse::<Channel>().ok(), Some(channel));
        }
    }
});

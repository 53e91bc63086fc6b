//! The load generator itself (README § Performance), at a size that checks it works rather than
//! how fast anything is: it starts the real relay, every client gets every trade sent in the
//! window, and it prints its figures. No figure is asserted against a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// `delivered A/s of B/s` from a point line.
fn delivered(line: &str) -> (f64, f64) {
    let rest = line.split("delivered").nth(1).unwrap();
    let mut nums = rest
        .split(['/', ' '])
        .filter_map(|w| w.trim().parse::<f64>().ok());
    (nums.next().unwrap(), nums.next().unwrap())
}

#[test]
fn fanout_delivers_every_trade_of_the_window_to_every_client() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--relay-bin", env!("CARGO_BIN_EXE_exchange-relay")])
        .args(["--warmup", "1", "--duration", "2"])
        .args(["fanout", "--clients", "50", "--rates", "20"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let point = text
        .lines()
        .find(|l| l.starts_with("50c x 20 msg/s"))
        .unwrap_or_else(|| panic!("no result line in:\n{text}"));
    let (got, expected) = delivered(point);
    assert!(expected > 0.0, "{point}");
    assert_eq!(got, expected, "every client gets every trade: {point}");
    for figure in ["p99", "us/delivery", "RSS"] {
        assert!(point.contains(figure), "{figure} missing: {point}");
    }
    assert!(point.trim_end().ends_with("ok"), "{point}");
    assert!(
        text.contains("relay stats: connectedClients 50 slowConsumerDisconnects 0"),
        "{text}"
    );
}

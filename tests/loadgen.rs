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

/// Runs loadgen with `scenario` against the relay built beside it; what it printed.
fn loadgen(scenario: &[&str]) -> String {
    // Pinned as in a measurement (taskset), on a second CPU where there is one.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let other = if cpus > 1 { "1" } else { "0" };
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--relay-bin", env!("CARGO_BIN_EXE_exchange-relay")])
        .args(["--relay-cpu", "0", "--loadgen-cpu", other])
        .args(["--warmup", "1", "--duration", "2"])
        .args(scenario)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn fanout_delivers_every_trade_of_the_window_to_every_client() {
    let text = loadgen(&["fanout", "--clients", "50", "--rates", "20"]);
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

#[test]
fn cluster_delivers_through_redis_from_the_owner_to_the_follower() {
    let text = loadgen(&["cluster", "--clients", "20", "--rates", "20"]);
    let point = text
        .lines()
        .find(|l| l.starts_with("B: 20c x 20 msg/s"))
        .unwrap_or_else(|| panic!("no result line in:\n{text}"));
    let (got, expected) = delivered(point);
    assert!(expected > 0.0, "{point}");
    assert_eq!(got, expected, "every client on B gets every trade: {point}");
    assert!(
        text.contains("B says the stream's owner is \"a\""),
        "{text}"
    );
    assert!(
        text.contains("after the run, the stream's owner is \"a\""),
        "{text}"
    );
    assert!(text.contains("us CPU per published trade"), "{text}");
}

#[test]
fn breadth_delivers_every_channel() {
    let text = loadgen(&[
        "breadth",
        "--channels",
        "10",
        "--clients-per-channel",
        "3",
        "--mean-rate",
        "5",
    ]);
    let point = text
        .lines()
        .find(|l| l.starts_with("10ch x 3c"))
        .unwrap_or_else(|| panic!("no result line in:\n{text}"));
    let (got, expected) = delivered(point);
    assert!(expected > 0.0, "{point}");
    assert_eq!(got, expected, "{point}");
    assert!(text.contains("totalSubscriptions 30"), "{text}");
    assert!(text.contains("dropped 0 unrouted 0"), "{text}");
}

#[test]
fn churn_stays_within_the_exchange_limit_and_leaves_nothing_behind() {
    let text = loadgen(&[
        "churn",
        "--clients",
        "20",
        "--channels",
        "10",
        "--ops-per-client",
        "2",
    ]);
    assert!(text.contains("0 one-second windows over 5 msg/s"), "{text}");
    assert!(
        text.contains("binanceStreams 0 (feed still subscribed to 0), totalSubscriptions 0"),
        "{text}"
    );
}

#[test]
fn idle_reports_memory_per_connection() {
    let text = loadgen(&["idle", "--clients", "100"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("idle: 100 connected clients"))
        .unwrap_or_else(|| panic!("no result line in:\n{text}"));
    assert!(line.contains("KiB per connection"), "{line}");
}

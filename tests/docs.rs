//! `docs/protocol.md` is the users' reference: every request type, server message type and
//! error code the code has is listed there, and everything listed there exists in the code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use exchange_relay::api_error::HttpCode;
use exchange_relay::domain::Channel;
use exchange_relay::protocol::{ErrorCode, CONTROL_TYPES, REQUEST_TYPES};

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap()
}

/// The first-column `code` values of the table under `heading`.
fn table(doc: &str, heading: &str) -> BTreeSet<String> {
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no section {heading}"));
    doc[start + heading.len() + 2..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and rule
        .filter_map(|row| {
            let cell = row.split('|').nth(1)?.trim();
            Some(cell.trim_matches('`').to_string())
        })
        .collect()
}

fn set<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> BTreeSet<String> {
    items.into_iter().map(Into::into).collect()
}

#[test]
fn every_request_type_is_documented_and_nothing_else() {
    assert_eq!(table(&doc(), "### Request types"), set(REQUEST_TYPES));
}

#[test]
fn every_server_message_type_is_documented_and_nothing_else() {
    let data_types = [
        "price:BTCUSDT",
        "ticker:BTCUSDT",
        "klines:BTCUSDT:1m",
        "trades:BTCUSDT",
        "depth:BTCUSDT",
        "signals:BTCUSDT",
        "portfolio:u1",
        "orders:u1",
    ]
    .map(|name| name.parse::<Channel>().unwrap().message_type());
    let code: BTreeSet<String> = set(CONTROL_TYPES)
        .into_iter()
        .chain(set(data_types))
        .collect();
    assert_eq!(table(&doc(), "### Server message types"), code);
}

#[test]
fn every_error_code_is_documented_and_nothing_else() {
    assert_eq!(
        table(&doc(), "### Error codes"),
        set(ErrorCode::ALL.map(ErrorCode::as_str))
    );
    assert_eq!(
        table(&doc(), "### HTTP error codes"),
        set(HttpCode::ALL.map(HttpCode::as_str))
    );
}

#[test]
fn the_readme_links_the_reference_and_nothing_outside_the_repository() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains("(docs/protocol.md)"));
    assert!(!readme.contains("../shared"), "a clone has no ../shared");
}

#[test]
fn the_readmes_chart_code_is_the_example_that_runs() {
    // The README prints examples/chart.html's connection code; the console check runs the
    // page in Chromium. The two must be the same code.
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let page = std::fs::read_to_string(format!("{root}/examples/chart.html")).unwrap();
    let start = readme.find("```js\n").expect("a js block in the README") + 6;
    let code = &readme[start..start + readme[start..].find("```").unwrap()];
    assert!(code.contains("since: last"), "the block shows the resume");
    assert!(
        page.contains(code.trim_end()),
        "README's chart code differs from examples/chart.html"
    );
}

//! The local order book the exchanges that send diffs need (Coinbase `level2`, Kraken `book`):
//! levels keyed by exact decimals, so `"0.10"` and `"0.1"` are one level and a delete always
//! finds its level. What makes a book trustworthy (sequence numbers, checksums) is the
//! adapter's; this keeps the levels.

use std::collections::{BTreeMap, HashMap};

use crate::decimal::Dec;
use crate::events::Book;

/// Levels sent to clients at most (`depth:` 5, 10 or 20).
const TOP: usize = 20;

#[derive(Debug, Default)]
pub struct LocalBook {
    /// Price → size, best last.
    pub bids: BTreeMap<Dec, Dec>,
    /// Price → size, best first.
    pub asks: BTreeMap<Dec, Dec>,
    /// A snapshot has been applied and nothing since put the book in doubt.
    pub synced: bool,
}

/// A book's failed checks, so that one that keeps failing (REST and WebSocket disagreeing on
/// a pair's precision, say) is not resubscribed in a tight loop: the first resyncs go at
/// once, later ones ever further apart (up to [`Resyncs::MAX_DELAY_MS`]); a book that then
/// verifies [`Resyncs::HEALTHY_AFTER`] updates in a row starts afresh.
#[derive(Debug, Default)]
pub struct Resyncs {
    books: HashMap<String, Failing>,
}

#[derive(Debug, Default)]
struct Failing {
    /// Failures since the book was last healthy.
    count: u32,
    /// Verified updates since the last failure.
    good: u32,
    /// A resubscribe held back until then.
    due_ms: Option<i64>,
}

impl Resyncs {
    /// Failures resynced at once before the delays start.
    pub const AT_ONCE: u32 = 2;
    pub const FIRST_DELAY_MS: i64 = 1_000;
    pub const MAX_DELAY_MS: i64 = 60_000;
    pub const HEALTHY_AFTER: u32 = 50;

    /// `book` failed a check at `now_ms`: returns the delay before its resubscribe (0: now).
    pub fn failed(&mut self, book: &str, now_ms: i64) -> i64 {
        let f = self.books.entry(book.to_string()).or_default();
        f.count += 1;
        f.good = 0;
        if f.count <= Self::AT_ONCE {
            f.due_ms = None;
            return 0;
        }
        let delay = Self::FIRST_DELAY_MS
            .saturating_mul(1 << (f.count - Self::AT_ONCE - 1).min(16))
            .min(Self::MAX_DELAY_MS);
        f.due_ms = Some(now_ms + delay);
        delay
    }

    /// `book` passed its check; returns true when that ended a run of failures.
    pub fn verified(&mut self, book: &str) -> bool {
        let Some(f) = self.books.get_mut(book) else {
            return false;
        };
        f.good += 1;
        if f.good >= Self::HEALTHY_AFTER {
            self.books.remove(book);
            return true;
        }
        false
    }

    /// Failures in the current run of `book`.
    pub fn failures(&self, book: &str) -> u32 {
        self.books.get(book).map_or(0, |f| f.count)
    }

    /// The books whose held-back resubscribe is due at `now_ms`.
    pub fn due(&mut self, now_ms: i64) -> Vec<String> {
        let mut due = Vec::new();
        for (book, f) in &mut self.books {
            if f.due_ms.is_some_and(|d| d <= now_ms) {
                f.due_ms = None;
                due.push(book.clone());
            }
        }
        due
    }

    pub fn forget(&mut self, book: &str) {
        self.books.remove(book);
    }
}

/// Which side of the book a level is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BookSide {
    Bid,
    Ask,
}

impl LocalBook {
    /// Forgets every level (a snapshot follows, or the book is in doubt).
    pub fn clear(&mut self, synced: bool) {
        self.bids.clear();
        self.asks.clear();
        self.synced = synced;
    }

    /// Sets the size at `price`; a zero size removes the level.
    pub fn set(&mut self, side: BookSide, price: Dec, size: Dec) {
        let levels = match side {
            BookSide::Bid => &mut self.bids,
            BookSide::Ask => &mut self.asks,
        };
        if size.is_zero() {
            levels.remove(&price);
        } else {
            levels.insert(price, size);
        }
    }

    /// Keeps the best `depth` levels of each side (a venue subscribed at that depth sends
    /// no deletes for levels that fall below it).
    pub fn truncate(&mut self, depth: usize) {
        while self.bids.len() > depth {
            self.bids.pop_first();
        }
        while self.asks.len() > depth {
            self.asks.pop_last();
        }
    }

    /// The best bid at or above the best ask: the book cannot be right.
    pub fn crossed(&self) -> bool {
        match (self.bids.last_key_value(), self.asks.first_key_value()) {
            (Some((bid, _)), Some((ask, _))) => bid >= ask,
            _ => false,
        }
    }

    /// Bids best first.
    pub fn best_bids(&self) -> impl Iterator<Item = (&Dec, &Dec)> {
        self.bids.iter().rev()
    }

    /// Asks best first.
    pub fn best_asks(&self) -> impl Iterator<Item = (&Dec, &Dec)> {
        self.asks.iter()
    }

    /// The top of the book as clients get it.
    pub fn top(&self, time_ms: i64) -> Book {
        Book {
            bids: self.best_bids().take(TOP).map(|(p, q)| [*p, *q]).collect(),
            asks: self.best_asks().take(TOP).map(|(p, q)| [*p, *q]).collect(),
            time_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_book_that_keeps_failing_is_resynced_ever_further_apart() {
        let mut r = Resyncs::default();
        assert_eq!(r.failed("b", 0), 0);
        assert_eq!(r.failed("b", 10), 0);
        assert_eq!(r.failed("b", 20), 1_000);
        assert!(r.due(500).is_empty());
        assert_eq!(r.due(1_020), vec!["b".to_string()]);
        assert!(r.due(1_030).is_empty(), "due once");
        assert_eq!(r.failed("b", 2_000), 2_000);
        assert_eq!(r.failed("b", 5_000), 4_000);
        for _ in 0..20 {
            r.failed("b", 9_000);
        }
        assert_eq!(r.failed("b", 9_000), Resyncs::MAX_DELAY_MS);
        assert_eq!(r.failed("other", 9_000), 0, "other books are not held back");
        for _ in 0..Resyncs::HEALTHY_AFTER - 1 {
            assert!(!r.verified("b"));
        }
        assert!(r.verified("b"));
        assert_eq!(r.failed("b", 10_000), 0, "healthy again: at once");
    }

    fn d(s: &str) -> Dec {
        s.parse().unwrap()
    }

    #[test]
    fn levels_are_exact_and_best_first() {
        let mut b = LocalBook::default();
        b.set(BookSide::Bid, d("100.10"), d("1"));
        b.set(BookSide::Bid, d("100.2"), d("2"));
        b.set(BookSide::Ask, d("100.3"), d("3"));
        b.set(BookSide::Ask, d("100.4"), d("4"));
        // "100.1" is the level "100.10" was: a delete finds it.
        b.set(BookSide::Bid, d("100.1"), Dec::ZERO);
        let top = b.top(7);
        assert_eq!(top.bids, [[d("100.2"), d("2")]]);
        assert_eq!(top.asks, [[d("100.3"), d("3")], [d("100.4"), d("4")]]);
        assert!(!b.crossed());
        b.set(BookSide::Bid, d("100.3"), d("1"));
        assert!(b.crossed());
    }

    #[test]
    fn truncation_keeps_the_best_levels() {
        let mut b = LocalBook::default();
        for i in 1..=30 {
            b.set(BookSide::Bid, Dec::from_int(i), d("1"));
            b.set(BookSide::Ask, Dec::from_int(100 + i), d("1"));
        }
        b.truncate(25);
        assert_eq!(b.bids.len(), 25);
        assert_eq!(
            b.best_bids().next().map(|(p, _)| *p),
            Some(Dec::from_int(30))
        );
        assert_eq!(
            b.best_asks().next().map(|(p, _)| *p),
            Some(Dec::from_int(101))
        );
        assert_eq!(b.asks.keys().last(), Some(&Dec::from_int(125)));
        b.clear(false);
        assert!(b.bids.is_empty() && b.asks.is_empty() && !b.synced);
    }
}

//! Exact decimals for every price, quantity and volume the relay handles: exchange prices are
//! decimal strings, a book keyed by `f64` can split one level into two or miss a delete, and a
//! candle summed in `f64` prints `0.000019319999999999998`. [`Dec`] is an integer count of
//! 10⁻¹⁸ units, so `"0.10"`, `"0.1"` and `"1e-1"` are the same level, sums are exact, and it
//! serialises as the JSON number the exchange wrote (`97523.45`, never `97523.45000000001`).

use std::fmt;
use std::str::FromStr;

/// Fractional digits kept.
const SCALE: u32 = 18;
const ONE: i128 = 1_000_000_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Dec(i128);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a decimal number")]
pub struct DecError(pub String);

impl Dec {
    pub const ZERO: Dec = Dec(0);

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The nearest `f64`, as if the exchange's decimal text had been parsed directly.
    pub fn to_f64(self) -> f64 {
        self.to_string().parse().unwrap_or(0.0)
    }

    /// The decimal an `f64` was parsed from: its shortest round-trip digits. Exchanges that
    /// send JSON numbers (Kraken) write them with at most ~15 significant digits, which an
    /// `f64` keeps exactly, so this recovers the number as written.
    pub fn from_f64(v: f64) -> Option<Dec> {
        if !v.is_finite() {
            return None;
        }
        // `Display` for f64 prints the shortest round-trip digits without an exponent.
        format!("{v}").parse().ok()
    }

    /// An integer amount (a trade count, a whole number of units).
    pub fn from_int(v: i64) -> Dec {
        Dec(i128::from(v) * ONE)
    }

    pub fn checked_add(self, other: Dec) -> Option<Dec> {
        self.0.checked_add(other.0).map(Dec)
    }

    pub fn checked_sub(self, other: Dec) -> Option<Dec> {
        self.0.checked_sub(other.0).map(Dec)
    }

    /// The exact product, to 10⁻¹⁸ (exchange prices and sizes have at most 8–10 decimals
    /// each, so a price · size is exact); `None` on overflow (beyond ~1.7·10²⁰).
    pub fn checked_mul(self, other: Dec) -> Option<Dec> {
        // (a1·1e18 + a0)(b1·1e18 + b0) / 1e18 = a1·b1·1e18 + a1·b0 + a0·b1 + a0·b0/1e18, each
        // term within i128 for values up to the range above.
        let (a1, a0) = (self.0 / ONE, self.0 % ONE);
        let (b1, b0) = (other.0 / ONE, other.0 % ONE);
        a1.checked_mul(b1)?
            .checked_mul(ONE)?
            .checked_add(a1.checked_mul(b0)?)?
            .checked_add(a0.checked_mul(b1)?)?
            .checked_add(a0.checked_mul(b0)? / ONE)
            .map(Dec)
    }

    /// Digits of `self` written with exactly `precision` fractional digits, without the point
    /// and without leading zeros: Kraken's checksum form (`0.00100000` at 8 → `100000`).
    pub fn checksum_digits(self, precision: u32) -> String {
        let precision = precision.min(SCALE);
        let scaled = self.0.unsigned_abs() / 10u128.pow(SCALE - precision);
        let s = scaled.to_string();
        let trimmed = s.trim_start_matches('0');
        if trimmed.is_empty() {
            "0".to_string()
        } else {
            trimmed.to_string()
        }
    }

    /// Fractional digits needed to write `self` exactly.
    pub fn scale(self) -> u32 {
        let mut v = self.0.unsigned_abs() % ONE as u128;
        if v == 0 {
            return 0;
        }
        let mut digits = SCALE;
        while v.is_multiple_of(10) {
            v /= 10;
            digits -= 1;
        }
        digits
    }
}

impl FromStr for Dec {
    type Err = DecError;

    fn from_str(s: &str) -> Result<Dec, DecError> {
        let err = || DecError(s.chars().take(40).collect());
        let (mantissa, exp) = match s.find(['e', 'E']) {
            Some(i) => (&s[..i], s[i + 1..].parse::<i32>().map_err(|_| err())?),
            None => (s, 0),
        };
        let (neg, digits) = match mantissa.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, mantissa.strip_prefix('+').unwrap_or(mantissa)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty()
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        // value = (int.frac) × 10^exp, kept as units of 10^-SCALE.
        let all: String = format!("{int}{frac}");
        let shift = SCALE as i32 + exp - frac.len() as i32;
        let mut v: i128 = 0;
        for b in all.bytes() {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(i128::from(b - b'0')))
                .ok_or_else(err)?;
        }
        let v = if shift >= 0 {
            v.checked_mul(10i128.checked_pow(shift as u32).ok_or_else(err)?)
                .ok_or_else(err)?
        } else {
            // Digits below 10^-18 cannot matter for a price or a quantity.
            v / 10i128.checked_pow((-shift) as u32).unwrap_or(i128::MAX)
        };
        Ok(Dec(if neg { -v } else { v }))
    }
}

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let int = abs / ONE as u128;
        let scale = self.scale();
        if scale == 0 {
            return write!(f, "{sign}{int}");
        }
        let frac = (abs % ONE as u128) / 10u128.pow(SCALE - scale);
        write!(f, "{sign}{int}.{frac:0width$}", width = scale as usize)
    }
}

/// A JSON number with exactly the decimal's digits (`0.0025`, `97523.45`, `100`).
impl serde::Serialize for Dec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = serde_json::value::RawValue::from_string(self.to_string())
            .map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// From a decimal string (`"0.35280000"`, Binance and Coinbase) or a JSON number (Kraken).
impl<'de> serde::Deserialize<'de> for Dec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Dec, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Dec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal number or a decimal string")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dec, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dec, E> {
                Ok(Dec(i128::from(v) * ONE))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dec, E> {
                Ok(Dec::from_int(v))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Dec, E> {
                Dec::from_f64(v).ok_or_else(|| E::custom(format!("{v} is not a finite decimal")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Dec {
        s.parse().unwrap()
    }

    #[test]
    fn equal_values_are_equal_keys() {
        assert_eq!(d("0.10"), d("0.1"));
        assert_eq!(d("1e-1"), d("0.1"));
        assert_eq!(d("1.5E2"), d("150"));
        assert_eq!(d("45285.2"), d("45285.20000000"));
        assert!(d("0.5666") > d("0.5665"));
        assert!(d("-1") < Dec::ZERO);
        assert!(d("0").is_zero() && d("0.00000000").is_zero());
    }

    #[test]
    fn garbage_is_refused() {
        for bad in ["", ".", "abc", "1.2.3", "1e", "--1", "1 2", "NaN", "inf"] {
            assert!(bad.parse::<Dec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn checksum_digits_follow_krakens_rules() {
        assert_eq!(d("45285.2").checksum_digits(1), "452852");
        assert_eq!(d("0.00100000").checksum_digits(8), "100000");
        // The docs print 0.566 for a pair with price precision 4: it is 5660 on the wire.
        assert_eq!(d("0.566").checksum_digits(4), "5660");
        assert_eq!(d("18097.1547").checksum_digits(8), "1809715470000");
        assert_eq!(d("1e-8").checksum_digits(8), "1");
    }

    #[test]
    fn arithmetic_is_exact() {
        assert_eq!(
            d("0.00000966").checked_add(d("0.00000966")).unwrap(),
            d("0.00001932")
        );
        assert_eq!(d("97450").checked_sub(d("0.01")).unwrap(), d("97449.99"));
        assert_eq!(
            d("97523.45").checked_mul(d("0.00012")).unwrap(),
            d("11.702814")
        );
        assert_eq!(d("-2").checked_mul(d("0.5")).unwrap(), d("-1"));
        assert_eq!(
            d("123456789.12345678")
                .checked_mul(d("0.00000001"))
                .unwrap(),
            d("1.2345678912345678")
        );
        assert!(d("1e20").checked_mul(d("1e20")).is_none());
    }

    #[test]
    fn json_numbers_keep_the_exchanges_digits() {
        let v: Vec<Dec> =
            serde_json::from_str(r#"["0.35280000", 0.5117, 4831.75496356, 12, -3]"#).unwrap();
        assert_eq!(
            v,
            [
                d("0.3528"),
                d("0.5117"),
                d("4831.75496356"),
                d("12"),
                d("-3")
            ]
        );
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            "[0.3528,0.5117,4831.75496356,12,-3]"
        );
        assert_eq!(Dec::from_f64(1e-7), Some(d("0.0000001")));
        assert_eq!(Dec::from_f64(f64::NAN), None);
        assert!(serde_json::from_str::<Dec>(r#""abc""#).is_err());
    }

    #[test]
    fn display_is_exact() {
        assert_eq!(d("97523.45000000").to_string(), "97523.45");
        assert_eq!(d("0.00000001").to_string(), "0.00000001");
        assert_eq!(d("-2.5").to_string(), "-2.5");
        assert_eq!(d("100").to_string(), "100");
        assert!((d("97523.45").to_f64() - 97523.45).abs() < 1e-9);
    }
}

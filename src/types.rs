//! Newtypes parsed once at the edge, so the core never sees unchecked names or durations.

use std::fmt;

use serde::Serialize;
use time::OffsetDateTime;

mod claims;

pub use claims::{ClaimLookup, Claims};

/// Names of issuers, roles and backends share one shape: short, lowercase, no surprises
/// in logs, URLs or SQL filters.
fn parse_name(kind: &str, raw: &str) -> Result<String, String> {
    let valid_start = raw.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let valid_chars = raw.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if raw.len() > 64 || !valid_start || !valid_chars {
        return Err(format!("{kind} {raw:?} must be 1-64 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit"));
    }
    Ok(raw.to_owned())
}

macro_rules! name_type {
    ($name:ident, $kind:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, String> {
                parse_name($kind, raw).map(Self)
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(IssuerName, "issuer name");
name_type!(RoleName, "role name");
name_type!(BackendName, "backend name");

/// A credential lifetime in whole seconds, at least one second and at most a week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Ttl(u32);

impl Ttl {
    pub const MAX_SECONDS: u32 = 7 * 24 * 3600;

    pub fn from_seconds(seconds: u64) -> Result<Self, String> {
        if seconds == 0 || seconds > u64::from(Self::MAX_SECONDS) {
            return Err(format!("a TTL must be between 1 second and 7 days, got {seconds} s"));
        }
        Ok(Self(seconds as u32))
    }

    /// A duration as [`parse_duration`] reads it, within a TTL's bounds.
    pub fn parse(raw: &str) -> Result<Self, String> {
        Self::from_seconds(parse_duration(raw)?)
    }

    pub fn seconds(self) -> u32 {
        self.0
    }

    pub fn as_duration(self) -> time::Duration {
        time::Duration::seconds(i64::from(self.0))
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} s", self.0)
    }
}

/// SHA-256 as lowercase hex: how the audit log refers to a secret without holding it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// The one duration syntax of the whole crate (policies, config, CLI flags, API filters):
/// plain seconds (`900`) or numbers with units `s`, `m`, `h`, `d`, `w` (`90s`, `15m`, `1h30m`,
/// `2w`), and what [`Ttl`]'s `Display` writes (`900 s`): spaces may follow a number or a unit but
/// never split a number. Returns whole seconds; zero and overflow are refused.
pub fn parse_duration(raw: &str) -> Result<u64, String> {
    let raw = raw.trim();
    let expected = || format!("invalid duration {raw:?}: expected e.g. 900, 90s, 15m, 1h30m, 7d, 2w");
    let too_long = || format!("invalid duration {raw:?}: too long");
    if raw.is_empty() {
        return Err(expected());
    }
    let number = |digits: &str| digits.parse::<u64>().map_err(|_| too_long());
    let total = if raw.bytes().all(|b| b.is_ascii_digit()) {
        number(raw)?
    } else {
        let mut total: u64 = 0;
        let mut rest = raw;
        while !rest.is_empty() {
            let (digits, after) = rest.split_at(rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len());
            let after = after.trim_start();
            let Some(unit) = after.chars().next() else { return Err(expected()) };
            let seconds_per_unit: u64 = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                'w' => 604_800,
                _ => return Err(format!("invalid duration {raw:?}: unknown unit {unit:?} (use s, m, h, d, w)")),
            };
            if digits.is_empty() {
                return Err(format!("invalid duration {raw:?}: expected a number before {unit:?}"));
            }
            total = number(digits)?.checked_mul(seconds_per_unit).and_then(|part| total.checked_add(part)).ok_or_else(too_long)?;
            rest = after[unit.len_utf8()..].trim_start();
        }
        total
    };
    if total == 0 {
        return Err(expected());
    }
    Ok(total)
}

/// A claim's value as text, the way identity columns and freezes compare claims: strings as
/// they are (borrowed), numbers in decimal, booleans as `true`/`false`; anything else has no text.
pub fn claim_text(value: &serde_json::Value) -> Option<std::borrow::Cow<'_, str>> {
    match value {
        serde_json::Value::String(text) => Some(text.into()),
        serde_json::Value::Number(number) => Some(number.to_string().into()),
        serde_json::Value::Bool(flag) => Some(flag.to_string().into()),
        _ => None,
    }
}

/// A time as RFC 3339 (`2024-05-10T12:00:00Z`), the one format the broker writes times in.
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// The stable, machine-readable vocabulary of failures (`code` in problem+json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidToken,
    UntrustedIssuer,
    AccessDenied,
    TokenReplayed,
    TtlNotSatisfiable,
    RateLimited,
    BackendFailed,
    AuditUnavailable,
    IssuerUnavailable,
    RequestTimeout,
    NotFound,
    /// A Gogs delivery whose X-Gogs-Signature is missing or wrong.
    InvalidSignature,
    /// A Gogs delivery id, or a payload, seen before.
    DeliveryReplayed,
    /// A request body over the size limit.
    PayloadTooLarge,
    /// A request body in a content type the endpoint does not read.
    UnsupportedMediaType,
    /// A policy reload whose files do not compile; the serving set stays.
    PolicyInvalid,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::UntrustedIssuer => "untrusted_issuer",
            ErrorCode::AccessDenied => "access_denied",
            ErrorCode::TokenReplayed => "token_replayed",
            ErrorCode::TtlNotSatisfiable => "ttl_not_satisfiable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BackendFailed => "backend_failed",
            ErrorCode::AuditUnavailable => "audit_unavailable",
            ErrorCode::IssuerUnavailable => "issuer_unavailable",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidSignature => "invalid_signature",
            ErrorCode::DeliveryReplayed => "delivery_replayed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::PolicyInvalid => "policy_invalid",
        }
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    address: std::net::IpAddr,
    prefix: u8,
}

impl IpNetwork {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (address, prefix) = match raw.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (raw.trim(), None),
        };
        let address: std::net::IpAddr = address.parse().map_err(|_| format!("{raw:?} is not an IP address or CIDR network"))?;
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix.parse::<u8>().ok().filter(|p| *p <= bits).ok_or_else(|| format!("{raw:?}: the prefix must be 0 to {bits}"))?,
        };
        Ok(Self { address, prefix })
    }

    pub fn contains(&self, candidate: std::net::IpAddr) -> bool {
        // An IPv4 peer may arrive as an IPv4-mapped IPv6 address on a dual-stack socket.
        let candidate = match candidate {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(candidate),
            v4 => v4,
        };
        let mask = |bits: u32, total: u32| -> u128 {
            if bits == 0 {
                0
            } else {
                (!0u128) << (total - bits)
            }
        };
        match (self.address, candidate) {
            (std::net::IpAddr::V4(network), std::net::IpAddr::V4(ip)) => {
                let mask = mask(u32::from(self.prefix), 32) as u32;
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (std::net::IpAddr::V6(network), std::net::IpAddr::V6(ip)) => {
                let mask = mask(u32::from(self.prefix), 128);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The issuer name policies use for Gogs delivery tokens; reserved when `[gogs]` is configured.
pub const GOGS_ISSUER_NAME: &str = "gogs";
/// The claims of a delivery token a policy can bind (`[role.claims]` of a `gogs` role, or
/// `[role.delivery]` of a role that also wants the automation's own identity token).
pub const DELIVERY_CLAIMS: &[&str] = &["repository", "ref", "ref_type", "sha", "pusher", "event", "delivery_id", "hook"];

/// An error and its causes on one line, the way an operator reads it (`a: b: c`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_contain_their_addresses_and_no_others() {
        let network = IpNetwork::parse("10.1.0.0/16").unwrap();
        assert!(network.contains("10.1.200.3".parse().unwrap()));
        assert!(!network.contains("10.2.0.1".parse().unwrap()));
        assert!(network.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped peers count");
        assert!(IpNetwork::parse("127.0.0.1").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert!(!IpNetwork::parse("127.0.0.1").unwrap().contains("127.0.0.2".parse().unwrap()));
        assert!(IpNetwork::parse("2001:db8::/32").unwrap().contains("2001:db8:1::7".parse().unwrap()));
        assert!(IpNetwork::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(IpNetwork::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ttl_parses_units_and_plain_seconds() {
        assert_eq!(Ttl::parse("900").unwrap().seconds(), 900);
        assert_eq!(Ttl::parse("90s").unwrap().seconds(), 90);
        assert_eq!(Ttl::parse("15m").unwrap().seconds(), 900);
        assert_eq!(Ttl::parse("1h30m").unwrap().seconds(), 5400);
        assert_eq!(Ttl::parse("2d").unwrap().seconds(), 172_800);
    }

    #[test]
    fn one_duration_syntax_for_ttls_and_spans() {
        assert_eq!(parse_duration("2w"), Ok(1_209_600));
        assert_eq!(parse_duration("1d12h"), Ok(129_600));
        assert_eq!(parse_duration("900"), parse_duration("15m"));
        for bad in ["0", "0s", "", "w", "3x", "99999999999999999999w", "18446744073709551615w"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn ttl_rejects_zero_garbage_and_trailing_digits() {
        for bad in ["0", "", "15x", "m", "10m5", "-5", "8d"] {
            assert!(Ttl::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn ttl_reads_what_it_writes_and_spaces_around_units() {
        assert_eq!(Ttl::parse("900 s").unwrap().seconds(), 900);
        assert_eq!(Ttl::parse("1h 30m").unwrap().seconds(), 5400);
        for bad in ["1 5m", "+900", "15 x", "1h 5"] {
            assert!(Ttl::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    proptest::proptest! {
        #[test]
        fn ttl_parse_never_panics(raw in proptest::prelude::any::<String>()) {
            let _ = Ttl::parse(&raw);
        }

        #[test]
        fn ttl_parse_round_trips_what_ttl_formats(seconds in 1..=u64::from(Ttl::MAX_SECONDS)) {
            let ttl = Ttl::from_seconds(seconds).unwrap();
            proptest::prop_assert_eq!(Ttl::parse(&ttl.to_string()), Ok(ttl));
            let (days, hours, minutes, rest) = (seconds / 86400, seconds % 86400 / 3600, seconds % 3600 / 60, seconds % 60);
            proptest::prop_assert_eq!(Ttl::parse(&format!("{days}d{hours}h{minutes}m{rest}s")), Ok(ttl));
            proptest::prop_assert_eq!(Ttl::parse(&seconds.to_string()), Ok(ttl));
        }

        #[test]
        fn ttl_parse_rejects_anything_but_numbers_units_and_spaces(
            head in "[0-9smhd ]{0,6}",
            garbage in "[^0-9smhd\\s]",
            tail in "[0-9smhd ]{0,6}",
        ) {
            let raw = format!("{head}{garbage}{tail}");
            proptest::prop_assert!(Ttl::parse(&raw).is_err(), "{:?} accepted", raw);
        }

        #[test]
        fn ttl_parse_multiplies_a_number_by_its_unit_within_a_week(
            number in 0u64..2_000_000,
            (unit, seconds_per_unit) in proptest::sample::select(vec![("", 1u64), ("s", 1), (" s", 1), ("m", 60), ("h", 3600), ("d", 86400)]),
        ) {
            let seconds = number * seconds_per_unit;
            let parsed = Ttl::parse(&format!("{number}{unit}")).map(Ttl::seconds);
            if (1..=u64::from(Ttl::MAX_SECONDS)).contains(&seconds) {
                proptest::prop_assert_eq!(parsed, Ok(seconds as u32));
            } else {
                proptest::prop_assert!(parsed.is_err());
            }
        }
    }

    #[test]
    fn names_reject_uppercase_and_separators() {
        assert!(RoleName::parse("kafka-orders.write_1").is_ok());
        for bad in ["", "Kafka", "a/b", "-lead", "a b", &"x".repeat(65)] {
            assert!(RoleName::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn sha256_hex_matches_known_vector() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}

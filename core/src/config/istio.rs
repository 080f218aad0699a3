//! Istio's networking kinds as users write them, and their conversion into
//! [`crate::routing`]: `VirtualService` in `istio/virtual_service.rs`, `DestinationRule` in
//! `istio/destination_rule.rs`, `ServiceEntry` in `istio/service_entry.rs`, and here what both share (durations, percentages, counts,
//! gRPC status names). Fields Istio defines that Isthmus does not implement yet are parsed
//! so that the error can name them ("not supported yet"), never silently dropped.

use serde::Deserialize;

use super::validate::Checker;
use super::Code;

mod destination_rule;
mod service_entry;
mod virtual_service;

pub use destination_rule::{destination_rule, DestinationRuleSpec};
pub use service_entry::{service_entry, ServiceEntrySpec};
pub use virtual_service::{virtual_service, ParsedVirtualService, VirtualServiceSpec};

/// A field Istio defines that Isthmus does not implement yet: parsed, so that its error can
/// name it.
pub(super) type Unsupported = Option<AnyValue>;

/// Any value, kept as written; its schema accepts anything.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct AnyValue(pub serde_yaml_ng::Value);

#[cfg(feature = "schema")]
impl schemars::JsonSchema for AnyValue {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AnyValue".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"x-kubernetes-preserve-unknown-fields": true})
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSelectorSpec {
    pub number: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PercentSpec {
    pub value: f64,
}

fn count(c: &mut Checker<'_>, field: &str, v: Option<i64>, max: i64) -> Option<u32> {
    let v = v?;
    if (0..=max).contains(&v) {
        Some(v as u32)
    } else {
        c.fail(
            Code::InvalidValue,
            field,
            format!("{v} is out of range (0-{max})"),
        );
        None
    }
}

/// Refuses a field that is set but not implemented yet, naming it.
pub(super) fn unsupported(c: &mut Checker<'_>, field: &str, value: &Unsupported) {
    if value.is_some() {
        c.fail(
            Code::Schema,
            field,
            format!(
                "`{}` is not supported yet",
                field.rsplit('.').next().unwrap_or(field)
            ),
        );
    }
}

/// Parses an Istio duration ("1.5s", "100ms", "2m", "1h") into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let (num, factor) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        return None;
    };
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| (v * factor).round() as u64)
}

fn duration(c: &mut Checker<'_>, field: &str, s: &str) -> Option<u64> {
    let d = parse_duration_ms(s);
    if d.is_none() {
        c.fail(
            Code::InvalidValue,
            field,
            format!("`{s}` is not a duration like 1.5s or 100ms"),
        );
    }
    d
}

fn percentage(c: &mut Checker<'_>, field: &str, p: &Option<PercentSpec>) -> f64 {
    match p {
        None => 100.0,
        Some(p) if (0.0..=100.0).contains(&p.value) => p.value,
        Some(p) => {
            c.fail(
                Code::InvalidValue,
                format!("{field}.percentage.value"),
                format!("{} is not a percentage (0-100)", p.value),
            );
            0.0
        }
    }
}

/// gRPC status names as Istio spells them.
pub fn grpc_code(name: &str) -> Option<u8> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u8)
}

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

    #[test]
    fn durations_parse_like_istio() {
        assert_eq!(parse_duration_ms("1.5s"), Some(1500));
        assert_eq!(parse_duration_ms("100ms"), Some(100));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("10"), None);
        assert_eq!(parse_duration_ms("-1s"), None);
    }
}

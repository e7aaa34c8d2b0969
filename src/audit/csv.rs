//! CSV for spreadsheets (RFC 4180), safe to open: claim values come from CI jobs, so any cell
//! that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, carriage return first)
//! is prefixed with `'`, and every cell is quoted.

use serde_json::Value;

use crate::audit::{AuditRecord, RECORD_FIELDS};

pub fn cell(value: &str) -> String {
    let neutralised = match value.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{value}"),
        _ => value.to_owned(),
    };
    format!("\"{}\"", neutralised.replace('"', "\"\""))
}

fn line(cells: impl Iterator<Item = String>) -> String {
    let mut line = cells.collect::<Vec<_>>().join(",");
    line.push_str("\r\n");
    line
}

pub fn header() -> String {
    line(RECORD_FIELDS.iter().map(|field| cell(field)))
}

pub fn record(record: &AuditRecord) -> String {
    let value = serde_json::to_value(record).unwrap_or(Value::Null);
    line(RECORD_FIELDS.iter().map(|field| match &value[*field] {
        Value::Null => String::new(),
        Value::String(text) => cell(text),
        other => cell(&other.to_string()),
    }))
}

pub fn document(records: &[AuditRecord]) -> String {
    let mut out = header();
    for item in records {
        out.push_str(&record(item));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_cells_are_quoted_and_cannot_become_formulas() {
        assert_eq!(cell("=HYPERLINK(\"http://x\")"), "\"'=HYPERLINK(\"\"http://x\"\")\"");
        assert_eq!(cell("+1"), "\"'+1\"");
        assert_eq!(cell("-2+3"), "\"'-2+3\"");
        assert_eq!(cell("@SUM(A1)"), "\"'@SUM(A1)\"");
        assert_eq!(cell("a,b\nc"), "\"a,b\nc\"");
        assert_eq!(cell("platform/orders"), "\"platform/orders\"");
    }
}

//! The broker's log: JSON lines on stderr in production (`log_format = "json"`), text in
//! development, filtered by `CREDBROKER_LOG` (default `info`).
//!
//! A JSON line is one event with the fields of its innermost span:
//! `{"timestamp":…,"level":"INFO","message":"request finished","status":200,…,"target":…,
//! "span":{"name":"request","request_id":…,"issuance_id":…,"role":…}}`.
//! [`JsonLines`] writes them instead of tracing-subscriber's JSON formatter, which parsed and
//! serialized a span's fields again each time one was recorded and for every line: a tenth of
//! the broker's CPU per exchange (bench/README.md). Here a span keeps its fields as JSON text,
//! written once, and a line is assembled in a per-thread buffer and written in one call.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Installs the process's logger; call once, at start.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("CREDBROKER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(JsonLines::new(std::io::stderr)).init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init(),
    }
}

/// Writes each event as one JSON line to what `make_writer` makes.
pub struct JsonLines<W> {
    make_writer: W,
}

impl<W> JsonLines<W> {
    pub fn new(make_writer: W) -> Self {
        Self { make_writer }
    }
}

/// A span's fields as JSON members (`"name":value`), by field name: a field recorded again
/// replaces its value.
struct SpanFields(Vec<(&'static str, String)>);

impl SpanFields {
    fn record(&mut self, values: &impl RecordFields) {
        let mut visitor = FieldsVisitor::default();
        values.record_into(&mut visitor);
        for (name, value) in visitor.0 {
            match self.0.iter_mut().find(|(existing, _)| *existing == name) {
                Some((_, old)) => *old = value,
                None => self.0.push((name, value)),
            }
        }
    }
}

/// What carries field values: a new span's attributes or a later record.
trait RecordFields {
    fn record_into(&self, visitor: &mut dyn Visit);
}

impl RecordFields for Attributes<'_> {
    fn record_into(&self, visitor: &mut dyn Visit) {
        self.record(visitor)
    }
}

impl RecordFields for Record<'_> {
    fn record_into(&self, visitor: &mut dyn Visit) {
        self.record(visitor)
    }
}

/// Collects fields as (name, JSON value) pairs.
#[derive(Default)]
struct FieldsVisitor(Vec<(&'static str, String)>);

impl Visit for FieldsVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // Room for the usual value (an id, an address, a path) at once, rather than growing
        // by doubling through every request's fields.
        let mut json = String::with_capacity(64);
        json_string(&mut json, format_args!("{value:?}"));
        self.0.push((field.name(), json));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let mut json = String::with_capacity(value.len() + 2);
        json_string(&mut json, format_args!("{value}"));
        self.0.push((field.name(), json));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.push((field.name(), value.to_string()));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.push((field.name(), value.to_string()));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.push((field.name(), value.to_string()));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        let json = if value.is_finite() { value.to_string() } else { "null".to_owned() };
        self.0.push((field.name(), json));
    }
}

/// Writes `text` as a JSON string, quotes included, escaping as it goes.
fn json_string(out: &mut String, text: std::fmt::Arguments<'_>) {
    struct Escaping<'a>(&'a mut String);
    impl std::fmt::Write for Escaping<'_> {
        fn write_str(&mut self, text: &str) -> std::fmt::Result {
            for character in text.chars() {
                match character {
                    '"' => self.0.push_str("\\\""),
                    '\\' => self.0.push_str("\\\\"),
                    '\n' => self.0.push_str("\\n"),
                    '\r' => self.0.push_str("\\r"),
                    '\t' => self.0.push_str("\\t"),
                    control if (control as u32) < 0x20 => write!(self.0, "\\u{:04x}", control as u32)?,
                    other => self.0.push(other),
                }
            }
            Ok(())
        }
    }
    out.push('"');
    // Writing into a String cannot fail; a Debug impl that errs leaves its text cut short.
    let _ = Escaping(out).write_fmt(text);
    out.push('"');
}

fn push_members(line: &mut String, members: &[(&'static str, String)]) {
    for (name, value) in members {
        line.push(',');
        json_string(line, format_args!("{name}"));
        line.push(':');
        line.push_str(value);
    }
}

thread_local! {
    /// The line being assembled, reused so a line costs no allocation once the buffer has grown.
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
}

impl<S, W> Layer<S> for JsonLines<W>
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    W: for<'writer> MakeWriter<'writer> + 'static,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        let Some(span) = context.span(id) else { return };
        let mut fields = SpanFields(Vec::new());
        fields.record(attributes);
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, context: Context<'_, S>) {
        let Some(span) = context.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            fields.record(values);
        }
    }

    fn on_event(&self, event: &Event<'_>, context: Context<'_, S>) {
        let write = |line: &mut String| {
            line.clear();
            line.push_str("{\"timestamp\":\"");
            let now = time::OffsetDateTime::now_utc();
            let _ = write!(line, "{}", now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default());
            let _ = write!(line, "\",\"level\":\"{}\"", event.metadata().level());
            let mut fields = FieldsVisitor::default();
            event.record(&mut fields);
            // The message first, as a reader looks for it.
            fields.0.sort_by_key(|(name, _)| *name != "message");
            push_members(line, &fields.0);
            line.push_str(",\"target\":");
            json_string(line, format_args!("{}", event.metadata().target()));
            if let Some(span) = context.event_span(event) {
                line.push_str(",\"span\":{\"name\":");
                json_string(line, format_args!("{}", span.name()));
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    push_members(line, &fields.0);
                }
                line.push('}');
            }
            line.push_str("}\n");
            // A log line that cannot be written has nowhere else to go.
            let _ = self.make_writer.make_writer_for(event.metadata()).write_all(line.as_bytes());
        };
        // A Debug impl that logs while its line is being assembled gets a buffer of its own.
        LINE.with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut line) => write(&mut line),
            Err(_) => write(&mut String::new()),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};
    use tracing_subscriber::layer::SubscriberExt;

    use super::JsonLines;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(captured: &Captured) -> Vec<Value> {
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'), "{text}");
        text.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}"))).collect()
    }

    #[test]
    fn each_event_is_one_json_line_with_its_innermost_span() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let request = tracing::info_span!("request", request_id = "r-1", issuance_id = tracing::field::Empty, role = tracing::field::Empty);
            let _entered = request.enter();
            request.record("issuance_id", tracing::field::display("0192"));
            request.record("role", "first");
            request.record("role", "orders \"producer\"\n");
            tracing::info!(status = 200u16, elapsed_ms = 3u64, ok = true, ratio = f64::NAN, detail = ?Some("x"), "request finished");
            let inner = tracing::info_span!("mint", backend = "kafka");
            inner.in_scope(|| tracing::warn!(error = %"tab\there", "minting slowly"));
        });
        let lines = lines(&captured);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["message"], "outside any span");
        assert!(lines[0].get("span").is_none(), "{}", lines[0]);
        let finished = &lines[1];
        assert_eq!(finished["level"], "INFO");
        assert_eq!(finished["message"], "request finished");
        assert_eq!((finished["status"].clone(), finished["elapsed_ms"].clone(), finished["ok"].clone()), (json!(200), json!(3), json!(true)));
        assert_eq!(finished["ratio"], Value::Null);
        assert_eq!(finished["detail"], "Some(\"x\")");
        assert_eq!(finished["target"], module_path!());
        assert_eq!(finished["span"], json!({"name": "request", "request_id": "r-1", "issuance_id": "0192", "role": "orders \"producer\"\n"}));
        assert!(time::OffsetDateTime::parse(finished["timestamp"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).is_ok());
        // A field recorded twice appears once, with its last value.
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().nth(1).unwrap().matches("\"role\"").count(), 1);
        assert_eq!(lines[2]["level"], "WARN");
        assert_eq!(lines[2]["error"], "tab\there");
        assert_eq!(lines[2]["span"], json!({"name": "mint", "backend": "kafka"}));
    }
}

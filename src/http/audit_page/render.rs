//! The `/audit` page's HTML. Every value from the log goes through [`escape`]: claims come
//! from CI jobs and can hold anything, markup included. No inline script or style: the
//! Content-Security-Policy forbids them, so an injected `<script>` could not run anyway.

use std::fmt::Write;

use serde_json::Value;
use time::OffsetDateTime;

use crate::audit::query::{IssuanceHistory, IssuancePage, Timeline, DECISIONS, FILTERS};
use crate::audit::RECORD_FIELDS;
use crate::http::audit_page::git_links::Link;

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON for a `<script type="application/json">` block: `<`, `>` and `&` escaped, so no
/// value can close the block or open a comment.
fn json_block(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value)
        .unwrap_or_else(|_| "null".into())
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// To the second, in UTC: what a reader compares; the API keeps full precision.
fn time_text(at: OffsetDateTime) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    at.to_offset(time::UtcOffset::UTC).format(format).unwrap_or_default()
}

fn text_or_dash(value: Option<&str>) -> String {
    value.map(escape).unwrap_or_else(|| "—".into())
}

fn layout(title: &str, reader: Option<&str>, body: &str) -> String {
    let session = match reader {
        Some(reader) => format!(
            r#"<form class="session" method="post" action="/audit/session/end"><span id="reader">{}</span> <button type="submit">Sign out</button></form>"#,
            escape(reader)
        ),
        None => String::new(),
    };
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · credbroker audit</title>
<link rel="stylesheet" href="/audit/assets/audit.css">
</head>
<body>
<header><a class="home" href="/audit">credbroker audit</a>{session}</header>
<main>
{body}
</main>
<script src="/audit/assets/chart.umd.min.js"></script>
<script src="/audit/assets/audit.js"></script>
</body>
</html>
"#,
        title = escape(title)
    )
}

pub fn sign_in(message: Option<&str>) -> String {
    let message = message.map(|m| format!(r#"<p class="error" id="message">{}</p>"#, escape(m))).unwrap_or_default();
    let body = format!(
        r#"<h1>Sign in</h1>
{message}
<p>Paste an OIDC token that the broker's <code>[auditors]</code> policy binds (for example a
GitLab <code>id_tokens</code> token of the security team's project, or one from your identity
provider). It is kept in a cookie for this page only and checked again on every view; the
session ends when the token expires. Every view is recorded in the audit log.</p>
<form method="post" action="/audit/session" id="sign-in">
<label for="token">Token</label>
<textarea id="token" name="token" rows="6" required autocomplete="off" spellcheck="false"></textarea>
<button type="submit">Sign in</button>
</form>"#
    );
    layout("Sign in", None, &body)
}

pub fn problem(reader: Option<&str>, title: &str, message: &str) -> String {
    let body = format!(r#"<h1>{}</h1><p class="error" id="message">{}</p><p><a href="/audit">Back to the log</a></p>"#, escape(title), escape(message));
    layout(title, reader, &body)
}

/// What the search page shows.
pub struct Search<'a> {
    pub reader: &'a str,
    /// The filters as given (empty fields dropped), to fill the form and build page links.
    pub filters: &'a [(String, String)],
    pub error: Option<&'a str>,
    pub page: Option<&'a IssuancePage>,
    pub timeline: Option<&'a Timeline>,
}

fn filter_form(filters: &[(String, String)]) -> String {
    let value = |name: &str| filters.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).unwrap_or("");
    let mut form = String::from(r#"<form method="get" action="/audit" id="filters" class="filters">"#);
    for name in FILTERS.iter().copied().chain(["limit"]) {
        let label = name.replace('_', " ");
        let current = value(name);
        if name == "decision" {
            let _ = write!(form, r#"<label>{label}<select name="decision" id="filter-decision"><option value="">any</option>"#);
            let mut known = false;
            for choice in DECISIONS {
                let selected = if *choice == current { known = true; " selected" } else { "" };
                let _ = write!(form, r#"<option{selected}>{choice}</option>"#);
            }
            if !known && !current.is_empty() {
                let _ = write!(form, r#"<option selected>{}</option>"#, escape(current));
            }
            form.push_str("</select></label>");
            continue;
        }
        let placeholder = match name {
            "since" => "7d or 2024-05-01T00:00:00Z",
            "until" => "now",
            "project_path" => "group/** or group/project",
            "sha" => "7+ hex digits",
            "limit" => "100",
            _ => "",
        };
        let _ = write!(
            form,
            r#"<label>{label}<input name="{name}" id="filter-{name}" value="{}" placeholder="{placeholder}"></label>"#,
            escape(current)
        );
    }
    form.push_str(r#"<div class="actions"><button type="submit" id="search">Search</button> <a href="/audit">Reset</a></div></form>"#);
    form
}

fn page_link(filters: &[(String, String)], cursor: &str) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (name, value) in filters.iter().filter(|(name, _)| name != "cursor") {
        query.append_pair(name, value);
    }
    query.append_pair("cursor", cursor);
    format!("/audit?{}", query.finish())
}

pub fn search(view: &Search<'_>) -> String {
    let mut body = String::from("<h1>Audit log</h1>");
    body.push_str(&filter_form(view.filters));
    if let Some(error) = view.error {
        let _ = write!(body, r#"<p class="error" id="message">{}</p>"#, escape(error));
    }
    if let Some(timeline) = view.timeline {
        let _ = write!(
            body,
            r#"<section class="chart"><h2>Issued and denied per target</h2>
<p class="window">{} to {}, per {}</p>
<div class="canvas-box"><canvas id="timeline" aria-label="issued and denied per target over time"></canvas></div>
<script type="application/json" id="timeline-data">{}</script></section>"#,
            time_text(timeline.since),
            time_text(timeline.until),
            bucket_name(timeline.bucket_seconds),
            json_block(timeline)
        );
    }
    if let Some(page) = view.page {
        let _ = write!(body, r#"<section><h2>Records</h2><p class="count" id="count">{} shown, newest first</p>"#, page.items.len());
        body.push_str(
            r#"<table id="records"><thead><tr><th>when</th><th>decision</th><th>code</th><th>role</th><th>target</th><th>project</th><th>pipeline</th><th>job</th><th>commit</th><th>user</th><th>ttl</th><th>record</th></tr></thead><tbody>"#,
        );
        for record in &page.items {
            let short_sha = record.sha.as_deref().map(|sha| &sha[..sha.len().min(10)]);
            let _ = write!(
                body,
                r#"<tr class="decision-{decision}"><td>{when}</td><td>{decision}</td><td>{code}</td><td>{role}</td><td>{target}</td><td class="project">{project}</td><td>{pipeline}</td><td>{job}</td><td><code>{sha}</code></td><td class="user">{user}</td><td>{ttl}</td><td><a class="detail-link" href="/audit/issuances/{id}">{short_id}</a></td></tr>"#,
                when = time_text(record.occurred_at),
                decision = escape(&record.decision),
                code = text_or_dash(record.code.as_deref()),
                role = text_or_dash(record.role.as_deref()),
                target = text_or_dash(record.target.as_deref()),
                project = text_or_dash(record.project_path.as_deref()),
                pipeline = text_or_dash(record.pipeline_id.as_deref()),
                job = text_or_dash(record.job_id.as_deref()),
                sha = text_or_dash(short_sha),
                user = text_or_dash(record.user_login.as_deref()),
                ttl = record.granted_ttl_seconds.map(|ttl| format!("{ttl} s")).unwrap_or_else(|| "—".into()),
                id = record.id,
                short_id = &record.id.to_string()[..8],
            );
        }
        body.push_str("</tbody></table>");
        if let Some(cursor) = &page.next_cursor {
            let _ = write!(body, r#"<p><a id="next-page" rel="next" href="{}">Older records</a></p>"#, escape(&page_link(view.filters, cursor)));
        }
        body.push_str("</section>");
    }
    layout("Audit log", Some(view.reader), &body)
}

fn bucket_name(seconds: i64) -> String {
    match seconds {
        600 => "10 minutes".into(),
        3600 => "hour".into(),
        86_400 => "day".into(),
        604_800 => "week".into(),
        seconds if seconds % 3600 == 0 => format!("{} hours", seconds / 3600),
        seconds => format!("{seconds} s"),
    }
}

fn claim_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

pub fn detail(reader: &str, record: &IssuanceHistory, links: &[Link]) -> String {
    let issuance = &record.issuance;
    let mut body = format!(
        r#"<p><a href="/audit">← Audit log</a></p><h1 id="title">{} · {}</h1><p class="id">record <code id="record-id">{}</code></p>"#,
        escape(&issuance.decision),
        text_or_dash(issuance.role.as_deref()),
        issuance.id
    );
    if !links.is_empty() {
        body.push_str(r#"<ul class="git-links" id="git-links">"#);
        for link in links {
            let _ = write!(body, r#"<li><a class="git-link" data-kind="{kind}" href="{}">{kind} on the Git server</a></li>"#, escape(&link.href), kind = link.kind);
        }
        body.push_str("</ul>");
    }
    body.push_str(r#"<h2>Record</h2><dl id="fields">"#);
    let fields = serde_json::to_value(issuance).unwrap_or(Value::Null);
    for name in RECORD_FIELDS.iter() {
        let value = match &fields[*name] {
            Value::Null => "—".to_owned(),
            value => escape(&claim_text(value)),
        };
        let _ = write!(body, r#"<dt>{name}</dt><dd data-field="{name}">{value}</dd>"#);
    }
    body.push_str("</dl>");
    if let Some(renews) = record.renews {
        let _ = write!(body, r#"<p>Renews <a href="/audit/issuances/{renews}">{renews}</a>.</p>"#);
    }
    if !record.lifecycle.is_empty() {
        body.push_str(r#"<h2>Lifecycle</h2><table id="lifecycle"><thead><tr><th>event</th><th>at</th><th>expires</th><th>detail</th><th>record</th></tr></thead><tbody>"#);
        for step in &record.lifecycle {
            let _ = write!(
                body,
                r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><a href="/audit/issuances/{id}">{short}</a></td></tr>"#,
                escape(&step.event),
                time_text(step.at),
                step.expires_at.map(time_text).unwrap_or_else(|| "—".into()),
                text_or_dash(step.detail.as_deref()),
                id = step.id,
                short = &step.id.to_string()[..8],
            );
        }
        body.push_str("</tbody></table>");
    }
    if let Some(revocation) = &record.revocation {
        let _ = write!(
            body,
            r#"<h2>Revocation</h2><dl id="revocation"><dt>state</dt><dd>{}</dd><dt>reason</dt><dd>{}</dd><dt>due</dt><dd>{}</dd><dt>revoked</dt><dd>{}</dd><dt>requested by</dt><dd>{}</dd><dt>attempts</dt><dd>{}</dd><dt>last error</dt><dd>{}</dd></dl>"#,
            escape(&revocation.state),
            escape(&revocation.reason),
            time_text(revocation.due_at),
            revocation.revoked_at.map(time_text).unwrap_or_else(|| "—".into()),
            text_or_dash(revocation.requested_by.as_deref()),
            revocation.attempts,
            text_or_dash(revocation.last_error.as_deref()),
        );
    }
    if let Some(Value::Object(claims)) = &issuance.claims {
        body.push_str(r#"<h2>Claims</h2><table id="claims"><tbody>"#);
        let mut names: Vec<&String> = claims.keys().collect();
        names.sort();
        for name in names {
            let _ = write!(body, r#"<tr><th>{}</th><td data-claim="{}">{}</td></tr>"#, escape(name), escape(name), escape(&claim_text(&claims[name])));
        }
        body.push_str("</tbody></table>");
    }
    layout(&format!("Record {}", issuance.id), Some(reader), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_shown_not_run() {
        assert_eq!(escape(r#"<script>alert("x")</script> & 'y'"#), "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;");
        let block = json_block(&serde_json::json!({"target": "</script><script>alert(1)</script><!--"}));
        assert!(!block.contains('<') && !block.contains('>'), "{block}");
        let decoded: Value = serde_json::from_str(&block).unwrap();
        assert_eq!(decoded["target"], "</script><script>alert(1)</script><!--");
    }

    #[test]
    fn page_links_keep_the_filters_and_replace_the_cursor() {
        let filters = vec![("project_path".to_owned(), "a/**".to_owned()), ("cursor".to_owned(), "old".to_owned())];
        assert_eq!(page_link(&filters, "next"), "/audit?project_path=a%2F**&cursor=next");
    }
}

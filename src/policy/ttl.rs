//! The granted lifetime: never past the job's deadline, refused early when the job cannot
//! get what it needs. Pure arithmetic on an injected `now`, so every case is testable.

use time::OffsetDateTime;

use crate::types::Ttl;

#[derive(Debug, Clone, Copy, Default)]
pub struct TtlRequest {
    pub ttl: Option<Ttl>,
    pub min_ttl: Option<Ttl>,
}

#[derive(Debug, Clone, Copy)]
pub struct TtlLimits {
    pub default_ttl: Ttl,
    pub max_ttl: Ttl,
    pub min_ttl: Option<Ttl>,
    /// The backend's own ceiling (e.g. Snowflake JWTs: one hour).
    pub backend_max: Option<Ttl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantedTtl {
    pub ttl: Ttl,
    pub expires_at: OffsetDateTime,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TtlNotSatisfiable(pub String);

pub fn grant(
    request: TtlRequest,
    limits: TtlLimits,
    job_deadline: OffsetDateTime,
    now: OffsetDateTime,
) -> Result<GrantedTtl, TtlNotSatisfiable> {
    let deadline_text = rfc3339(job_deadline);
    let remaining = (job_deadline - now).whole_seconds();
    if remaining <= 0 {
        return Err(TtlNotSatisfiable(format!(
            "the job deadline {deadline_text} has passed ({} s ago)",
            -remaining
        )));
    }
    let wanted = i64::from(request.ttl.unwrap_or(limits.default_ttl).seconds());
    let granted = [
        Some(wanted),
        Some(i64::from(limits.max_ttl.seconds())),
        limits.backend_max.map(|ttl| i64::from(ttl.seconds())),
        Some(remaining),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(remaining);

    let needs = [
        request.min_ttl.map(|ttl| (i64::from(ttl.seconds()), "the requested minimum")),
        limits.min_ttl.map(|ttl| (i64::from(ttl.seconds()), "the role's minimum")),
    ];
    if let Some((needed, source)) = needs.into_iter().flatten().filter(|(needed, _)| *needed > granted).max() {
        let limit = if granted == remaining {
            format!("the job deadline {deadline_text} is {remaining} s away")
        } else if limits.backend_max.is_some_and(|max| i64::from(max.seconds()) == granted) {
            format!("the backend issues at most {granted} s (job deadline {deadline_text})")
        } else {
            format!("the role allows at most {granted} s (job deadline {deadline_text})")
        };
        return Err(TtlNotSatisfiable(format!(
            "{limit}, but {source} is {needed} s: short by {} s",
            needed - granted
        )));
    }
    let ttl = Ttl::from_seconds(granted as u64).map_err(TtlNotSatisfiable)?;
    Ok(GrantedTtl { ttl, expires_at: now + ttl.as_duration() })
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| at.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 12:00:00 UTC);

    fn ttl(seconds: u64) -> Ttl {
        Ttl::from_seconds(seconds).unwrap()
    }

    fn limits() -> TtlLimits {
        TtlLimits { default_ttl: ttl(900), max_ttl: ttl(3600), min_ttl: None, backend_max: None }
    }

    fn deadline_in(seconds: i64) -> OffsetDateTime {
        NOW + time::Duration::seconds(seconds)
    }

    #[test]
    fn default_ttl_when_nothing_requested() {
        let granted = grant(TtlRequest::default(), limits(), deadline_in(7200), NOW).unwrap();
        assert_eq!(granted.ttl.seconds(), 900);
        assert_eq!(granted.expires_at, deadline_in(900));
    }

    #[test]
    fn request_is_capped_by_role_backend_and_deadline() {
        let request = TtlRequest { ttl: Some(ttl(7200)), min_ttl: None };
        assert_eq!(grant(request, limits(), deadline_in(86_400), NOW).unwrap().ttl.seconds(), 3600);
        let with_backend = TtlLimits { backend_max: Some(ttl(1800)), ..limits() };
        assert_eq!(grant(request, with_backend, deadline_in(86_400), NOW).unwrap().ttl.seconds(), 1800);
        let granted = grant(request, limits(), deadline_in(600), NOW).unwrap();
        assert_eq!(granted.ttl.seconds(), 600);
        assert_eq!(granted.expires_at, deadline_in(600), "never past the job");
    }

    #[test]
    fn requested_minimum_beyond_deadline_is_refused_with_shortfall() {
        let request = TtlRequest { ttl: None, min_ttl: Some(ttl(600)) };
        let error = grant(request, limits(), deadline_in(240), NOW).unwrap_err().0;
        assert!(error.contains("2026-11-22T12:04:00Z"), "{error}");
        assert!(error.contains("240 s away"), "{error}");
        assert!(error.contains("short by 360 s"), "{error}");
    }

    #[test]
    fn role_minimum_beyond_deadline_is_refused() {
        let role = TtlLimits { min_ttl: Some(ttl(300)), ..limits() };
        let error = grant(TtlRequest::default(), role, deadline_in(120), NOW).unwrap_err().0;
        assert!(error.contains("the role's minimum is 300 s"), "{error}");
        assert!(error.contains("short by 180 s"), "{error}");
        assert!(grant(TtlRequest::default(), role, deadline_in(300), NOW).is_ok());
    }

    #[test]
    fn minimum_above_backend_ceiling_names_the_backend() {
        let role = TtlLimits { backend_max: Some(ttl(900)), ..limits() };
        let request = TtlRequest { ttl: Some(ttl(3600)), min_ttl: Some(ttl(1200)) };
        let error = grant(request, role, deadline_in(7200), NOW).unwrap_err().0;
        assert!(error.contains("backend issues at most 900 s"), "{error}");
    }

    #[test]
    fn passed_deadline_is_refused() {
        let error = grant(TtlRequest::default(), limits(), deadline_in(-5), NOW).unwrap_err().0;
        assert!(error.contains("has passed"), "{error}");
        assert!(grant(TtlRequest::default(), limits(), NOW, NOW).is_err());
    }
}

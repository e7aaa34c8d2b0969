//! The granted lifetime: never past the job's deadline, refused early when the job cannot
//! get what it needs. Pure arithmetic on an injected `now`, so every case is testable.

use time::OffsetDateTime;

use crate::types::{rfc3339, Ttl};

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
    /// The backend's own floor (e.g. AWS STS: 900 s).
    pub backend_min: Option<Ttl>,
    pub on_short_deadline: OnShortDeadline,
}

impl TtlLimits {
    pub fn with_backend_min(self, backend_min: Option<Ttl>) -> Self {
        Self { backend_min, ..self }
    }
}

/// The role's choice when the backend cannot issue anything short enough to end by the
/// job's deadline (`on_short_deadline` in a policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnShortDeadline {
    /// Refuse with `ttl_not_satisfiable`: no credential outlives its job.
    #[default]
    Refuse,
    /// Issue the backend's minimum anyway; the audit row records by how much it outlives the job.
    AllowOvershoot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantedTtl {
    pub ttl: Ttl,
    pub expires_at: OffsetDateTime,
    /// Seconds the credential lives past the job's deadline (`allow_overshoot` only).
    pub overshoot_seconds: Option<u32>,
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
    let mut granted = granted;
    let mut overshoot_seconds = None;
    if let Some(floor) = limits.backend_min.map(|ttl| i64::from(ttl.seconds())).filter(|floor| *floor > granted) {
        let ceiling = [Some(limits.max_ttl), limits.backend_max].into_iter().flatten().min().map(|ttl| i64::from(ttl.seconds()));
        if let Some(ceiling) = ceiling.filter(|ceiling| *ceiling < floor) {
            return Err(TtlNotSatisfiable(format!(
                "the role allows at most {ceiling} s, but the backend issues at least {floor} s: raise the role's max_ttl"
            )));
        }
        if floor > remaining {
            if limits.on_short_deadline == OnShortDeadline::Refuse {
                return Err(TtlNotSatisfiable(format!(
                    "the job deadline {deadline_text} is {remaining} s away, but the backend issues at least {floor} s: \
                     short by {} s (the role refuses to outlive the job: on_short_deadline = \"refuse\")",
                    floor - remaining
                )));
            }
            overshoot_seconds = Some((floor - remaining) as u32);
        }
        // Below the floor only because less was asked for: the floor still ends by the deadline
        // (or overshoots it knowingly, above), and the backend cannot issue less.
        granted = floor;
    }
    let ttl = Ttl::from_seconds(granted as u64).map_err(TtlNotSatisfiable)?;
    Ok(GrantedTtl { ttl, expires_at: now + ttl.as_duration(), overshoot_seconds })
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
        TtlLimits {
            default_ttl: ttl(900),
            max_ttl: ttl(3600),
            min_ttl: None,
            backend_max: None,
            backend_min: None,
            on_short_deadline: OnShortDeadline::Refuse,
        }
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

    fn sts_like() -> TtlLimits {
        TtlLimits { default_ttl: ttl(600), ..limits() }.with_backend_min(Some(ttl(900)))
    }

    #[test]
    fn backend_floor_raises_short_requests_that_still_end_by_the_deadline() {
        let granted = grant(TtlRequest { ttl: Some(ttl(60)), min_ttl: None }, sts_like(), deadline_in(3600), NOW).unwrap();
        assert_eq!((granted.ttl.seconds(), granted.overshoot_seconds), (900, None));
        let granted = grant(TtlRequest::default(), sts_like(), deadline_in(900), NOW).unwrap();
        assert_eq!((granted.ttl.seconds(), granted.expires_at), (900, deadline_in(900)));
    }

    #[test]
    fn backend_floor_past_the_deadline_is_refused_naming_both_numbers() {
        let error = grant(TtlRequest::default(), sts_like(), deadline_in(300), NOW).unwrap_err().0;
        assert!(error.contains("300 s away"), "{error}");
        assert!(error.contains("at least 900 s"), "{error}");
        assert!(error.contains("short by 600 s"), "{error}");
    }

    #[test]
    fn backend_floor_past_the_deadline_overshoots_when_the_role_allows_it() {
        let limits = TtlLimits { on_short_deadline: OnShortDeadline::AllowOvershoot, ..sts_like() };
        let granted = grant(TtlRequest::default(), limits, deadline_in(300), NOW).unwrap();
        assert_eq!(granted.ttl.seconds(), 900);
        assert_eq!(granted.expires_at, deadline_in(900));
        assert_eq!(granted.overshoot_seconds, Some(600));
        // A requested minimum is still a hard requirement.
        let request = TtlRequest { ttl: None, min_ttl: Some(ttl(600)) };
        assert!(grant(request, limits, deadline_in(300), NOW).is_err());
    }

    #[test]
    fn backend_floor_above_the_roles_ceiling_is_refused() {
        let limits = TtlLimits { max_ttl: ttl(600), ..sts_like() };
        let error = grant(TtlRequest::default(), limits, deadline_in(3600), NOW).unwrap_err().0;
        assert!(error.contains("at most 600 s") && error.contains("at least 900 s"), "{error}");
    }
}

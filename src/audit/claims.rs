//! Single-use claims on job tokens (`token_use_counts`), with the freeze check in the same
//! statement.
//!
//! An exchange claims its use before minting, so two replicas racing on one token cannot both
//! mint, and an exchange that starts after a freeze was acknowledged sees the freeze. With
//! group commit the claims of concurrent exchanges are batched like their audit rows: one
//! statement claims the whole batch and answers each exchange claimed, exhausted or frozen.
//!
//! A token's uses are one counter row, taken by an upsert: concurrent claims on one token
//! (two replicas, or two batches of one) queue on that row's lock, and each counts on from the
//! count the one before it committed, so no claim ever has to be tried again.

use std::sync::LazyLock;

use sqlx::Row;
use time::OffsetDateTime;

use super::group_commit::Batch;
use super::revocations::{active_freeze_on, freeze_covers, freeze_from_row};
use super::{record, AuditError, AuditEvent, Freeze, PgAudit};

/// One use of a job token for a role, to claim before minting ([`super::Audit::claim_token_use`]).
#[derive(Debug, Clone)]
pub struct UseClaim {
    pub issuer: String,
    pub jti: String,
    pub role: String,
    pub max_uses: u32,
    pub token_expires_at: OffsetDateTime,
    /// The project identities of the request (`project_identities`): the claim is refused while
    /// a freeze covers the role or one of them, checked in the same statement. None: no check
    /// (a second token of a request whose first claim checked it).
    pub unless_frozen_for: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub enum TokenUse {
    /// This exchange is use number N of the token for the role.
    Claimed(u32),
    /// Every permitted use is taken.
    Exhausted,
    /// A freeze covers the request; nothing was claimed.
    Frozen(Freeze),
}

/// Takes the token's next use if one is left and no freeze covers the request, and answers its
/// use number. No row back means a freeze or every use taken; follow-up queries tell which.
static CLAIM_ONE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "insert into token_use_counts as t (issuer, jti, role, uses, max_uses, last_claimed, token_expires_at)
         select $3, $4, $1, 1, $5, 1, $6
         where not ($7 and exists (select from freezes where {}))
         on conflict (issuer, jti, role) do update
            set uses = t.uses + 1, max_uses = excluded.max_uses, last_claimed = 1
            where t.uses < excluded.max_uses
         returning uses",
        freeze_covers("$1", "$2")
    )
});

/// The claims of a batch, in one statement. `request` is the batch (`ord` its position, 1-based)
/// with the first freeze covering each claim that asks for the check; `ranked` numbers the
/// unfrozen claims on each token (`nth`) and counts them (`wanted`); `counted` adds each
/// token's claims to its counter, up to its uses, in key order (so two replicas' batches lock
/// counters in the same order), and says how many it took (`last_claimed`); `claimed` gives
/// each claim taken its use number. Each claim comes back ([`ANSWERS`]) with its use number,
/// or its freeze, or neither (every use taken). The project identities arrive flattened: `$7`
/// says which claim each identity in `$8` is of.
static CLAIMING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "request as (
             select r.ord, r.issuer, r.jti, r.role, r.max_uses, r.token_expires_at,
                    f.scope, f.value, f.frozen_by, f.frozen_at, f.until
             from unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::timestamptz[], $6::bool[])
                  with ordinality as r (issuer, jti, role, max_uses, token_expires_at, check_freeze, ord)
             left join lateral (
                 select scope, value, frozen_by, frozen_at, until from freezes
                 where r.check_freeze and {}
                 order by frozen_at limit 1
             ) f on true
         ),
         ranked as (
             select ord, issuer, jti, role, max_uses, token_expires_at,
                    row_number() over token as nth, count(*) over token as wanted
             from request
             where scope is null
             window token as (partition by issuer, jti, role order by ord rows between unbounded preceding and unbounded following)
         ),
         counted as (
             insert into token_use_counts as t (issuer, jti, role, uses, max_uses, last_claimed, token_expires_at)
             select issuer, jti, role, least(wanted, max_uses), max_uses, least(wanted, max_uses), token_expires_at
             from ranked
             where nth = 1
             order by issuer, jti, role
             on conflict (issuer, jti, role) do update
                set uses = least(t.uses + excluded.uses, excluded.max_uses),
                    max_uses = excluded.max_uses,
                    last_claimed = least(t.uses + excluded.uses, excluded.max_uses) - t.uses
                where t.uses < excluded.max_uses
             returning jti, issuer, role, uses, last_claimed
         ),
         claimed as (
             select k.ord, c.uses - c.last_claimed + k.nth as use_number
             from ranked k
             join counted c on c.jti = k.jti and c.issuer = k.issuer and c.role = k.role
             where k.nth <= c.last_claimed
         )",
        freeze_covers(
            "r.role",
            "array(select i.identity from unnest($7::int8[], $8::text[]) as i (ord, identity) where i.ord = r.ord)"
        )
    )
});

const ANSWERS: &str = "select r.ord, c.use_number as claimed, r.scope, r.value, r.frozen_by, r.frozen_at, r.until
         from request r
         left join claimed c on c.ord = r.ord";

static CLAIM_BATCH: LazyLock<String> = LazyLock::new(|| format!("with {}\n{ANSWERS}", *CLAIMING));

/// The claims of a batch and the issued rows of those it wins, in one statement and one
/// durable commit: a row is written exactly when its claim is taken, and neither without the
/// other. The rows' columns are bound after the claims' eight parameters.
static CLAIM_BATCH_AND_RECORD: LazyLock<String> = LazyLock::new(|| {
    let won = "e.ord in (select ord from claimed)";
    format!("with {},\n recorded as ({})\n{ANSWERS}", *CLAIMING, super::record::insert_sql(9, Some(won)))
});

/// [`CLAIM_ONE`] with its issued row, bound after the claim's seven parameters and written
/// only if the claim takes a use: a lone exchange's statement, which Postgres runs in less
/// time than the batch's for one claim.
static CLAIM_ONE_AND_RECORD: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with claimed as ({}),\n recorded as ({})\n select uses from claimed",
        *CLAIM_ONE,
        super::record::insert_one_sql(8, Some("exists (select from claimed)"))
    )
});

impl PgAudit {
    /// One claim, one statement (`audit_group_commit = false`, and a batch of one).
    pub async fn claim_token_use(&self, claim: &UseClaim) -> Result<TokenUse, AuditError> {
        self.claim_one(claim, None).await
    }

    /// One claim and the issued row that stands only if it is taken, one statement and one
    /// durable commit (a batch of one).
    pub async fn claim_token_use_and_record(&self, claim: &UseClaim, row: &AuditEvent) -> Result<TokenUse, AuditError> {
        self.claim_one(claim, Some(row)).await
    }

    // Debug level, as the batch below: a claim runs on every exchange.
    #[tracing::instrument(level = "debug", skip_all, fields(issuer = claim.issuer, role = claim.role, with_row = row.is_some()))]
    async fn claim_one(&self, claim: &UseClaim, row: Option<&AuditEvent>) -> Result<TokenUse, AuditError> {
        let identities = claim.unless_frozen_for.as_deref().unwrap_or_default();
        // Claims alone commit without waiting for the disk (see `PgAudit`); with their rows, durably.
        let (statement, connections) = match row {
            None => (CLAIM_ONE.as_str(), self.claiming()),
            Some(_) => (CLAIM_ONE_AND_RECORD.as_str(), self.writing()),
        };
        loop {
            // The follow-up queries run on the same connection: the pool may have none to spare.
            let mut held = connections.take().await?;
            let query = sqlx::query(statement)
                .bind(&claim.role)
                .bind(identities)
                .bind(&claim.issuer)
                .bind(&claim.jti)
                .bind(claim.max_uses as i32)
                .bind(claim.token_expires_at)
                .bind(claim.unless_frozen_for.is_some());
            let query = match row {
                Some(row) => record::bind_row(query, row),
                None => query,
            };
            let claimed: Option<i32> = query.fetch_optional(held.connection()).await?.map(|row| row.try_get(0)).transpose()?;
            let answer = match claimed {
                Some(use_number) => Some(TokenUse::Claimed(use_number as u32)),
                None => self.why_not_claimed(held.connection(), claim, identities).await?,
            };
            held.keep();
            if let Some(answer) = answer {
                return Ok(answer);
            }
        }
    }

    /// Why a claim took nothing: a freeze, or every use taken. None: neither any more (the
    /// freeze that refused it was lifted since), and the claim may try again.
    async fn why_not_claimed(&self, connection: &mut sqlx::PgConnection, claim: &UseClaim, identities: &[String]) -> Result<Option<TokenUse>, AuditError> {
        if claim.unless_frozen_for.is_some() {
            if let Some(freeze) = active_freeze_on(&mut *connection, &claim.role, identities).await? {
                return Ok(Some(TokenUse::Frozen(freeze)));
            }
        }
        let used: Option<i32> = sqlx::query_scalar("select uses from token_use_counts where issuer = $1 and jti = $2 and role = $3")
            .bind(&claim.issuer)
            .bind(&claim.jti)
            .bind(&claim.role)
            .fetch_optional(&mut *connection)
            .await?;
        Ok((used.unwrap_or(0) >= claim.max_uses as i32).then_some(TokenUse::Exhausted))
    }

    /// Many claims, one statement; the answers in the claims' order.
    pub async fn claim_token_uses(&self, claims: &[UseClaim]) -> Result<Vec<TokenUse>, AuditError> {
        self.claim_batch(&claims.iter().collect::<Vec<_>>(), None).await
    }

    /// Many claims and the issued rows of those won, one statement and one durable commit: a
    /// row is written exactly when its claim is taken. The answers in the claims' order.
    pub async fn claim_token_uses_and_record(&self, claims: &[&UseClaim], rows: &[&AuditEvent]) -> Result<Vec<TokenUse>, AuditError> {
        self.claim_batch(claims, Some(rows)).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(claims = claims.len(), with_rows = rows.is_some()))]
    async fn claim_batch(&self, claims: &[&UseClaim], rows: Option<&[&AuditEvent]>) -> Result<Vec<TokenUse>, AuditError> {
        let mut identity_of = Vec::new();
        let mut identities = Vec::new();
        for (ord, claim) in (1i64..).zip(claims) {
            for identity in claim.unless_frozen_for.iter().flatten() {
                identity_of.push(ord);
                identities.push(identity.as_str());
            }
        }
        // Claims alone commit without waiting for the disk (see `PgAudit`); with their rows, durably.
        let (statement, connections) = match rows {
            None => (CLAIM_BATCH.as_str(), self.claiming()),
            Some(_) => (CLAIM_BATCH_AND_RECORD.as_str(), self.writing()),
        };
        let mut held = connections.take().await?;
        let query = sqlx::query(statement)
            .bind(claims.iter().map(|claim| claim.issuer.as_str()).collect::<Vec<_>>())
            .bind(claims.iter().map(|claim| claim.jti.as_str()).collect::<Vec<_>>())
            .bind(claims.iter().map(|claim| claim.role.as_str()).collect::<Vec<_>>())
            .bind(claims.iter().map(|claim| claim.max_uses as i32).collect::<Vec<_>>())
            .bind(claims.iter().map(|claim| claim.token_expires_at).collect::<Vec<_>>())
            .bind(claims.iter().map(|claim| claim.unless_frozen_for.is_some()).collect::<Vec<_>>())
            .bind(identity_of)
            .bind(identities);
        let query = match rows {
            Some(rows) => record::bind_rows(query, rows.iter().copied()),
            None => query,
        };
        let answered = query.fetch_all(held.connection()).await?;
        held.keep();
        let mut answers = vec![TokenUse::Exhausted; claims.len()];
        for row in &answered {
            let ord: i64 = row.try_get("ord")?;
            if row.try_get::<Option<String>, _>("scope")?.is_some() {
                answers[(ord - 1) as usize] = TokenUse::Frozen(freeze_from_row(row)?);
            } else if let Some(use_number) = row.try_get::<Option<i64>, _>("claimed")? {
                answers[(ord - 1) as usize] = TokenUse::Claimed(use_number as u32);
            }
        }
        Ok(answers)
    }
}

/// Token-use claims as group-commit work: one [`PgAudit::claim_token_uses`] per batch.
pub(super) struct TokenClaims(pub PgAudit);

impl Batch for TokenClaims {
    type Job = UseClaim;
    type Answer = TokenUse;

    async fn run(&self, claims: &[UseClaim]) -> Result<Vec<TokenUse>, AuditError> {
        match claims {
            // The one-claim statement is cheaper for Postgres to plan and run than the batch's.
            [claim] => Ok(vec![self.0.claim_token_use(claim).await?]),
            _ => self.0.claim_token_uses(claims).await,
        }
    }
}

/// An issued row that stands only if its token use is claimed ([`super::Audit::claim_and_record`]).
pub struct ClaimedRow {
    pub claim: UseClaim,
    pub row: AuditEvent,
}

/// Claims with their issued rows as group-commit work: one
/// [`PgAudit::claim_token_uses_and_record`] per batch.
pub(super) struct ClaimedRows(pub PgAudit);

impl Batch for ClaimedRows {
    type Job = ClaimedRow;
    type Answer = TokenUse;

    async fn run(&self, jobs: &[ClaimedRow]) -> Result<Vec<TokenUse>, AuditError> {
        if let [job] = jobs {
            return Ok(vec![self.0.claim_token_use_and_record(&job.claim, &job.row).await?]);
        }
        let claims: Vec<&UseClaim> = jobs.iter().map(|job| &job.claim).collect();
        let rows: Vec<&AuditEvent> = jobs.iter().map(|job| &job.row).collect();
        self.0.claim_token_uses_and_record(&claims, &rows).await
    }
}

//! Single-use claims on job tokens (`token_uses`), with the freeze check in the same statement.
//!
//! An exchange claims its use before minting, so two replicas racing on one token cannot both
//! mint, and an exchange that starts after a freeze was acknowledged sees the freeze. With
//! group commit the claims of concurrent exchanges are batched like their audit rows: one
//! statement claims the whole batch and answers each exchange claimed, exhausted or frozen.

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

/// Takes the next use number if any is left and no freeze covers the request. No row back
/// means a freeze, every use taken, or a concurrent exchange that took the same number (the
/// primary key decides); the rare follow-up queries tell which, and only a lost race tries again.
static CLAIM_ONE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "insert into token_uses (issuer, jti, role, use_number, token_expires_at)
         select $3, $4, $1, coalesce(max(use_number), 0) + 1, $6
         from token_uses
         where issuer = $3 and jti = $4 and role = $1
         having coalesce(max(use_number), 0) < $5
            and not ($7 and exists (select from freezes where {}))
         on conflict do nothing
         returning use_number",
        freeze_covers("$1", "$2")
    )
});

/// The claims of a batch, in one statement. `request` is the batch (`ord` its position, 1-based)
/// with the first freeze covering each claim that asks for the check; `numbered` gives each
/// unfrozen claim the next free use number of its token, counting the claims on the same token
/// earlier in the batch; `inserted` takes those within the token's uses, in key order (so two
/// replicas' batches lock keys in the same order), skipping numbers another transaction took.
/// Each claim comes back ([`ANSWERS`]) with its use number, whether it had a use left, or its
/// freeze. The project identities arrive flattened: `$7` says which claim each identity in
/// `$8` is of.
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
         numbered as (
             select r.ord, r.issuer, r.jti, r.role, r.max_uses, r.token_expires_at,
                    coalesce((select max(t.use_number) from token_uses t
                              where t.issuer = r.issuer and t.jti = r.jti and t.role = r.role), 0)
                    + row_number() over (partition by r.issuer, r.jti, r.role order by r.ord) as use_number
             from request r
             where r.scope is null
         ),
         inserted as (
             insert into token_uses (issuer, jti, role, use_number, token_expires_at)
             select issuer, jti, role, use_number, token_expires_at from numbered
             where use_number <= max_uses
             order by issuer, jti, role, use_number
             on conflict do nothing
             returning issuer, jti, role, use_number
         )",
        freeze_covers(
            "r.role",
            "array(select i.identity from unnest($7::int8[], $8::text[]) as i (ord, identity) where i.ord = r.ord)"
        )
    )
});

const ANSWERS: &str = "select r.ord, i.use_number as claimed, coalesce(n.use_number <= n.max_uses, false) as had_room,
                r.scope, r.value, r.frozen_by, r.frozen_at, r.until
         from request r
         left join numbered n on n.ord = r.ord
         left join inserted i on (i.issuer, i.jti, i.role, i.use_number) = (n.issuer, n.jti, n.role, n.use_number)";

static CLAIM_BATCH: LazyLock<String> = LazyLock::new(|| format!("with {}\n{ANSWERS}", *CLAIMING));

/// The claims of a batch and the issued rows of those it wins, in one statement and one
/// durable commit: a row is written exactly when its claim is taken, and neither without the
/// other. The rows' columns are bound after the claims' eight parameters.
static CLAIM_BATCH_AND_RECORD: LazyLock<String> = LazyLock::new(|| {
    let won = "select n.ord from numbered n
               join inserted i on (i.issuer, i.jti, i.role, i.use_number) = (n.issuer, n.jti, n.role, n.use_number)";
    format!("with {},\n recorded as ({})\n{ANSWERS}", *CLAIMING, super::record::insert_sql(9, Some(won)))
});

impl PgAudit {
    /// One claim, one statement (`audit_group_commit = false`, and a batch's lost races).
    // Debug level, as the batch below: a claim runs on every exchange.
    #[tracing::instrument(level = "debug", skip_all, fields(issuer = claim.issuer, role = claim.role))]
    pub async fn claim_token_use(&self, claim: &UseClaim) -> Result<TokenUse, AuditError> {
        let identities = claim.unless_frozen_for.as_deref().unwrap_or_default();
        loop {
            // The follow-up queries run on the same connection: the pool may have none to spare.
            let mut held = self.claiming().take().await?;
            let claimed: Option<i32> = sqlx::query_scalar(&CLAIM_ONE)
                .bind(&claim.role)
                .bind(identities)
                .bind(&claim.issuer)
                .bind(&claim.jti)
                .bind(claim.max_uses as i32)
                .bind(claim.token_expires_at)
                .bind(claim.unless_frozen_for.is_some())
                .fetch_optional(held.connection())
                .await?;
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

    /// Why a claim took nothing: a freeze, or every use taken. None: it lost a race for its
    /// use number and may try again.
    async fn why_not_claimed(&self, connection: &mut sqlx::PgConnection, claim: &UseClaim, identities: &[String]) -> Result<Option<TokenUse>, AuditError> {
        if claim.unless_frozen_for.is_some() {
            if let Some(freeze) = active_freeze_on(&mut *connection, &claim.role, identities).await? {
                return Ok(Some(TokenUse::Frozen(freeze)));
            }
        }
        let used: i64 = sqlx::query_scalar("select count(*) from token_uses where issuer = $1 and jti = $2 and role = $3")
            .bind(&claim.issuer)
            .bind(&claim.jti)
            .bind(&claim.role)
            .fetch_one(&mut *connection)
            .await?;
        Ok((used >= i64::from(claim.max_uses)).then_some(TokenUse::Exhausted))
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

    /// A claim that lost a race to another transaction on the same use number tries again
    /// alone, and its row (if any) follows in a statement of its own.
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
        let mut answers: Vec<Option<TokenUse>> = vec![None; claims.len()];
        for row in &answered {
            let ord: i64 = row.try_get("ord")?;
            let answer = if row.try_get::<Option<String>, _>("scope")?.is_some() {
                Some(TokenUse::Frozen(freeze_from_row(row)?))
            } else if let Some(use_number) = row.try_get::<Option<i32>, _>("claimed")? {
                Some(TokenUse::Claimed(use_number as u32))
            } else if row.try_get::<bool, _>("had_room")? {
                None
            } else {
                Some(TokenUse::Exhausted)
            };
            answers[(ord - 1) as usize] = answer;
        }
        let mut outcome = Vec::with_capacity(claims.len());
        for (position, (answer, claim)) in answers.into_iter().zip(claims).enumerate() {
            outcome.push(match answer {
                Some(answer) => answer,
                None => {
                    let answer = self.claim_token_use(claim).await?;
                    if let (TokenUse::Claimed(_), Some(rows)) = (&answer, rows) {
                        self.write(rows[position]).await?;
                    }
                    answer
                }
            });
        }
        Ok(outcome)
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
        let claims: Vec<&UseClaim> = jobs.iter().map(|job| &job.claim).collect();
        let rows: Vec<&AuditEvent> = jobs.iter().map(|job| &job.row).collect();
        self.0.claim_token_uses_and_record(&claims, &rows).await
    }
}

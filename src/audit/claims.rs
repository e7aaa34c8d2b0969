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
use super::revocations::{freeze_from_row, freeze_covers};
use super::{AuditError, Freeze, PgAudit};

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
/// Each claim comes back with its use number, whether it had a use left, or its freeze. The
/// project identities arrive flattened: `$7` says which claim each identity in `$8` is of.
static CLAIM_BATCH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with request as (
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
         )
         select r.ord, i.use_number as claimed, coalesce(n.use_number <= n.max_uses, false) as had_room,
                r.scope, r.value, r.frozen_by, r.frozen_at, r.until
         from request r
         left join numbered n on n.ord = r.ord
         left join inserted i on (i.issuer, i.jti, i.role, i.use_number) = (n.issuer, n.jti, n.role, n.use_number)",
        freeze_covers(
            "r.role",
            "array(select i.identity from unnest($7::int8[], $8::text[]) as i (ord, identity) where i.ord = r.ord)"
        )
    )
});

impl PgAudit {
    /// One claim, one statement (`audit_group_commit = false`, and a batch's lost races).
    // Debug level, as the batch below: a claim runs on every exchange.
    #[tracing::instrument(level = "debug", skip_all, fields(issuer = claim.issuer, role = claim.role))]
    pub async fn claim_token_use(&self, claim: &UseClaim) -> Result<TokenUse, AuditError> {
        let identities = claim.unless_frozen_for.as_deref().unwrap_or_default();
        loop {
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
            held.keep();
            if let Some(use_number) = claimed {
                return Ok(TokenUse::Claimed(use_number as u32));
            }
            if claim.unless_frozen_for.is_some() {
                if let Some(freeze) = self.active_freeze(&claim.role, identities).await? {
                    return Ok(TokenUse::Frozen(freeze));
                }
            }
            let used: i64 = sqlx::query_scalar("select count(*) from token_uses where issuer = $1 and jti = $2 and role = $3")
                .bind(&claim.issuer)
                .bind(&claim.jti)
                .bind(&claim.role)
                .fetch_one(self.claims_pool())
                .await?;
            if used >= i64::from(claim.max_uses) {
                return Ok(TokenUse::Exhausted);
            }
        }
    }

    /// Many claims, one statement; the answers in the claims' order. A claim that lost a race
    /// to another transaction on the same use number tries again alone.
    #[tracing::instrument(level = "debug", skip_all, fields(claims = claims.len()))]
    pub async fn claim_token_uses(&self, claims: &[UseClaim]) -> Result<Vec<TokenUse>, AuditError> {
        let mut identity_of = Vec::new();
        let mut identities = Vec::new();
        for (ord, claim) in (1i64..).zip(claims) {
            for identity in claim.unless_frozen_for.iter().flatten() {
                identity_of.push(ord);
                identities.push(identity.as_str());
            }
        }
        let mut held = self.claiming().take().await?;
        let rows = sqlx::query(&CLAIM_BATCH)
            .bind(claims.iter().map(|claim| claim.issuer.as_str()).collect::<Vec<_>>())
            .bind(claims.iter().map(|claim| claim.jti.as_str()).collect::<Vec<_>>())
            .bind(claims.iter().map(|claim| claim.role.as_str()).collect::<Vec<_>>())
            .bind(claims.iter().map(|claim| claim.max_uses as i32).collect::<Vec<_>>())
            .bind(claims.iter().map(|claim| claim.token_expires_at).collect::<Vec<_>>())
            .bind(claims.iter().map(|claim| claim.unless_frozen_for.is_some()).collect::<Vec<_>>())
            .bind(identity_of)
            .bind(identities)
            .fetch_all(held.connection())
            .await?;
        held.keep();
        let mut answers: Vec<Option<TokenUse>> = vec![None; claims.len()];
        for row in &rows {
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
        for (answer, claim) in answers.into_iter().zip(claims) {
            outcome.push(match answer {
                Some(answer) => answer,
                None => self.claim_token_use(claim).await?,
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

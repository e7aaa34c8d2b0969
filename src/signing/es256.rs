//! ES256 signatures whose nonces are made ahead of time, off the request's path.
//!
//! An ECDSA signature is `(r, s)` with `r` the x-coordinate of `k·G` (mod n) and
//! `s = k⁻¹·(z + r·d)`, where `z` is the message's SHA-256 and `d` the private key. Nearly all
//! of its cost is in `k·G` and `k⁻¹`, and neither depends on the message or the key. So a
//! thread of its own prepares `(r, k⁻¹)` pairs ([`Presignature`]) while a core is idle, and an
//! exchange only finishes one: a hash, two multiplications and an addition. On the development
//! machine (`cargo bench --bench es256_sign`) aws-lc-rs signs in 15.8 µs; preparing takes
//! 9.6 µs (one inversion per batch of 64), finishing 0.4 µs. When none is ready (the machine
//! has had no idle core for as long as the pool lasts), the signature is made whole, as before.
//!
//! What keeps this as safe as the usual way:
//! - `k` is a fresh key from aws-lc's own EC key generation: uniform in `[1, n)` from its
//!   DRBG, and `k·G` by its constant-time fixed-base multiplication. The finishing arithmetic
//!   is `p256`'s, constant-time as well. aws-lc's own signatures also mix the key and the
//!   message into `k`, against a failing random source; a `k` made before the message cannot,
//!   so it is exactly as good as that DRBG, which every key aws-lc generates relies on too.
//! - A presignature is used once: it is moved out of the pool, is neither `Clone` nor `Copy`,
//!   and is wiped when dropped, as are the buffers it passed through. The pool lies in the
//!   broker's memory beside the keys themselves.
//! - Every signature is `r‖s` as RFC 7518 section 3.4 asks, checked by aws-lc-rs in the tests
//!   below and by ring and jsonwebtoken in `signing`'s.

use std::sync::{Condvar, LazyLock, Mutex};

use aws_lc_rs::agreement::{self, ECDH_P256};
use aws_lc_rs::encoding::{AsBigEndian, EcPrivateKeyBin};
use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::zeroize::Zeroize;
use p256::elliptic_curve::{Field, PrimeField};
use p256::{FieldBytes, NonZeroScalar, Scalar, U256};

/// `r` and `k⁻¹` of one future signature.
pub struct Presignature {
    r: Scalar,
    k_inverse: Scalar,
}

impl Zeroize for Presignature {
    fn zeroize(&mut self) {
        self.r.zeroize();
        self.k_inverse.zeroize();
    }
}

impl Drop for Presignature {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl Presignature {
    /// The signature of `message` by `key`, `r‖s` big-endian. None if `s` is zero, which a
    /// random `k` makes with probability 2⁻²⁵⁶ (the caller then signs the usual way).
    pub fn finish(self, key: &NonZeroScalar, message: &[u8]) -> Option<[u8; 64]> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
        // The digest read as an integer and reduced mod n: P-256's n has as many bits as SHA-256.
        let z = reduced(digest.as_ref())?;
        let s = self.k_inverse * (z + self.r * key.as_ref());
        if bool::from(s.is_zero()) {
            return None;
        }
        let mut signature = [0; 64];
        signature[..32].copy_from_slice(&self.r.to_repr());
        signature[32..].copy_from_slice(&s.to_repr());
        Some(signature)
    }
}

/// `count` presignatures (fewer only if aws-lc fails, which it does not): one aws-lc key each
/// for `k` and `k·G`, and their `k⁻¹` by one inversion for the lot (Montgomery's trick).
pub fn prepare(count: usize) -> Vec<Presignature> {
    let mut nonces = Vec::with_capacity(count);
    let mut rs = Vec::with_capacity(count);
    for _ in 0..count {
        let Some((k, r)) = nonce() else { continue };
        nonces.push(k);
        rs.push(r);
    }
    // prefix[i] = k₀·…·kᵢ₋₁; one inversion of the whole product, then each k⁻¹ from it.
    let mut prefix = Vec::with_capacity(nonces.len());
    let mut product = Scalar::ONE;
    for k in &nonces {
        prefix.push(product);
        product *= k;
    }
    let mut inverse = product.invert().expect("a product of non-zero scalars mod a prime is not zero");
    let mut presignatures = Vec::with_capacity(nonces.len());
    for ((k, before), r) in nonces.iter().zip(&prefix).zip(rs).rev() {
        presignatures.push(Presignature { r, k_inverse: inverse * before });
        inverse *= k;
    }
    for mut secret in [nonces, prefix] {
        secret.zeroize();
    }
    inverse.zeroize();
    product.zeroize();
    presignatures
}

/// A fresh `k` and its `r`; None if aws-lc fails, or in the 2⁻²²⁴ case of `r = 0`.
fn nonce() -> Option<(Scalar, Scalar)> {
    let key = agreement::PrivateKey::generate(&ECDH_P256).ok()?;
    let point = key.compute_public_key().ok()?;
    // Uncompressed SEC1: 0x04, then x and y, 32 bytes each.
    let x = point.as_ref().get(1..33)?;
    let r = reduced(x)?;
    let k_bytes: EcPrivateKeyBin = key.as_be_bytes().ok()?;
    let k = reduced(k_bytes.as_ref())?;
    (!bool::from(r.is_zero()) && !bool::from(k.is_zero())).then_some((k, r))
}

/// 32 big-endian bytes as an integer mod n (aws-lc's `k` is already below n, so it stays itself).
fn reduced(bytes: &[u8]) -> Option<Scalar> {
    let mut bytes = FieldBytes::from(<[u8; 32]>::try_from(bytes).ok()?);
    let scalar = <Scalar as Reduce<U256>>::reduce_bytes(&bytes);
    bytes.zeroize();
    Some(scalar)
}

/// Presignatures ready to use, refilled by their own thread.
pub(super) struct Pool {
    ready: Mutex<Vec<Presignature>>,
    running_low: Condvar,
}

/// Enough for a tenth of a second at 10,000 signatures a second, refilled from half; 64 bytes each.
const POOL_SIZE: usize = 1024;
const REFILL_BELOW: usize = POOL_SIZE / 2;
/// One inversion per batch: past a few dozen, a bigger batch saves nothing measurable.
const BATCH: usize = 64;

/// One pool for the process: a presignature serves any P-256 key.
pub(super) static POOL: LazyLock<Pool> = LazyLock::new(|| {
    let spawned = std::thread::Builder::new().name("credbroker-es256-nonces".into()).spawn(|| {
        lowest_priority();
        POOL.refill_forever();
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no thread to prepare ES256 nonces: every ES256 signature is made whole");
    }
    // Room for a last batch past the size, so the pool never moves (and never leaves a copy behind).
    Pool { ready: Mutex::new(Vec::with_capacity(POOL_SIZE + BATCH)), running_low: Condvar::new() }
});

impl Pool {
    /// A presignature, if one is ready.
    pub(super) fn take(&self) -> Option<Presignature> {
        let mut ready = self.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let taken = ready.pop();
        if taken.is_some() {
            // The slot it was moved out of still holds its bytes.
            ready.spare_capacity_mut()[..1].zeroize();
        }
        // Wakes the thread once per drain, as the pool crosses the mark: a wake-up is a system call.
        if ready.len() == REFILL_BELOW - 1 {
            self.running_low.notify_one();
        }
        taken
    }

    fn refill_forever(&self) {
        loop {
            let mut ready = self.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            while ready.len() >= REFILL_BELOW {
                ready = self.running_low.wait(ready).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            drop(ready);
            loop {
                let mut batch = prepare(BATCH);
                if batch.is_empty() {
                    // aws-lc makes no keys: stop rather than spin; every signature is then made whole.
                    tracing::warn!("cannot prepare ES256 nonces: every ES256 signature is made whole");
                    return;
                }
                let mut ready = self.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                ready.extend(batch.drain(..));
                // What was moved out still lies in the batch's buffer.
                batch.zeroize();
                if ready.len() >= POOL_SIZE {
                    break;
                }
            }
        }
    }
}

/// The refilling thread runs only on a core nothing else wants (Linux's `SCHED_IDLE`): it turns
/// a busy machine's idle moments into signatures, and never delays a request or Postgres.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    {
        let parameters = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system call on the calling thread (pid 0) with a valid parameter block.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &parameters) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "the ES256 nonce thread keeps its priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
    use p256::elliptic_curve::sec1::ToEncodedPoint;

    #[test]
    fn finished_presignatures_verify_and_each_nonce_is_new() {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let public = secret.public_key().to_encoded_point(false);
        let verifier = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public.as_bytes());
        let presignatures = prepare(200);
        assert_eq!(presignatures.len(), 200);
        let mut rs = std::collections::HashSet::new();
        for (n, presignature) in presignatures.into_iter().enumerate() {
            let message = format!("message {n}").repeat(n % 50 + 1);
            let signature = presignature.finish(&secret.to_nonzero_scalar(), message.as_bytes()).unwrap();
            verifier.verify(message.as_bytes(), &signature).unwrap();
            assert!(verifier.verify(b"another message", &signature).is_err());
            assert!(rs.insert(signature[..32].to_vec()), "a nonce came twice");
        }
    }

    #[test]
    fn r_is_the_x_of_k_times_g_and_k_inverse_inverts_k() {
        // One nonce checked with p256's own (slow, independent) point arithmetic.
        let key = agreement::PrivateKey::generate(&ECDH_P256).unwrap();
        let k_bytes: EcPrivateKeyBin = key.as_be_bytes().unwrap();
        let k = reduced(k_bytes.as_ref()).unwrap();
        let point = (p256::ProjectivePoint::GENERATOR * k).to_affine().to_encoded_point(false);
        assert_eq!(key.compute_public_key().unwrap().as_ref(), point.as_bytes());
        let mut batch = prepare(3);
        for presignature in &batch {
            assert!(!bool::from(presignature.r.is_zero()));
        }
        // Batch inversion: k⁻¹ for each, so (k⁻¹)⁻¹·G has x = r.
        for presignature in batch.drain(..) {
            let k = presignature.k_inverse.invert().unwrap();
            let x = (p256::ProjectivePoint::GENERATOR * k).to_affine().to_encoded_point(false);
            assert_eq!(reduced(x.x().unwrap()).unwrap(), presignature.r);
        }
    }

    #[test]
    fn the_pool_hands_out_each_presignature_once_and_refills() {
        let mut seen = std::collections::HashSet::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        // More than the pool holds: the thread must refill it while we take.
        while seen.len() < POOL_SIZE * 2 {
            assert!(std::time::Instant::now() < deadline, "the pool did not refill");
            match POOL.take() {
                Some(presignature) => assert!(seen.insert(presignature.r.to_repr()), "a presignature came twice"),
                None => std::thread::yield_now(),
            }
        }
    }
}

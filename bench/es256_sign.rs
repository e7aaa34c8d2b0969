//! ES256 signing of a broker-signed token (the Kafka OAUTHBEARER token of `bench/issuance`'s
//! role), the broker's other large cost per exchange beside the job token's RS256 check: ring,
//! as `src/signing.rs` signed before the eleventh session, against aws-lc-rs, and the two
//! halves of a signature from a nonce prepared ahead (`src/signing/es256.rs`, twenty-first
//! session): preparing one, in a batch of 64 as the broker's thread does, and finishing it on
//! the request's path. All are given the same P-256 key and message; each signature is checked
//! by another library once, so all are known to compute the same thing. Alternated in rounds,
//! medians and their ratios from one run (bench/README.md):
//!
//!   cargo bench --bench es256_sign
#[path = "rounds.rs"]
mod rounds;

use credbroker::signing::es256;
use p256::elliptic_curve::sec1::ToEncodedPoint;

use rounds::{median, per_call, ROUNDS};

fn main() {
    let secret = p256::SecretKey::random(&mut rand::thread_rng());
    let public = secret.public_key().to_encoded_point(false);
    let (private, public) = (secret.to_bytes(), public.as_bytes().to_vec());
    let ring_key = ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &private,
        &public,
        &ring::rand::SystemRandom::new(),
    )
    .expect("ring takes the key");
    let aws_lc_key = aws_lc_rs::signature::EcdsaKeyPair::from_private_key_and_public_key(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &private,
        &public,
    )
    .expect("aws-lc-rs takes the key");
    // A Kafka token's signing input is about 400 bytes.
    let message = vec![b'x'; 400];
    let (ring_random, aws_lc_random) = (ring::rand::SystemRandom::new(), aws_lc_rs::rand::SystemRandom::new());

    let by_ring = ring_key.sign(&ring_random, &message).expect("ring signs");
    let by_aws_lc = aws_lc_key.sign(&aws_lc_random, &message).expect("aws-lc-rs signs");
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &public)
        .verify(&message, by_aws_lc.as_ref())
        .expect("ring verifies aws-lc-rs's signature");
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED, &public)
        .verify(&message, by_ring.as_ref())
        .expect("aws-lc-rs verifies ring's signature");
    let scalar = secret.to_nonzero_scalar();
    let finished = es256::prepare(1).pop().expect("a presignature").finish(&scalar, &message).expect("a signature");
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &public)
        .verify(&message, &finished)
        .expect("ring verifies a signature finished from a prepared nonce");

    const BATCH: usize = 64;
    let (mut ring_rounds, mut aws_lc_rounds, mut prepare_rounds, mut finish_rounds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let mut ring = || ring_rounds.push(per_call(|| _ = std::hint::black_box(ring_key.sign(&ring_random, &message).expect("ring signs"))));
        let mut aws_lc =
            || aws_lc_rounds.push(per_call(|| _ = std::hint::black_box(aws_lc_key.sign(&aws_lc_random, &message).expect("aws-lc-rs signs"))));
        let mut prepared = Vec::new();
        let mut prepare = || prepare_rounds.push(per_call(|| prepared.extend(es256::prepare(BATCH))) / BATCH as f64);
        // Each library goes first in every other round, so neither always meets a warmer cache.
        if round % 2 == 0 {
            ring();
            aws_lc();
            prepare();
        } else {
            prepare();
            aws_lc();
            ring();
        }
        // One finish per presignature just made: each is used once.
        let mut presignatures = prepared.into_iter();
        finish_rounds.push(per_call(|| {
            let presignature = presignatures.next().expect("one per call");
            _ = std::hint::black_box(presignature.finish(&scalar, &message).expect("a signature"));
        }));
    }
    let (ring_median, aws_lc_median) = (median(ring_rounds), median(aws_lc_rounds));
    let (prepare_median, finish_median) = (median(prepare_rounds), median(finish_rounds));
    println!("ring:       {ring_median:6.2} µs per ES256 signature");
    println!("aws-lc-rs:  {aws_lc_median:6.2} µs per ES256 signature");
    println!("ratio (aws-lc-rs / ring):  {:6.2}", aws_lc_median / ring_median);
    println!("prepared nonce: {prepare_median:6.2} µs to prepare (in batches of {BATCH}), {finish_median:6.2} µs to finish");
    println!("ratio (finishing / aws-lc-rs):  {:6.3}", finish_median / aws_lc_median);
    println!("ratio (preparing and finishing / aws-lc-rs):  {:6.2}", (prepare_median + finish_median) / aws_lc_median);
}

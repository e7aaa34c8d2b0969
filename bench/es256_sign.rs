//! ES256 signing of a broker-signed token (the Kafka OAUTHBEARER token of `bench/issuance`'s
//! role), the broker's other large cost per exchange beside the job token's RS256 check: ring,
//! as `src/signing.rs` signed before the eleventh session, against aws-lc-rs. Both are given
//! the same P-256 key and message; each signature is checked by the other library once, so the
//! two are known to compute the same thing. Alternated in rounds, medians and their ratio from
//! one run (bench/README.md):
//!
//!   cargo bench --bench es256_sign
#[path = "rounds.rs"]
mod rounds;

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

    let (mut ring_rounds, mut aws_lc_rounds) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let mut ring = || ring_rounds.push(per_call(|| _ = std::hint::black_box(ring_key.sign(&ring_random, &message).expect("ring signs"))));
        let mut aws_lc =
            || aws_lc_rounds.push(per_call(|| _ = std::hint::black_box(aws_lc_key.sign(&aws_lc_random, &message).expect("aws-lc-rs signs"))));
        // Each library goes first in every other round, so neither always meets a warmer cache.
        if round % 2 == 0 {
            ring();
            aws_lc();
        } else {
            aws_lc();
            ring();
        }
    }
    let (ring_median, aws_lc_median) = (median(ring_rounds), median(aws_lc_rounds));
    println!("ring:       {ring_median:6.2} µs per ES256 signature");
    println!("aws-lc-rs:  {aws_lc_median:6.2} µs per ES256 signature");
    println!("ratio (aws-lc-rs / ring):  {:6.2}", aws_lc_median / ring_median);
}

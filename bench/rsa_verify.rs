//! RS256 verification of a job token's signature, the broker's largest single cost per
//! exchange: ring as the broker used it before the tenth session (the key given as modulus and
//! exponent, parsed again at every check) against aws-lc-rs on a key parsed once, as
//! `src/oidc/rsa_verify.rs` does now. Alternated in rounds, medians and their ratio from one
//! run (bench/README.md):
//!
//!   cargo bench --bench rsa_verify
#[path = "rounds.rs"]
mod rounds;

use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::traits::PublicKeyParts;
use sha2::Digest;

use rounds::{median, per_call, ROUNDS};

fn main() {
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("an RSA key");
    let public = private.to_public_key();
    let (modulus, exponent) = (public.n().to_bytes_be(), public.e().to_bytes_be());
    let der = public.to_pkcs1_der().expect("PKCS#1 DER").as_bytes().to_vec();
    // A GitLab job token's signing input is about 1.1 kB.
    let message = vec![b'x'; 1100];
    let signature = private.sign(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &sha2::Sha256::digest(&message)).expect("a signature");

    let ring_components = ring::signature::RsaPublicKeyComponents { n: &modulus, e: &exponent };
    let parsed = aws_lc_rs::signature::ParsedPublicKey::new(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256, &der).expect("a parsed key");
    let (mut ring_rounds, mut parsed_rounds) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ring_rounds.push(per_call(|| {
            ring_components.verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &message, &signature).expect("ring verifies");
        }));
        parsed_rounds.push(per_call(|| parsed.verify_sig(&message, &signature).expect("aws-lc verifies")));
    }
    let (ring_median, parsed_median) = (median(ring_rounds), median(parsed_rounds));
    println!("ring, key parsed at every check:  {ring_median:6.2} µs per RS256 check");
    println!("aws-lc-rs, key parsed once:       {parsed_median:6.2} µs per RS256 check");
    println!("ratio (aws-lc-rs / ring):          {:6.2}", parsed_median / ring_median);
}

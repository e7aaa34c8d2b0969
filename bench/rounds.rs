//! Timing shared by the micro-benches (`rsa_verify`, `es256_sign`): two ways of doing one
//! thing, timed in alternating rounds, compared by their medians.
use std::time::Instant;

pub const CALLS_PER_ROUND: u32 = 2_000;
pub const ROUNDS: usize = 15;

/// Microseconds per call of `call`, over one round.
pub fn per_call(mut call: impl FnMut()) -> f64 {
    let started = Instant::now();
    for _ in 0..CALLS_PER_ROUND {
        call();
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS_PER_ROUND)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

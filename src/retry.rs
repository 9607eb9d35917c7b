//! Backoff arithmetic: pure functions, so they are tested without clocks.

use std::time::Duration;

/// Delay before attempt `attempt + 1` (attempt counts from 1): `base * 2^(attempt-1)`,
/// capped at `max`, then "equal jitter": a uniform pick in `[d/2, d]`, so a crowd of
/// failures spreads out but no delay collapses to zero. `unit` is a uniform draw in `[0, 1)`.
pub fn backoff(attempt: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let raw = base.saturating_mul(1u32 << exp.min(31)).min(max);
    let half = raw / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

/// [`backoff`] with a random draw.
pub fn backoff_jittered(attempt: u32, base: Duration, max: Duration) -> Duration {
    backoff(attempt, base, max, rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn doubles_per_attempt_within_jitter_bounds() {
        let max = Duration::from_secs(300);
        assert_eq!(backoff(1, S, max, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(1, S, max, 1.0), S);
        assert_eq!(backoff(2, S, max, 1.0), 2 * S);
        assert_eq!(backoff(3, S, max, 1.0), 4 * S);
        assert_eq!(backoff(3, S, max, 0.0), 2 * S);
    }

    #[test]
    fn never_exceeds_the_cap_even_for_huge_attempts() {
        let max = Duration::from_secs(300);
        for attempt in [9, 10, 31, 32, 1000, u32::MAX] {
            let d = backoff(attempt, S, max, 0.999);
            assert!(d <= max && d >= max / 2, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn attempt_zero_behaves_like_the_first() {
        assert_eq!(backoff(0, S, 10 * S, 1.0), S);
    }
}

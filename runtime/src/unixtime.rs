//! File times as the kernel counts them, `(seconds, nanoseconds)`: seconds since the epoch
//! (negative before it) and nanoseconds forward from those seconds, as in `struct timespec` and
//! `st_mtime`/`st_mtime_nsec`. One place for the conversions the snapshotter and the copies need.

use std::time::{Duration, SystemTime};

/// `t` as `(seconds, nanoseconds)`; before the epoch the seconds round down and the nanoseconds
/// stay non-negative, as the kernel keeps them.
pub fn split(t: SystemTime) -> (i64, u32) {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            match d.subsec_nanos() {
                0 => (-(d.as_secs() as i64), 0),
                n => (-(d.as_secs() as i64) - 1, 1_000_000_000 - n),
            }
        }
    }
}

/// The `SystemTime` of `(seconds, nanoseconds)` ([`split`]'s inverse).
pub fn join((secs, nanos): (i64, u32)) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nanos));
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()) + nanos
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

/// `(seconds, nanoseconds)` as nanoseconds since the epoch, saturating.
pub fn nanos((secs, nanos): (i64, u32)) -> i64 {
    secs.saturating_mul(1_000_000_000)
        .saturating_add(i64::from(nanos))
}

/// Nanoseconds since the epoch as `(seconds, nanoseconds)` ([`nanos`]'s inverse).
pub fn from_nanos(ns: i64) -> (i64, u32) {
    (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_and_after_the_epoch_round_trip() {
        let after = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let before = SystemTime::UNIX_EPOCH - Duration::from_nanos(1_500_000_001);
        assert_eq!(split(after), (1_700_000_000, 5));
        assert_eq!(split(before), (-2, 499_999_999));
        assert_eq!(split(SystemTime::UNIX_EPOCH - Duration::from_secs(3)), (-3, 0));
        for t in [after, before, SystemTime::UNIX_EPOCH] {
            assert_eq!(join(split(t)), t);
            assert_eq!(join(from_nanos(nanos(split(t)))), t);
        }
        assert_eq!(nanos(split(before)), -1_500_000_001);
        assert_eq!(from_nanos(-1_500_000_001), (-2, 499_999_999));
        assert_eq!(nanos((i64::MAX, 0)), i64::MAX);
    }
}

//! Times as people read them: RFC 3339 in UTC plus a rounded duration from now
//! (`2026-12-03T07:00:00Z, 3 d 4 h ago`). Messages, the CLI and logs use these; metrics and JSON
//! keep Unix seconds.

/// A duration, rounded to its two largest units: `40 s`, `12 min 5 s`, `3 h 12 min`, `2 d 4 h`.
pub fn duration(secs: i64) -> String {
    let s = secs.unsigned_abs();
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec} s"),
        (0, 0, _) if sec == 0 => format!("{m} min"),
        (0, 0, _) => format!("{m} min {sec} s"),
        (0, _, 0) => format!("{h} h"),
        (0, _, _) => format!("{h} h {m} min"),
        (_, 0, _) => format!("{d} d"),
        _ => format!("{d} d {h} h"),
    }
}

/// `unix` as RFC 3339 (UTC, seconds).
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{unix} (Unix time)"))
}

/// `unix` as RFC 3339 with how far it is from `now`: `..., in 52 min` or `..., 3 d 4 h ago`.
pub fn at(unix: i64, now: i64) -> String {
    let when = rfc3339(unix);
    match unix - now {
        0 => format!("{when}, now"),
        d if d > 0 => format!("{when}, in {}", duration(d)),
        d => format!("{when}, {} ago", duration(d)),
    }
}

/// The current Unix time.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_read_as_people_write_them() {
        assert_eq!(duration(40), "40 s");
        assert_eq!(duration(-40), "40 s");
        assert_eq!(duration(125), "2 min 5 s");
        assert_eq!(duration(3600 * 3 + 60 * 12 + 9), "3 h 12 min");
        assert_eq!(duration(89_411_127), "1034 d 20 h");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(100, 40), "1970-01-01T00:01:40Z, in 1 min");
        assert_eq!(at(0, 7200), "1970-01-01T00:00:00Z, 2 h ago");
    }
}

//! RFC 3339 times in UTC, formatted and parsed without a date library: how every point,
//! bookmark and timeline entry is stamped for people.

const NS_PER_S: u64 = 1_000_000_000;

/// A time that is not RFC 3339 or out of range; the message says which part is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadTime(pub String);

/// A Unix timestamp in ns as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn format_time(ns: u64) -> String {
    let secs = ns / NS_PER_S;
    let millis = (ns / 1_000_000) % 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of a civil date (Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` (RFC 3339; `t` and a space also
/// separate date and time) to ns since the Unix epoch. Times before 1970 are refused.
pub fn parse_time(s: &str) -> Result<u64, BadTime> {
    let bad = |why: &str| {
        BadTime(format!(
            "bad time {s:?}: {why} (expected e.g. 2026-11-23T00:10:00.123Z)"
        ))
    };
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(bad("too short"));
    }
    let num = |from: usize, len: usize| -> Result<i64, BadTime> {
        let part = s.get(from..from + len).ok_or_else(|| bad("truncated"))?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad("digits expected"));
        }
        part.parse::<i64>().map_err(|_| bad("digits expected"))
    };
    let sep = |at: usize, ok: &[u8]| {
        if ok.contains(&b[at]) {
            Ok(())
        } else {
            Err(bad("bad separator"))
        }
    };
    let year = num(0, 4)?;
    sep(4, b"-")?;
    let month = num(5, 2)?;
    sep(7, b"-")?;
    let day = num(8, 2)?;
    sep(10, b"Tt ")?;
    let hour = num(11, 2)?;
    sep(13, b":")?;
    let minute = num(14, 2)?;
    sep(16, b":")?;
    let second = num(17, 2)?;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return Err(bad("month out of range")),
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return Err(bad("field out of range"));
    }
    let mut at = 19;
    let mut frac_ns = 0i64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(|c| c.is_ascii_digit()) {
            at += 1;
        }
        let digits = &s[start..at];
        if digits.is_empty() || digits.len() > 9 {
            return Err(bad("1 to 9 fraction digits expected"));
        }
        frac_ns = format!("{digits:0<9}")
            .parse::<i64>()
            .map_err(|_| bad("bad fraction"))?;
    }
    let offset_s = match &s[at..] {
        "Z" | "z" => 0,
        zone if zone.len() == 6 && (zone.starts_with('+') || zone.starts_with('-')) => {
            sep(at + 3, b":")?;
            let h = num(at + 1, 2)?;
            let m = num(at + 4, 2)?;
            if h > 23 || m > 59 {
                return Err(bad("zone offset out of range"));
            }
            let off = h * 3600 + m * 60;
            if zone.starts_with('-') {
                -off
            } else {
                off
            }
        }
        _ => return Err(bad("zone expected: Z or ±HH:MM")),
    };
    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    if secs < 0 {
        return Err(bad("before 1970"));
    }
    (secs as u64)
        .checked_mul(NS_PER_S)
        .and_then(|n| n.checked_add(frac_ns as u64))
        .ok_or_else(|| bad("too far in the future"))
}

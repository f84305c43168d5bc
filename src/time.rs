//! Timestamps formatted the way Python's `datetime.isoformat()` writes them, because Cumulus
//! tables store them as strings and downstream SQL compares them.

use anyhow::{Result, anyhow};
use chrono::{DateTime, FixedOffset, NaiveDateTime, Utc};

/// A date-time with an optional UTC offset (Python's aware or naive datetime).
#[derive(Debug, Clone, PartialEq)]
pub struct PyDateTime {
    naive: NaiveDateTime,
    offset: Option<FixedOffset>,
}

impl PyDateTime {
    /// Now, in UTC, to the microsecond (job folder names show whole seconds).
    pub fn now_utc() -> PyDateTime {
        let now = Utc::now().naive_utc();
        let naive = to_microseconds(now);
        PyDateTime {
            naive,
            offset: Some(FixedOffset::east_opt(0).unwrap()),
        }
    }

    /// Microseconds since the epoch in UTC (a time without an offset is taken as UTC), to
    /// order times written with different offsets.
    pub fn utc_micros(&self) -> i64 {
        let offset = self.offset.map_or(0, |o| o.local_minus_utc());
        self.naive.and_utc().timestamp_micros() - i64::from(offset) * 1_000_000
    }

    /// Parses ISO 8601 as `datetime.fromisoformat` does (dates, `Z`, offsets, fractions).
    pub fn parse(s: &str) -> Result<PyDateTime> {
        let s = s.trim();
        if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
            return Ok(PyDateTime {
                naive: dt.naive_local(),
                offset: Some(*dt.offset()),
            });
        }
        for fmt in [
            "%Y-%m-%dT%H:%M:%S%.f%:z",
            "%Y-%m-%dT%H:%M%:z",
            "%Y-%m-%d %H:%M:%S%.f%:z",
        ] {
            if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
                return Ok(PyDateTime {
                    naive: dt.naive_local(),
                    offset: Some(*dt.offset()),
                });
            }
        }
        for fmt in [
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%dT%H:%M",
            "%Y-%m-%d %H:%M:%S%.f",
        ] {
            if let Ok(naive) = NaiveDateTime::parse_from_str(s, fmt) {
                return Ok(PyDateTime {
                    naive,
                    offset: None,
                });
            }
        }
        if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            return Ok(PyDateTime {
                naive: d.and_hms_opt(0, 0, 0).unwrap(),
                offset: None,
            });
        }
        Err(anyhow!("'{s}' is not an ISO 8601 date-time"))
    }

    /// `YYYY-MM-DDTHH:MM:SS[.ffffff][+HH:MM]`, as Python prints it.
    pub fn isoformat(&self) -> String {
        let mut out = self.naive.format("%Y-%m-%dT%H:%M:%S").to_string();
        let micros = self.naive.and_utc().timestamp_subsec_micros();
        if micros != 0 {
            out.push_str(&format!(".{micros:06}"));
        }
        if let Some(off) = self.offset {
            let secs = off.local_minus_utc();
            let sign = if secs < 0 { '-' } else { '+' };
            let secs = secs.abs();
            out.push_str(&format!(
                "{sign}{:02}:{:02}",
                secs / 3600,
                (secs % 3600) / 60
            ));
        }
        out
    }

    /// The JobConfig folder name: `YYYY-MM-DD__HH.MM.SS`.
    pub fn folder_name(&self) -> String {
        self.naive.format("%Y-%m-%d__%H.%M.%S").to_string()
    }

    /// Summary timestamps: `YYYY-MM-DD HH:MM:SS`.
    pub fn summary_format(&self) -> String {
        self.naive.format("%Y-%m-%d %H:%M:%S").to_string()
    }
}

/// The time to the microsecond, as Python's datetime keeps it: `etl_time` is part of
/// `etl__completion`'s key, and two runs started in the same second once shared it (the second
/// run's rows merged into the first's).
fn to_microseconds(t: NaiveDateTime) -> NaiveDateTime {
    use chrono::Timelike;
    t.with_nanosecond(t.nanosecond() / 1000 * 1000).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isoformat_matches_python() {
        let t = PyDateTime::parse("2020-10-13T12:00:20-05:00").unwrap();
        assert_eq!(t.isoformat(), "2020-10-13T12:00:20-05:00");
        let t = PyDateTime::parse("2024-08-06T14:11:57.560606-04:00").unwrap();
        assert_eq!(t.isoformat(), "2024-08-06T14:11:57.560606-04:00");
        assert_eq!(
            PyDateTime::parse("2021-09-14").unwrap().isoformat(),
            "2021-09-14T00:00:00"
        );
        assert!(PyDateTime::parse("yesterday").is_err());
    }
}

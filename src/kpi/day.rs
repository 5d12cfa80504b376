//! The day of a bucket, able to hold every value of PostgreSQL's `date` type.
//!
//! A load's `"createdAt"` may be `infinity`, or a year that `chrono` cannot represent
//! (after 262143 or far BC). Such a load still forms a bucket, and the service must
//! carry its day from the queue to the recompute without failing, so the day is kept
//! in PostgreSQL's own representation instead of a `NaiveDate`.

use std::error::Error as StdError;

use bytes::BytesMut;
use chrono::NaiveDate;
use postgres_types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// PostgreSQL's epoch for dates.
const POSTGRES_EPOCH: NaiveDate = match NaiveDate::from_ymd_opt(2000, 1, 1) {
    Some(day) => day,
    None => panic!("2000-01-01 is a valid date"),
};

/// A UTC calendar day as PostgreSQL stores a `date`: days since 2000-01-01, with
/// `i32::MAX` for `infinity` and `i32::MIN` for `-infinity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BucketDay(i32);

impl BucketDay {
    /// Returns the day of `date`.
    pub fn from_date(date: NaiveDate) -> Self {
        let days = date.signed_duration_since(POSTGRES_EPOCH).num_days();
        Self(days as i32)
    }

    /// Returns the day as a `NaiveDate`, or `None` for infinity and for days outside
    /// the range `chrono` supports.
    pub fn to_date(self) -> Option<NaiveDate> {
        if self.0 == i32::MAX || self.0 == i32::MIN {
            return None;
        }
        POSTGRES_EPOCH.checked_add_signed(chrono::TimeDelta::try_days(i64::from(self.0))?)
    }

    /// Returns the number of days since 2000-01-01, as PostgreSQL stores it.
    pub fn days_since_2000(self) -> i32 {
        self.0
    }
}

impl std::fmt::Display for BucketDay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0, self.to_date()) {
            (_, Some(date)) => write!(f, "{date}"),
            (i32::MAX, None) => f.write_str("infinity"),
            (i32::MIN, None) => f.write_str("-infinity"),
            (days, None) => write!(f, "2000-01-01 {days:+} days"),
        }
    }
}

impl serde::Serialize for BucketDay {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'a> FromSql<'a> for BucketDay {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let bytes: [u8; 4] = raw
            .try_into()
            .map_err(|_| format!("a date is 4 bytes on the wire, got {}", raw.len()))?;
        Ok(Self(i32::from_be_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::DATE
    }
}

impl ToSql for BucketDay {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&self.0.to_be_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::DATE
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        let date = NaiveDate::from_ymd_opt(2026, 12, 4).unwrap();
        let day = BucketDay::from_date(date);

        assert_eq!(day.to_date(), Some(date));
        assert_eq!(day.to_string(), "2026-12-04");
    }

    #[test]
    fn infinities_display_as_postgres_does() {
        assert_eq!(BucketDay(i32::MAX).to_string(), "infinity");
        assert_eq!(BucketDay(i32::MIN).to_string(), "-infinity");
        assert_eq!(BucketDay(i32::MAX).to_date(), None);
    }

    #[test]
    fn days_beyond_chrono_still_display() {
        // 5874897-12-31, PostgreSQL's last date, is far past chrono's range.
        let last = BucketDay(2_145_031_948);

        assert_eq!(last.to_date(), None);
        assert!(last.to_string().starts_with("2000-01-01 +"));
    }
}

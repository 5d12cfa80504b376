//! Slots of a cron schedule in an IANA time zone, as instants.
//!
//! The cron expression matches wall-clock times of the zone, and each matching
//! wall-clock time becomes one instant. A time that a daylight-saving jump skips runs
//! at the first instant after the jump (02:30 on a day that jumps from 02:00 to 03:00
//! runs at 03:00). A time that a jump back repeats runs once, at its first occurrence.
//! Two wall-clock times that end on the same instant make one slot.

use std::str::FromStr;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// The default schedule of the nightly reconcile: 07:30 every day.
pub const DEFAULT_RECONCILE_CRON: &str = "30 7 * * *";

/// The default zone of the schedule. KPI buckets are UTC days, so 07:30 UTC runs when
/// the previous UTC day is complete everywhere.
pub const DEFAULT_TIME_ZONE: &str = "UTC";

/// How far before an instant the search for slots starts, in wall-clock time. It covers
/// the longest repeated hour of any zone, so a slot in the first pass of a repeated
/// hour is seen from an instant in the second pass.
const FOLD_MARGIN: TimeDelta = TimeDelta::hours(3);

/// Wall-clock matches examined per search before it gives up, which bounds the work of
/// a pattern that matches every second (a day has 86,400 of them).
const SEARCH_LIMIT: usize = 200_000;

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    expression: String,
    cron: Cron,
    zone: Tz,
}

impl Schedule {
    /// Parses a cron expression (5 fields, or 6 with seconds first) and an IANA zone
    /// name such as `Europe/Berlin`.
    ///
    /// # Errors
    ///
    /// A text that names the invalid part and what is accepted.
    pub fn parse(expression: &str, zone: &str) -> Result<Self, String> {
        let cron = Cron::from_str(expression).map_err(|error| {
            format!("invalid cron expression {expression:?}: {error}; expected 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, such as \"30 7 * * *\"")
        })?;
        let zone = Tz::from_str(zone.trim()).map_err(|_| {
            format!(
                "unknown time zone {zone:?}; expected an IANA name such as UTC or Europe/Berlin"
            )
        })?;
        Ok(Self {
            expression: expression.trim().to_owned(),
            cron,
            zone,
        })
    }

    /// Returns the cron expression as given.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// Returns the zone's IANA name.
    pub fn zone_name(&self) -> &str {
        self.zone.name()
    }

    /// Returns the first slot strictly after `instant`.
    pub fn next_after(&self, instant: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.slots_from(instant - FOLD_MARGIN)
            .find(|slot| *slot > instant)
    }

    /// Returns the last slot in (`after`, `until`], if any.
    pub fn latest_in(&self, after: DateTime<Utc>, until: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.slots_from(after - FOLD_MARGIN)
            .skip_while(|slot| *slot <= after)
            .take_while(|slot| *slot <= until)
            .last()
    }

    /// Returns every slot in (`after`, `until`], in order.
    pub fn slots_in(&self, after: DateTime<Utc>, until: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        self.slots_from(after - FOLD_MARGIN)
            .skip_while(|slot| *slot <= after)
            .take_while(|slot| *slot <= until)
            .collect()
    }

    /// Yields the slots whose wall-clock time is at or after the wall-clock time of
    /// `start`, in increasing order and without repeats.
    fn slots_from(&self, start: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let wall_start = start.with_timezone(&self.zone).naive_local();
        let mut previous: Option<DateTime<Utc>> = None;
        self.cron
            .iter_from(wall_start, croner::Direction::Forward)
            .take(SEARCH_LIMIT)
            .filter_map(move |wall| {
                let instant = self.instant_of(wall)?;
                // Mapping wall-clock times to instants never goes backwards, so a repeat
                // can only follow its equal.
                if previous.is_some_and(|earlier| instant <= earlier) {
                    return None;
                }
                previous = Some(instant);
                Some(instant)
            })
    }

    /// Maps a wall-clock time to its slot instant: the earlier of a repeated time, the
    /// end of the jump for a skipped one.
    fn instant_of(&self, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.zone.from_local_datetime(&wall) {
            LocalResult::Single(time) => Some(time.with_timezone(&Utc)),
            LocalResult::Ambiguous(earlier, _) => Some(earlier.with_timezone(&Utc)),
            LocalResult::None => self.end_of_gap(wall),
        }
    }

    /// Finds the first instant whose wall-clock time is at or after `wall`, which lies
    /// in a skipped stretch: the instant of the jump. Wall-clock time rises with the
    /// instant outside repeated stretches, so a binary search over one day finds it.
    fn end_of_gap(&self, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
        let wall_at = |seconds: i64| {
            DateTime::from_timestamp(seconds, 0)
                .map(|instant| instant.with_timezone(&self.zone).naive_local())
        };
        // Jumps happen on whole seconds, so the search runs over Unix seconds.
        let guess = wall.and_utc().timestamp();
        let mut low = guess - 86_400;
        let mut high = guess + 86_400;
        if wall_at(high)? < wall {
            return None;
        }
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if wall_at(middle)? >= wall {
                high = middle;
            } else {
                low = middle;
            }
        }
        DateTime::from_timestamp(high, 0)
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.expression, self.zone.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn default_schedule_runs_daily_at_0730_utc() {
        let schedule = Schedule::parse(DEFAULT_RECONCILE_CRON, DEFAULT_TIME_ZONE).unwrap();

        assert_eq!(
            schedule.next_after(utc("2026-05-04T07:29:59Z")),
            Some(utc("2026-05-04T07:30:00Z"))
        );
        assert_eq!(
            schedule.next_after(utc("2026-05-04T07:30:00Z")),
            Some(utc("2026-05-05T07:30:00Z"))
        );
    }

    #[test]
    fn zone_offset_moves_slot_instant() {
        let schedule = Schedule::parse("30 7 * * *", "America/New_York").unwrap();

        // EDT is UTC-4 in May.
        assert_eq!(
            schedule.next_after(utc("2026-05-04T00:00:00Z")),
            Some(utc("2026-05-04T11:30:00Z"))
        );
    }

    #[test]
    fn skipped_local_time_runs_once_after_jump() {
        // Berlin jumps from 02:00 CET to 03:00 CEST on 2026-03-29 (01:00 UTC).
        let schedule = Schedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let slots = schedule.slots_in(utc("2026-03-27T12:00:00Z"), utc("2026-03-31T12:00:00Z"));

        assert_eq!(
            slots,
            vec![
                utc("2026-03-28T01:30:00Z"),
                utc("2026-03-29T01:00:00Z"),
                utc("2026-03-30T00:30:00Z"),
                utc("2026-03-31T00:30:00Z"),
            ]
        );
    }

    #[test]
    fn repeated_local_time_runs_once() {
        // Berlin goes back from 03:00 CEST to 02:00 CET on 2026-10-25 (01:00 UTC), so
        // 02:30 happens at 00:30 UTC and again at 01:30 UTC.
        let schedule = Schedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let slots = schedule.slots_in(utc("2026-10-24T12:00:00Z"), utc("2026-10-26T12:00:00Z"));

        assert_eq!(
            slots,
            vec![utc("2026-10-25T00:30:00Z"), utc("2026-10-26T01:30:00Z")]
        );
    }

    #[test]
    fn slot_in_repeat_not_rerun_from_second_pass() {
        let schedule = Schedule::parse("30 2 * * *", "Europe/Berlin").unwrap();

        // 01:45 UTC is 02:45 in the second pass of the repeated hour.
        assert_eq!(
            schedule.next_after(utc("2026-10-25T01:45:00Z")),
            Some(utc("2026-10-26T01:30:00Z"))
        );
    }

    #[test]
    fn skipped_times_sharing_jump_make_one_slot() {
        // Every 15 minutes: 02:00, 02:15, 02:30 and 02:45 are skipped and all map to the
        // jump, as does 03:00 itself.
        let schedule = Schedule::parse("*/15 * * * *", "Europe/Berlin").unwrap();
        let slots = schedule.slots_in(utc("2026-03-29T00:40:00Z"), utc("2026-03-29T01:20:00Z"));

        assert_eq!(
            slots,
            vec![
                utc("2026-03-29T00:45:00Z"),
                utc("2026-03-29T01:00:00Z"),
                utc("2026-03-29T01:15:00Z"),
            ]
        );
    }

    #[test]
    fn latest_in_returns_last_slot_of_window() {
        let schedule = Schedule::parse("30 7 * * *", "UTC").unwrap();

        assert_eq!(
            schedule.latest_in(utc("2026-05-01T00:00:00Z"), utc("2026-05-04T09:00:00Z")),
            Some(utc("2026-05-04T07:30:00Z"))
        );
        assert_eq!(
            schedule.latest_in(utc("2026-05-04T07:30:00Z"), utc("2026-05-04T09:00:00Z")),
            None
        );
    }

    #[test]
    fn seconds_field_is_accepted() {
        let schedule = Schedule::parse("*/5 * * * * *", "UTC").unwrap();

        assert_eq!(
            schedule.next_after(utc("2026-05-04T07:00:01Z")),
            Some(utc("2026-05-04T07:00:05Z"))
        );
    }

    #[test]
    fn invalid_zone_names_the_value() {
        let error = Schedule::parse("30 7 * * *", "Mars/Olympus").unwrap_err();

        assert!(error.contains("Mars/Olympus"), "{error}");
    }

    #[test]
    fn invalid_cron_names_the_value() {
        let error = Schedule::parse("61 7 * * *", "UTC").unwrap_err();

        assert!(error.contains("61 7"), "{error}");
    }
}

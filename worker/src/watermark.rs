//! Event time per partition (leaf module): the watermark, and the horizon below which no
//! event is accepted any more.
//!
//! The watermark is the largest event time seen minus the allowed out-of-orderness; the
//! horizon is the watermark minus the allowed lateness. An event older than the horizon is
//! late (dead-lettered or dropped, per `lateEvents`); windows fold raw entries older than the
//! horizon into buckets, and emitted windows ending at or before it are closed. The horizon
//! never decreases while the partition is owned; the largest event time is stored with the
//! state, so that a restored partition starts where it stopped.

/// Per-partition watermark: max event time seen − max out-of-orderness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermark {
    max_time: i64,
    out_of_orderness: i64,
    lateness: i64,
}

impl Watermark {
    /// A watermark that has seen nothing.
    pub fn new(out_of_orderness: i64, lateness: i64) -> Self {
        Self { max_time: i64::MIN, out_of_orderness, lateness }
    }

    /// Current watermark (i64::MIN before the first event).
    pub fn current(&self) -> i64 {
        self.max_time.saturating_sub(self.out_of_orderness)
    }

    /// Whether an event with time `t` is late (below watermark − allowed lateness).
    pub fn is_late(&self, t: i64) -> bool {
        t < self.current().saturating_sub(self.lateness)
    }

    /// Advances with an accepted event; returns the horizon (watermark − lateness) after it.
    pub fn observe(&mut self, t: i64) -> i64 {
        self.max_time = self.max_time.max(t);
        self.horizon()
    }

    /// Watermark − allowed lateness: no accepted event can be older.
    pub fn horizon(&self) -> i64 {
        self.current().saturating_sub(self.lateness)
    }

    /// Largest event time seen.
    pub fn max_time(&self) -> Option<i64> {
        (self.max_time != i64::MIN).then_some(self.max_time)
    }

    /// Forgets the max event time when it is beyond `limit` (returns whether it was): a
    /// watermark restored from state written before `maxFutureSkew` existed may have been moved
    /// far ahead by one event dated in the future, and then says nothing about the real stream;
    /// the next accepted event starts it again.
    pub fn forget_beyond(&mut self, limit: i64) -> bool {
        let beyond = self.max_time > limit;
        if beyond {
            self.max_time = i64::MIN;
        }
        beyond
    }

    /// Restores from a stored max event time.
    pub fn restore(&mut self, max_time: i64) {
        self.max_time = self.max_time.max(max_time);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_marks_late_events() {
        let mut w = Watermark::new(1_000, 500);
        assert!(!w.is_late(0));
        w.observe(10_000);
        assert_eq!(w.current(), 9_000);
        assert!(!w.is_late(8_500));
        assert!(w.is_late(8_499));
        assert_eq!(w.horizon(), 8_500);
        assert!(!w.forget_beyond(10_000));
        assert_eq!(w.current(), 9_000);
        assert!(w.forget_beyond(9_999));
        assert_eq!(w.max_time(), None);
        assert!(!w.is_late(0));
        w.observe(2_000);
        assert_eq!(w.current(), 1_000);
        let mut fresh = Watermark::new(1_000, 0);
        assert!(!fresh.forget_beyond(0));
        assert_eq!(fresh.max_time(), None);
    }
}

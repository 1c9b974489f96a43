//! Autoscaling on lag (`spec.autoscaling`): pure decisions from samples of the live workers'
//! metrics; `reconcile.rs` takes the samples, writes the count through the scale subresource
//! and publishes the Event.
//!
//! ```text
//!  every reconcile (≤ 10 s) while Running, no rescale/upgrade, not suspended, past cooldown:
//!    sample Σ records_in, Σ consumer_lag, Σ busy_seconds, Σ partitions over the live workers
//!    window: the samples of the last WINDOW_MS (reset when the worker count changes)
//!    processed  = Δrecords_in / Δt              input = processed + Δlag / Δt
//!    busy       = Δbusy_seconds / Δt             (workers' busy seconds per second)
//!    capacity   = processed / busy               (records one worker does per busy second)
//!    desired    = ceil((input + lag / targetLagSeconds) / (capacity × targetUtilization))
//!                 within [min, min(max, partitions)]
//!    scale out: desired > current              → desired, at once
//!    scale in:  max(desired over the last scaleDownStabilization) < current, with samples
//!               covering that whole time → that maximum
//! ```
//! With no measurable busy time (no input) the capacity is unknown: an idle TenantModel wants
//! `minParallelism`, one with lag and no busy time (stalled) keeps its count.

use std::collections::VecDeque;

use streamscore_crds::tenantmodel::Autoscaling;

/// How far back the rates are measured.
pub const WINDOW_MS: i64 = 60_000;
/// The shortest window a decision is made on.
pub const MIN_WINDOW_MS: i64 = 20_000;

/// Shortest time between two samples. A sample changes `status.autoscaling`, and a status
/// change wakes the controller at once: without this bound every reconcile would sample,
/// write status and so start the next one, as fast as the API server answers.
pub const SAMPLE_EVERY_MS: i64 = 9_000;
/// Below this many busy seconds per second the workers count as idle.
const IDLE_BUSY: f64 = 0.01;

/// The live workers' counters, summed, at one time.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// When (Unix ms).
    pub at_ms: i64,
    /// Worker count the sample was taken at.
    pub workers: i32,
    /// Records consumed (counter).
    pub records_in: f64,
    /// Consumer lag, records (gauge).
    pub lag: f64,
    /// Seconds busy (counter).
    pub busy: f64,
    /// Input partitions owned (gauge; the partition count when every one is assigned).
    pub partitions: f64,
}

/// What the window measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// Records per second arriving (consumed plus lag growth).
    pub input_rate: f64,
    /// Records per second consumed.
    pub processed_rate: f64,
    /// Lag at the end of the window, records.
    pub lag: f64,
    /// Mean utilization of a worker (0–1).
    pub utilization: f64,
    /// Records one worker processes per busy second (None: idle, unknown).
    pub capacity: Option<f64>,
    /// Input partitions (0: unknown).
    pub partitions: i32,
}

impl Measured {
    /// The lag as time at full capacity (None when the capacity is unknown).
    pub fn lag_seconds(&self, workers: i32) -> Option<f64> {
        let c = self.capacity?;
        Some(self.lag / (c * f64::from(workers.max(1))))
    }
}

/// The rates between the first and the last sample (None: too short, or a counter went back,
/// as when a worker restarted).
pub fn measure(samples: &VecDeque<Sample>) -> Option<Measured> {
    let (first, last) = (samples.front()?, samples.back()?);
    let span = last.at_ms - first.at_ms;
    if span < MIN_WINDOW_MS || last.records_in < first.records_in || last.busy < first.busy {
        return None;
    }
    let secs = span as f64 / 1000.0;
    let processed_rate = (last.records_in - first.records_in) / secs;
    let input_rate = (processed_rate + (last.lag - first.lag) / secs).max(0.0);
    let busy = (last.busy - first.busy) / secs;
    let workers = f64::from(last.workers.max(1));
    Some(Measured {
        input_rate,
        processed_rate,
        lag: last.lag.max(0.0),
        utilization: (busy / workers).clamp(0.0, 1.0),
        capacity: (busy > IDLE_BUSY && processed_rate > 0.0).then(|| processed_rate / busy),
        partitions: last.partitions.round() as i32,
    })
}

/// The worker count the measurement asks for, within the bounds.
pub fn desired(m: &Measured, current: i32, spec: &Autoscaling) -> i32 {
    let cap = if m.partitions > 0 { spec.max_parallelism.min(m.partitions) } else { spec.max_parallelism };
    let cap = cap.max(spec.min_parallelism);
    let want = match m.capacity {
        Some(c) => {
            let required = m.input_rate + m.lag / f64::from(spec.target_lag_seconds.max(1));
            (required / (c * spec.target_utilization.clamp(0.1, 1.0))).ceil() as i32
        }
        // Nothing consumed and nothing waiting: idle.
        None if m.lag < 1.0 => spec.min_parallelism,
        // Lag but no measurable work (stalled, or just restarted): no evidence either way.
        None => current,
    };
    want.clamp(spec.min_parallelism, cap)
}

/// A decision.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Change `parallelism` to this.
    Scale(i32),
    /// Keep it; why.
    Keep(String),
}

/// Scale out at once; scale in to the largest count wanted during the stabilization window,
/// once the recommendations cover it. `recommendations` are (Unix ms, desired), oldest first,
/// the current one included.
pub fn decide(
    current: i32,
    desired_now: i32,
    recommendations: &VecDeque<(i64, i32)>,
    now_ms: i64,
    spec: &Autoscaling,
) -> Decision {
    // A count set by hand outside the bounds: brought within them at once.
    if current < spec.min_parallelism || current > spec.max_parallelism {
        return Decision::Scale(current.clamp(spec.min_parallelism, spec.max_parallelism));
    }
    if desired_now > current {
        return Decision::Scale(desired_now);
    }
    let window = spec.scale_down_stabilization.as_millis() as i64;
    let covered = recommendations.front().is_some_and(|(t, _)| now_ms - t >= window);
    let highest =
        recommendations.iter().filter(|(t, _)| now_ms - t <= window).map(|(_, n)| *n).max().unwrap_or(current);
    if highest < current && covered {
        return Decision::Scale(highest);
    }
    if desired_now < current {
        let since = recommendations.iter().rev().take_while(|(_, n)| *n < current).last().map_or(now_ms, |(t, _)| *t);
        return Decision::Keep(format!(
            "{desired_now} would do; scaling in once fewer than {current} workers have been enough for {} ({}s so far)",
            spec.scale_down_stabilization,
            (now_ms - since) / 1000
        ));
    }
    Decision::Keep(format!("{current} workers fit the load"))
}

/// Keeps the recommendations of the last stabilization window (and one older, which says the
/// window is covered).
pub fn prune(recommendations: &mut VecDeque<(i64, i32)>, now_ms: i64, spec: &Autoscaling) {
    let window = spec.scale_down_stabilization.as_millis() as i64;
    while recommendations.len() > 1 && recommendations.get(1).is_some_and(|(t, _)| now_ms - t >= window) {
        recommendations.pop_front();
    }
}

/// Keeps the samples of the last [`WINDOW_MS`] (and drops all when the worker count changed).
pub fn push_sample(samples: &mut VecDeque<Sample>, s: Sample) {
    if samples.back().is_some_and(|b| b.workers != s.workers || s.at_ms <= b.at_ms) {
        samples.clear();
    }
    samples.push_back(s);
    while samples.len() > 2 && samples.get(1).is_some_and(|x| samples.back().unwrap().at_ms - x.at_ms >= WINDOW_MS) {
        samples.pop_front();
    }
}

/// What one TenantModel's autoscaler remembers between reconciles (in the operator's memory: a
/// restarted operator measures again from scratch).
#[derive(Debug, Default)]
pub struct State {
    /// Samples of the current window.
    pub samples: VecDeque<Sample>,
    /// (Unix ms, desired) of the stabilization window.
    pub recommendations: VecDeque<(i64, i32)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamscore_crds::duration::Duration;

    fn spec(min: i32, max: i32) -> Autoscaling {
        Autoscaling {
            min_parallelism: min,
            max_parallelism: max,
            target_lag_seconds: 30,
            target_utilization: 0.7,
            scale_down_stabilization: Duration::from_secs(300),
            cooldown: Duration::from_secs(60),
        }
    }

    fn window(workers: i32, secs: i64, consumed: f64, lag: (f64, f64), busy: f64, partitions: f64) -> VecDeque<Sample> {
        let s = |at_ms, records_in, lag, busy| Sample { at_ms, workers, records_in, lag, busy, partitions };
        VecDeque::from([s(0, 1000.0, lag.0, 5.0), s(secs * 1000, 1000.0 + consumed, lag.1, 5.0 + busy)])
    }

    #[test]
    fn rates_come_from_the_window_and_a_restarted_counter_is_no_measurement() {
        // One worker, 60 s: 60,000 consumed, lag 0 → 12,000, busy 54 s.
        let m = measure(&window(1, 60, 60_000.0, (0.0, 12_000.0), 54.0, 4.0)).unwrap();
        assert_eq!(m.processed_rate, 1000.0);
        assert_eq!(m.input_rate, 1200.0);
        assert_eq!(m.lag, 12_000.0);
        assert!((m.utilization - 0.9).abs() < 1e-9);
        assert!((m.capacity.unwrap() - 60_000.0 / 54.0).abs() < 1e-9);
        assert!((m.lag_seconds(1).unwrap() - 12_000.0 / (60_000.0 / 54.0)).abs() < 1e-9);
        // Too short a window; a counter that went back (a worker restarted).
        assert_eq!(measure(&window(1, 10, 100.0, (0.0, 0.0), 1.0, 4.0)), None);
        let mut w = window(1, 60, 100.0, (0.0, 0.0), 1.0, 4.0);
        w.back_mut().unwrap().records_in = 10.0;
        assert_eq!(measure(&w), None);
    }

    #[test]
    fn the_count_covers_the_input_rate_and_the_lag_within_the_bounds() {
        let s = spec(1, 8);
        // Capacity 1,000/s per worker, input 1,200/s, lag 12,000: (1200 + 400) / 700 → 3.
        let m = Measured {
            input_rate: 1200.0,
            processed_rate: 1000.0,
            lag: 12_000.0,
            utilization: 1.0,
            capacity: Some(1000.0),
            partitions: 4,
        };
        assert_eq!(desired(&m, 1, &s), 3);
        // Never more than the partitions, nor the maximum.
        assert_eq!(desired(&Measured { input_rate: 10_000.0, ..m.clone() }, 1, &s), 4);
        assert_eq!(desired(&Measured { input_rate: 10_000.0, ..m.clone() }, 1, &spec(1, 2)), 2);
        // Little load: the minimum.
        assert_eq!(desired(&Measured { input_rate: 10.0, lag: 0.0, ..m.clone() }, 3, &spec(2, 8)), 2);
        // Idle (no busy time) and no lag: the minimum; lag but no work measured: keep.
        let idle = Measured { capacity: None, input_rate: 0.0, processed_rate: 0.0, lag: 0.0, ..m.clone() };
        assert_eq!(desired(&idle, 3, &s), 1);
        assert_eq!(desired(&Measured { lag: 500.0, ..idle }, 3, &s), 3);
    }

    #[test]
    fn it_scales_out_at_once_and_in_only_after_the_stabilization_window() {
        let s = spec(1, 8);
        let at = |m: i64| m * 60_000;
        // Out: at once.
        assert_eq!(decide(2, 4, &VecDeque::from([(at(0), 4)]), at(0), &s), Decision::Scale(4));
        // In: not while the window is not covered.
        let recs = VecDeque::from([(at(0), 2), (at(2), 2), (at(4), 2)]);
        assert!(matches!(decide(4, 2, &recs, at(4), &s), Decision::Keep(m) if m.contains("2 would do")));
        // Covered (5 min of recommendations), all lower: to the highest of them.
        let recs = VecDeque::from([(at(0), 2), (at(2), 3), (at(5), 2)]);
        assert_eq!(decide(4, 2, &recs, at(5), &s), Decision::Scale(3));
        // A flapping rate: one high recommendation inside the window keeps the count.
        let recs = VecDeque::from([(at(0), 2), (at(3), 4), (at(5), 2)]);
        assert!(matches!(decide(4, 2, &recs, at(5), &s), Decision::Keep(_)));
        assert!(matches!(decide(4, 4, &recs, at(5), &s), Decision::Keep(m) if m.contains("fit")));
        // Set by hand outside the bounds: within them at once.
        assert_eq!(decide(12, 2, &recs, at(5), &s), Decision::Scale(8));
        assert_eq!(decide(1, 2, &VecDeque::new(), at(5), &spec(3, 8)), Decision::Scale(3));
    }

    #[test]
    fn windows_keep_the_last_minute_and_restart_when_the_count_changes() {
        let s = |at_ms, workers| Sample { at_ms, workers, records_in: 0.0, lag: 0.0, busy: 0.0, partitions: 4.0 };
        let mut w = VecDeque::new();
        for t in (0..=120_000).step_by(10_000) {
            push_sample(&mut w, s(t, 2));
        }
        assert_eq!((w.front().unwrap().at_ms, w.back().unwrap().at_ms), (60_000, 120_000));
        push_sample(&mut w, s(130_000, 3));
        assert_eq!(w.len(), 1);
        let sp = spec(1, 4);
        let mut recs: VecDeque<(i64, i32)> = (0..=10).map(|m| (m * 60_000, 2)).collect();
        prune(&mut recs, 10 * 60_000, &sp);
        assert_eq!(recs.front().unwrap().0, 5 * 60_000, "one recommendation as old as the window is kept");
    }
}

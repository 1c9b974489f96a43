package io.streamscore.bench.kstreams;

/**
 * The watermark of one input partition, as the worker's {@code decode::Watermark}: the largest
 * event time accepted in the partition minus {@code maxOutOfOrderness}. An event is late when its
 * time is below watermark − {@code allowedLateness}; the <em>horizon</em> (watermark − lateness)
 * is the oldest event time any later event of the partition can still have, which is what lets
 * {@link WindowState} fold old events into buckets without changing any value.
 *
 * <p>One instance per stream task: a task owns one input partition, like one partition context
 * of the worker. Its value is kept in the state store (see {@link ScoringProcessor}).
 */
final class Watermark {
    private final long outOfOrderness;
    private final long lateness;
    private long maxTime = Long.MIN_VALUE;

    Watermark(long outOfOrderness, long lateness) {
        this.outOfOrderness = outOfOrderness;
        this.lateness = lateness;
    }

    /** Watermark − allowed lateness ({@link Long#MIN_VALUE} before the first event). */
    long horizon() {
        return Arith.saturatingSub(Arith.saturatingSub(maxTime, outOfOrderness), lateness);
    }

    boolean isLate(long t) {
        return t < horizon();
    }

    /** Advances with an accepted event; returns the horizon after it. */
    long observe(long t) {
        maxTime = Math.max(maxTime, t);
        return horizon();
    }

    long maxTime() {
        return maxTime;
    }

    /** Restores a stored max event time (never moves backwards). */
    void restore(long storedMaxTime) {
        maxTime = Math.max(maxTime, storedMaxTime);
    }
}

package io.streamscore.bench.kstreams;

/** Aggregations of a trailing window that the reference pipeline uses (as in the worker's {@code Agg::value}). */
enum Aggregation {
    /** Number of counted events. */
    COUNT,
    /** Sum of the field. */
    SUM,
    /** Mean of the field, 0 when the window holds no event. */
    AVG;

    /** The feature value of a window holding {@code count} counted events whose values sum to {@code sum}. */
    double value(long count, double sum) {
        return switch (this) {
            case COUNT -> count;
            case SUM -> sum;
            case AVG -> count == 0 ? 0.0 : sum / count;
        };
    }

    /** Whether the aggregation reads the events' values (a count only counts them). */
    boolean readsValues() {
        return this != COUNT;
    }
}

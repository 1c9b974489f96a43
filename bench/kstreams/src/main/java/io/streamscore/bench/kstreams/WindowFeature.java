package io.streamscore.bench.kstreams;

import java.util.function.Predicate;
import java.util.function.ToDoubleFunction;

/**
 * A trailing-window feature ({@code features.windows[]} of a pipeline): an aggregation of the
 * key's events with event time in [S, t] (see {@link Arith#windowStart}).
 *
 * @param name feature name
 * @param aggregation what is computed over the window
 * @param windowMs window length W
 * @param resolutionMs bucket resolution r
 * @param filter which events count (the pipeline's {@code filter}; always true without one)
 * @param field the aggregated value of an event; unused by {@link Aggregation#COUNT}
 */
record WindowFeature(
        String name,
        Aggregation aggregation,
        long windowMs,
        long resolutionMs,
        Predicate<Event> filter,
        ToDoubleFunction<Event> field) {

    /**
     * The worker's default resolution ({@code WindowFeature::effective_resolution}): W/60 clamped
     * to [1 s, 1 h], and never more than W. The reference pipeline's windows get 1 min (1h),
     * 24 min (24h), 1 h (7d) and 1 h (30d).
     */
    static long defaultResolution(long windowMs) {
        long r = Math.min(Math.max(windowMs / 60, 1_000), 3_600_000);
        return Math.min(r, Math.max(windowMs, 1));
    }

    /**
     * The value this event records in the window, or NaN when the filter does not match (the
     * worker's {@code aggregation_input}).
     */
    double input(Event e) {
        if (!filter.test(e)) {
            return Double.NaN;
        }
        return aggregation.readsValues() ? field.applyAsDouble(e) : 1.0;
    }
}

package io.streamscore.bench.kstreams;

import java.util.function.Function;

/**
 * A sequence feature ({@code features.sequences[]}): the last {@code length} values of a field,
 * by (event time, arrival), of the key's events with event time in (t − lookback, t].
 *
 * @param name feature name
 * @param length N, the number of values kept
 * @param lookbackMs L
 * @param field the value an event records, null when it has none (then it is not recorded)
 */
record SequenceFeature(String name, int length, long lookbackMs, Function<Event, String> field) {}

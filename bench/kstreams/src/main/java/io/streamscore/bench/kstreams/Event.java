package io.streamscore.bench.kstreams;

/**
 * A decoded, validated input event: only the fields the reference pipeline reads.
 *
 * @param key entity key (the {@code user_id} field as text)
 * @param time event time, epoch milliseconds (the {@code ts} field)
 * @param amount the {@code amount} field (required by the pipeline's validation)
 * @param action the {@code action} field (required by the pipeline's validation)
 * @param merchantJson the {@code merchant} field's JSON text (copied to the output), or null when absent
 */
record Event(String key, long time, double amount, String action, String merchantJson) {}

package io.streamscore.bench.kstreams;

import java.time.Duration;
import java.util.List;
import java.util.function.Predicate;

/**
 * The reference pipeline of BENCHMARKS.md ({@code bench/pipeline.yaml}) in code. Keep the two
 * in step: every value here is the YAML's, or the worker's default where the YAML sets none.
 */
final class ReferencePipeline {
    private ReferencePipeline() {}

    /** {@code source.maxOutOfOrderness: 5s}. */
    static final long MAX_OUT_OF_ORDERNESS_MS = 5_000;
    /** {@code source.allowedLateness}: default 0. */
    static final long ALLOWED_LATENESS_MS = 0;
    /** {@code source.maxFutureSkew}: default 1h. */
    static final long MAX_FUTURE_SKEW_MS = 3_600_000;
    /** {@code source.maxRecordBytes}: default 960 KiB. */
    static final int MAX_RECORD_BYTES = 960 * 1024;
    /** {@code source.maxKeyBytes}: default 1024. */
    static final int MAX_KEY_BYTES = 1024;
    /** {@code runtime.commitInterval: 500ms}. */
    static final Duration COMMIT_INTERVAL = Duration.ofMillis(500);

    static final long HOUR = 3_600_000;
    static final long DAY = 24 * HOUR;

    /** {@code features}: windows (default resolutions) and the state-only sequence. */
    static FeatureSet features() {
        return new FeatureSet(
                List.of(
                        window("tx_1h", Aggregation.COUNT, HOUR, e -> true),
                        window("amount_24h", Aggregation.SUM, DAY, e -> true),
                        window("amount_avg_7d", Aggregation.AVG, 7 * DAY, e -> true),
                        window("purchases_30d", Aggregation.COUNT, 30 * DAY, e -> "purchase".equals(e.action()))),
                List.of(new SequenceFeature("last_actions", 16, 90 * DAY, Event::action)));
    }

    private static WindowFeature window(String name, Aggregation agg, long w, Predicate<Event> filter) {
        // Sums and averages read `amount` (required by the validation, so every event has it).
        return new WindowFeature(name, agg, w, WindowFeature.defaultResolution(w), filter, Event::amount);
    }

    /** {@code model.features}: three window features, then {@code event.amount}. */
    static final List<String> MODEL_WINDOW_INPUTS = List.of("tx_1h", "amount_24h", "purchases_30d");

    /** {@code model.outputs[0].name}. */
    static final String SCORE_NAME = "fraud";
    /** {@code model.version}. */
    static final String MODEL_VERSION = "mlp-bench";
    /** {@code postprocess.labels}: review when the score is at least 0.5. */
    static final String LABEL = "review";
    static final double LABEL_MIN_SCORE = 0.5;
    /** {@code postprocess.includeFeatures}, in output order. */
    static final List<String> OUTPUT_FEATURES = List.of("tx_1h", "amount_24h", "amount_avg_7d", "purchases_30d");
}

package io.streamscore.bench.kstreams;

import java.nio.charset.StandardCharsets;
import org.apache.kafka.common.header.Headers;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.streams.processor.PunctuationType;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.processor.api.RecordMetadata;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * The whole pipeline for one input partition (one stream task): decode → watermark → the key's
 * state from the store → features → model → output record, or a dead letter with the worker's
 * reason header.
 *
 * <p>The partition's watermark lives in this processor (one instance per task, so per input
 * partition, like the worker's per-partition watermark) and is saved every commit interval in
 * the same store under the empty key, which is never an entity key (the decoder rejects empty
 * keys), so a restarted or moved task continues from it.
 */
final class ScoringProcessor implements Processor<String, byte[], String, byte[]> {
    static final String OUTPUT_SINK = "scored";
    static final String DEAD_LETTER_SINK = "dead-letters";
    private static final String WATERMARK_KEY = "";

    private final String storeName;
    private final FeatureSet features;
    private final Mlp mlp;
    private final EventDecoder decoder = new EventDecoder();
    private final Watermark watermark =
            new Watermark(ReferencePipeline.MAX_OUT_OF_ORDERNESS_MS, ReferencePipeline.ALLOWED_LATENESS_MS);
    private final int[] modelInputs;
    private final float[] row;
    private final OutputJson output;

    private ProcessorContext<String, byte[]> context;
    private KeyValueStore<String, UserState> store;
    private long savedMaxTime = Long.MIN_VALUE;

    ScoringProcessor(String storeName, FeatureSet features, Mlp mlp) {
        this.storeName = storeName;
        this.features = features;
        this.mlp = mlp;
        this.modelInputs = ReferencePipeline.MODEL_WINDOW_INPUTS.stream().mapToInt(features::windowIndex).toArray();
        this.row = new float[modelInputs.length + 1];
        if (row.length != mlp.inputs()) {
            throw new IllegalArgumentException("the model takes " + mlp.inputs() + " inputs, the pipeline gives " + row.length);
        }
        this.output = new OutputJson(features, ReferencePipeline.OUTPUT_FEATURES, ReferencePipeline.SCORE_NAME,
                ReferencePipeline.MODEL_VERSION);
    }

    @Override
    public void init(ProcessorContext<String, byte[]> context) {
        this.context = context;
        this.store = context.getStateStore(storeName);
        UserState saved = store.get(WATERMARK_KEY);
        if (saved != null) {
            watermark.restore(saved.maxTime);
            savedMaxTime = saved.maxTime;
        }
        context.schedule(ReferencePipeline.COMMIT_INTERVAL, PunctuationType.WALL_CLOCK_TIME, now -> saveWatermark());
    }

    @Override
    public void process(Record<String, byte[]> rec) {
        RecordMetadata meta = context.recordMetadata().orElseThrow();
        Event e;
        try {
            e = decoder.decode(rec.value());
            long now = System.currentTimeMillis();
            if (e.time() > now + ReferencePipeline.MAX_FUTURE_SKEW_MS) {
                throw new Rejected(Rejected.Reason.FUTURE_EVENT_TIME, "event time " + e.time() + " is "
                        + (e.time() - now) + " ms ahead of the clock; maxFutureSkew is "
                        + ReferencePipeline.MAX_FUTURE_SKEW_MS + " ms");
            }
            if (watermark.isLate(e.time())) {
                throw new Rejected(Rejected.Reason.LATE, "event time " + e.time() + " is below the horizon "
                        + watermark.horizon());
            }
        } catch (Rejected r) {
            deadLetter(rec, meta, r);
            return;
        }
        long horizon = watermark.observe(e.time());
        UserState state = store.get(e.key());
        if (state == null) {
            state = UserState.empty(features);
        }
        double[] values = features.apply(state, e, horizon);
        store.put(e.key(), state);

        for (int i = 0; i < modelInputs.length; i++) {
            row[i] = (float) values[modelInputs[i]];
        }
        row[modelInputs.length] = (float) e.amount();
        float score = mlp.score(row);
        String label = score >= ReferencePipeline.LABEL_MIN_SCORE ? ReferencePipeline.LABEL : null;
        byte[] value = output.write(e, meta.topic(), meta.partition(), meta.offset(), score, label, values);
        context.forward(new Record<>(e.key(), value, rec.timestamp()), OUTPUT_SINK);
    }

    private void deadLetter(Record<String, byte[]> rec, RecordMetadata meta, Rejected r) {
        Headers h = new RecordHeaders();
        h.add("streamscore.reason", r.reason.label.getBytes(StandardCharsets.UTF_8));
        String detail = r.getMessage() == null ? "" : r.getMessage();
        h.add("streamscore.detail", detail.substring(0, Math.min(512, detail.length())).getBytes(StandardCharsets.UTF_8));
        h.add("streamscore.source.topic", meta.topic().getBytes(StandardCharsets.UTF_8));
        h.add("streamscore.source.partition", Integer.toString(meta.partition()).getBytes(StandardCharsets.UTF_8));
        h.add("streamscore.source.offset", Long.toString(meta.offset()).getBytes(StandardCharsets.UTF_8));
        context.forward(new Record<>(rec.key(), rec.value(), rec.timestamp(), h), DEAD_LETTER_SINK);
    }

    private void saveWatermark() {
        if (watermark.maxTime() != savedMaxTime) {
            UserState w = UserState.empty(features);
            w.maxTime = watermark.maxTime();
            store.put(WATERMARK_KEY, w);
            savedMaxTime = w.maxTime;
        }
    }
}

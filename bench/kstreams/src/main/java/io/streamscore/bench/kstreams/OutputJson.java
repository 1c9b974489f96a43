package io.streamscore.bench.kstreams;

import java.nio.charset.StandardCharsets;
import java.util.List;

/**
 * The scored output record, in the worker's layout:
 * {@code {"key","eventTime","topic","partition","offset","scores":{"fraud":s},"label",
 * "features":{...},"fields":{"merchant":...},"modelVersion"}}.
 */
final class OutputJson {
    private final String[] featureKeys;
    private final int[] featureIndexes;
    private final String scoreKey;
    private final String versionJson;
    private final StringBuilder sb = new StringBuilder(384);

    OutputJson(FeatureSet features, List<String> included, String scoreName, String modelVersion) {
        featureKeys = new String[included.size()];
        featureIndexes = new int[included.size()];
        for (int i = 0; i < featureKeys.length; i++) {
            featureKeys[i] = (i > 0 ? "," : "") + quote(included.get(i)) + ":";
            featureIndexes[i] = features.windowIndex(included.get(i));
        }
        scoreKey = quote(scoreName) + ":";
        versionJson = quote(modelVersion);
    }

    /** The record value (not thread-safe: one instance per processor). */
    byte[] write(Event e, String topic, int partition, long offset, float score, String label, double[] values) {
        StringBuilder o = sb;
        o.setLength(0);
        o.append("{\"key\":");
        appendQuoted(o, e.key());
        o.append(",\"eventTime\":").append(e.time()).append(",\"topic\":");
        appendQuoted(o, topic);
        o.append(",\"partition\":").append(partition).append(",\"offset\":").append(offset);
        o.append(",\"scores\":{").append(scoreKey).append((double) score).append("},\"label\":");
        if (label == null) {
            o.append("null");
        } else {
            appendQuoted(o, label);
        }
        o.append(",\"features\":{");
        for (int i = 0; i < featureKeys.length; i++) {
            o.append(featureKeys[i]).append(values[featureIndexes[i]]);
        }
        o.append("},\"fields\":{");
        if (e.merchantJson() != null) {
            o.append("\"merchant\":").append(e.merchantJson());
        }
        o.append("},\"modelVersion\":").append(versionJson).append('}');
        return o.toString().getBytes(StandardCharsets.UTF_8);
    }

    static String quote(String s) {
        StringBuilder o = new StringBuilder(s.length() + 2);
        appendQuoted(o, s);
        return o.toString();
    }

    static void appendQuoted(StringBuilder o, String s) {
        o.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"' -> o.append("\\\"");
                case '\\' -> o.append("\\\\");
                case '\n' -> o.append("\\n");
                case '\r' -> o.append("\\r");
                case '\t' -> o.append("\\t");
                default -> {
                    if (c < 0x20) {
                        o.append(String.format("\\u%04x", (int) c));
                    } else {
                        o.append(c);
                    }
                }
            }
        }
        o.append('"');
    }
}

package io.streamscore.bench.kstreams;

import com.fasterxml.jackson.core.JsonFactory;
import com.fasterxml.jackson.core.JsonParser;
import com.fasterxml.jackson.core.JsonToken;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;

/**
 * models/fraud-mlp.onnx computed by hand in float32, from the weights that
 * {@code export_weights.py} exported: score = sigmoid(relu((x ⊙ scale) · W0 + b0) · W1 + b1).
 * The ONNX graph is Mul → MatMul → Add → Relu → MatMul → Add → Sigmoid on float32 tensors.
 */
final class Mlp {
    private final float[] scale;
    private final float[][] w0; // [input][hidden]
    private final float[] b0;
    private final float[] w1; // [hidden]
    private final float b1;
    private final float[] hidden;

    private Mlp(float[] scale, float[][] w0, float[] b0, float[] w1, float b1) {
        this.scale = scale;
        this.w0 = w0;
        this.b0 = b0;
        this.w1 = w1;
        this.b1 = b1;
        this.hidden = new float[b0.length];
    }

    int inputs() {
        return scale.length;
    }

    /** The score of one input row (not thread-safe: one instance per processor). */
    float score(float[] x) {
        for (int j = 0; j < hidden.length; j++) {
            hidden[j] = 0f;
        }
        for (int i = 0; i < scale.length; i++) {
            float xi = x[i] * scale[i];
            float[] row = w0[i];
            for (int j = 0; j < hidden.length; j++) {
                hidden[j] += xi * row[j];
            }
        }
        float z = 0f;
        for (int j = 0; j < hidden.length; j++) {
            z += Math.max(hidden[j] + b0[j], 0f) * w1[j];
        }
        z += b1;
        return (float) (1.0 / (1.0 + Math.exp(-z)));
    }

    /**
     * Reads the exported weights; when {@code model} is given, refuses weights exported from
     * another model file (SHA-256 recorded by the exporter).
     */
    static Mlp load(Path weights, Path model) throws IOException {
        Object root;
        try (JsonParser p = new JsonFactory().createParser(weights.toFile())) {
            p.nextToken();
            root = Json.read(p);
        }
        if (!(root instanceof java.util.Map<?, ?> m)) {
            throw new IOException(weights + ": not a JSON object");
        }
        if (model != null) {
            String want = String.valueOf(m.get("sha256"));
            String got = sha256(Files.readAllBytes(model));
            if (!want.equals(got)) {
                throw new IOException(weights + " was exported from a model with SHA-256 " + want + ", but " + model
                        + " has " + got + ": run bench/kstreams/export_weights.py again");
            }
        }
        float[] scale = floats(m.get("scale"));
        List<?> rows = (List<?>) m.get("w0");
        float[][] w0 = new float[rows.size()][];
        for (int i = 0; i < w0.length; i++) {
            w0[i] = floats(rows.get(i));
        }
        float[] b0 = floats(m.get("b0"));
        float[] w1 = floats(m.get("w1"));
        float b1 = Float.parseFloat(String.valueOf(m.get("b1")));
        if (w0.length != scale.length || w1.length != b0.length) {
            throw new IOException(weights + ": inconsistent shapes");
        }
        for (float[] r : w0) {
            if (r.length != b0.length) {
                throw new IOException(weights + ": inconsistent shapes");
            }
        }
        return new Mlp(scale, w0, b0, w1, b1);
    }

    private static float[] floats(Object o) {
        List<?> l = (List<?>) o;
        float[] f = new float[l.size()];
        for (int i = 0; i < f.length; i++) {
            // Written by the exporter as the shortest decimal of each float32.
            f[i] = Float.parseFloat(l.get(i).toString());
        }
        return f;
    }

    private static String sha256(byte[] data) {
        try {
            return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(data));
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    /** A minimal JSON-to-objects reader on the streaming parser (objects, arrays, scalars). */
    private static final class Json {
        static Object read(JsonParser p) throws IOException {
            JsonToken t = p.currentToken();
            switch (t) {
                case START_OBJECT -> {
                    java.util.Map<String, Object> m = new java.util.LinkedHashMap<>();
                    while (p.nextToken() == JsonToken.FIELD_NAME) {
                        String k = p.currentName();
                        p.nextToken();
                        m.put(k, read(p));
                    }
                    return m;
                }
                case START_ARRAY -> {
                    List<Object> l = new ArrayList<>();
                    while (p.nextToken() != JsonToken.END_ARRAY) {
                        l.add(read(p));
                    }
                    return l;
                }
                case VALUE_NUMBER_INT, VALUE_NUMBER_FLOAT -> {
                    return p.getText();
                }
                case VALUE_STRING -> {
                    return p.getText();
                }
                default -> {
                    return null;
                }
            }
        }
    }
}

package io.streamscore.bench.kstreams;

import com.fasterxml.jackson.core.JsonFactory;
import com.fasterxml.jackson.core.JsonGenerator;
import com.fasterxml.jackson.core.JsonParser;
import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.core.JsonToken;
import java.io.IOException;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;

/**
 * Decodes and validates one record value with the worker's rules ({@code decode::decode}) for the
 * reference pipeline: a JSON object; key {@code user_id} (non-empty string, or a number);
 * event time {@code ts} in epoch milliseconds within 1970..2200; {@code amount} a number and
 * {@code action} a string, both required; no non-finite number among the fields read. Only the
 * fields the pipeline reads are kept; the others are skipped by the streaming parser.
 */
final class EventDecoder {
    /** Event times outside [1970-01-01, 2200-01-01) are rejected as absurd (as the worker does). */
    private static final long MAX_EVENT_TIME_MS = 7_258_118_400_000L;

    private final JsonFactory json = new JsonFactory();

    Event decode(byte[] value) throws Rejected {
        byte[] bytes = value == null ? new byte[0] : value;
        if (bytes.length > ReferencePipeline.MAX_RECORD_BYTES) {
            throw new Rejected(Rejected.Reason.OVERSIZED,
                    "record is " + bytes.length + " bytes, limit is " + ReferencePipeline.MAX_RECORD_BYTES);
        }
        Fields f = new Fields();
        try (JsonParser p = json.createParser(bytes)) {
            if (p.nextToken() != JsonToken.START_OBJECT) {
                throw new Rejected(Rejected.Reason.MALFORMED, "value is not a JSON object");
            }
            while (p.nextToken() == JsonToken.FIELD_NAME) {
                String name = p.currentName();
                JsonToken t = p.nextToken();
                // Duplicate fields: the last one wins.
                switch (name) {
                    case "user_id" -> f.key = scalar(p, t);
                    case "ts" -> f.time = scalar(p, t);
                    case "amount" -> f.amount = scalar(p, t);
                    case "action" -> f.action = scalar(p, t);
                    case "merchant" -> f.merchant = scalar(p, t);
                    default -> p.skipChildren();
                }
            }
            if (p.currentToken() != JsonToken.END_OBJECT || p.nextToken() != null) {
                throw new Rejected(Rejected.Reason.MALFORMED, "trailing characters after the JSON object");
            }
        } catch (JsonProcessingException e) {
            throw new Rejected(Rejected.Reason.MALFORMED, e.getOriginalMessage());
        } catch (IOException e) {
            throw new Rejected(Rejected.Reason.MALFORMED, e.toString());
        }
        return f.validate();
    }

    /** A field's value: its JSON token, its text, and (numbers) its value. */
    private record Scalar(JsonToken token, String text, double number) {
        boolean isNumber() {
            return token == JsonToken.VALUE_NUMBER_INT || token == JsonToken.VALUE_NUMBER_FLOAT;
        }

        boolean isNull() {
            return token == JsonToken.VALUE_NULL;
        }

        /** The value's JSON text, as the worker copies it into passthrough fields. */
        String json() {
            return token == JsonToken.VALUE_STRING ? OutputJson.quote(text) : text;
        }
    }

    private Scalar scalar(JsonParser p, JsonToken t) throws IOException {
        return switch (t) {
            case VALUE_NUMBER_INT, VALUE_NUMBER_FLOAT -> new Scalar(t, p.getText(), p.getDoubleValue());
            case VALUE_STRING, VALUE_TRUE, VALUE_FALSE, VALUE_NULL -> new Scalar(t, p.getText(), Double.NaN);
            default -> { // an object or array: kept as its JSON text (only passthrough can use it)
                StringWriter w = new StringWriter();
                try (JsonGenerator g = json.createGenerator(w)) {
                    g.copyCurrentStructure(p);
                }
                yield new Scalar(t, w.toString(), Double.NaN);
            }
        };
    }

    private static final class Fields {
        Scalar key;
        Scalar time;
        Scalar amount;
        Scalar action;
        Scalar merchant;

        Event validate() throws Rejected {
            String k;
            if (key == null) {
                throw new Rejected(Rejected.Reason.MISSING_KEY, "user_id is missing");
            } else if (key.token() == JsonToken.VALUE_STRING && !key.text().isEmpty()) {
                k = key.text();
            } else if (key.isNumber()) {
                k = key.text();
            } else {
                throw new Rejected(Rejected.Reason.MISSING_KEY, "user_id is not a string or number");
            }
            int keyBytes = k.getBytes(StandardCharsets.UTF_8).length;
            if (keyBytes > ReferencePipeline.MAX_KEY_BYTES) {
                throw new Rejected(Rejected.Reason.INVALID, "user_id is " + keyBytes + " bytes, longer than maxKeyBytes");
            }
            long t = eventTime();
            if (t < 0 || t >= MAX_EVENT_TIME_MS) {
                throw new Rejected(Rejected.Reason.BAD_EVENT_TIME, "ts: " + t + " ms is outside 1970..2200");
            }
            for (Scalar s : new Scalar[] {amount, action, merchant}) {
                if (s != null && s.isNumber() && !Double.isFinite(s.number())) {
                    throw new Rejected(Rejected.Reason.INVALID, s.text() + " is not a finite number");
                }
            }
            // validation.fields, in order: amount a number, action a string; both required (the
            // default of a field rule), so absent or null is invalid too.
            if (amount == null || amount.isNull()) {
                throw new Rejected(Rejected.Reason.INVALID, "amount is required");
            }
            if (!amount.isNumber()) {
                throw new Rejected(Rejected.Reason.INVALID, "amount must be of type Number");
            }
            if (action == null || action.isNull()) {
                throw new Rejected(Rejected.Reason.INVALID, "action is required");
            }
            if (action.token() != JsonToken.VALUE_STRING) {
                throw new Rejected(Rejected.Reason.INVALID, "action must be of type String");
            }
            return new Event(k, t, amount.number(), action.text(), merchant == null ? null : merchant.json());
        }

        /** {@code eventTime.format: epochMillis}: an integer, a float (truncated) or a numeric string. */
        private long eventTime() throws Rejected {
            if (time == null) {
                throw new Rejected(Rejected.Reason.BAD_EVENT_TIME, "ts is missing");
            }
            double v;
            if (time.token() == JsonToken.VALUE_NUMBER_INT) {
                try {
                    return Long.parseLong(time.text());
                } catch (NumberFormatException e) {
                    v = time.number();
                }
            } else if (time.token() == JsonToken.VALUE_NUMBER_FLOAT) {
                v = time.number();
            } else if (time.token() == JsonToken.VALUE_STRING) {
                try {
                    v = Double.parseDouble(time.text().trim());
                } catch (NumberFormatException e) {
                    throw new Rejected(Rejected.Reason.BAD_EVENT_TIME, "ts: \"" + time.text() + "\" is not a number");
                }
            } else {
                throw new Rejected(Rejected.Reason.BAD_EVENT_TIME, "ts: unexpected JSON type for EpochMillis");
            }
            if (!Double.isFinite(v)) {
                throw new Rejected(Rejected.Reason.BAD_EVENT_TIME, "ts: " + time.text() + " is not a finite number");
            }
            return (long) v;
        }
    }
}

package io.streamscore.bench.kstreams;

/** A record that is dead-lettered: a reason (the worker's reason labels) and a detail. */
final class Rejected extends Exception {
    private static final long serialVersionUID = 1L;

    /** Dead-letter reasons, named as the worker's {@code streamscore.reason} header values. */
    enum Reason {
        MALFORMED("malformed"),
        OVERSIZED("oversized"),
        MISSING_KEY("missing_key"),
        BAD_EVENT_TIME("bad_event_time"),
        FUTURE_EVENT_TIME("future_event_time"),
        INVALID("invalid"),
        LATE("late");

        final String label;

        Reason(String label) {
            this.label = label;
        }
    }

    final Reason reason;

    Rejected(Reason reason, String detail) {
        super(detail, null, false, false); // no stack trace: rejections are ordinary data
        this.reason = reason;
    }
}

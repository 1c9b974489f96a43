package io.streamscore.bench.kstreams;

/** Event-time arithmetic shared by the window and sequence state. */
final class Arith {
    private Arith() {}

    /** a − b, clamped to the long range (the worker uses saturating i64 arithmetic). */
    static long saturatingSub(long a, long b) {
        long r = a - b;
        // Overflow iff the operands have different signs and the result's sign differs from a's.
        if (((a ^ b) & (a ^ r)) < 0) {
            return a < 0 ? Long.MIN_VALUE : Long.MAX_VALUE;
        }
        return r;
    }

    static long saturatingMul(long a, long b) {
        long hi = Math.multiplyHigh(a, b);
        long lo = a * b;
        if ((hi == 0 && lo >= 0) || (hi == -1 && lo < 0)) {
            return lo;
        }
        return (a < 0) == (b < 0) ? Long.MAX_VALUE : Long.MIN_VALUE;
    }

    /**
     * Start S of the trailing window of length {@code w} at bucket resolution {@code r} evaluated at
     * {@code t}: {@code S = (floor((t − w) / r) + 1) · r}. The window holds the events with event
     * time in [S, t]; with r = 1 ms that is (t − w, t]. S is always a bucket boundary, so a window
     * is a whole number of buckets plus the raw events not yet folded into buckets.
     */
    static long windowStart(long t, long w, long r) {
        return saturatingMul(Math.floorDiv(saturatingSub(t, w), r) + 1, r);
    }
}

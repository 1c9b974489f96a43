package io.streamscore.bench.kstreams;

import java.nio.ByteBuffer;
import java.util.Arrays;

/**
 * One key's state of one window feature, with the same layout and rules as the worker's
 * {@code features::WindowState}:
 *
 * <ul>
 *   <li><b>raw</b> entries (event time, arrival sequence, value), sorted by (time, seq): every
 *       event newer than the partition's horizon H. An out-of-order event may still arrive with
 *       a time down to H, so these stay exact: an event never counts an event with a later time.
 *   <li><b>buckets</b> (bucket number floor(time / r), count, sum) of the events at or before H,
 *       sorted by number. No future event can fall between them, so a bucket's aggregate is all a
 *       window start S (a bucket boundary) ever needs.
 * </ul>
 *
 * After each event, entries with time ≤ H move into their buckets in (time, seq) order, and
 * buckets below floor(S(H) / r) (older than the earliest window start of any future event) are
 * dropped. The value at t sums the buckets floor(S / r) … floor(t / r), then the raw entries in
 * [S, t], in that order: the same floating-point additions as the worker, so sums are the same
 * doubles, not just close.
 */
final class WindowState {
    private static final long[] NO_LONGS = {};
    private static final double[] NO_DOUBLES = {};

    private long[] bucketNo = NO_LONGS;
    private long[] bucketCount = NO_LONGS;
    private double[] bucketSum = NO_DOUBLES;
    private int buckets;

    private long[] rawTime = NO_LONGS;
    private long[] rawSeq = NO_LONGS;
    private double[] rawValue = NO_DOUBLES;
    private int raw;

    /** Adds an event's value at its (time, seq) position among the raw entries. */
    void add(long time, long seq, double value) {
        // After every entry with (time, seq) ≤ the new one's.
        int pos = raw;
        while (pos > 0 && (rawTime[pos - 1] > time || (rawTime[pos - 1] == time && rawSeq[pos - 1] > seq))) {
            pos--;
        }
        if (raw == rawTime.length) {
            int cap = grow(raw);
            rawTime = Arrays.copyOf(rawTime, cap);
            rawSeq = Arrays.copyOf(rawSeq, cap);
            rawValue = Arrays.copyOf(rawValue, cap);
        }
        System.arraycopy(rawTime, pos, rawTime, pos + 1, raw - pos);
        System.arraycopy(rawSeq, pos, rawSeq, pos + 1, raw - pos);
        System.arraycopy(rawValue, pos, rawValue, pos + 1, raw - pos);
        rawTime[pos] = time;
        rawSeq[pos] = seq;
        rawValue[pos] = value;
        raw++;
    }

    /** Folds the raw entries at or before {@code horizon} into buckets and drops dead buckets. */
    void compact(Aggregation agg, long w, long r, long horizon) {
        int n = 0;
        while (n < raw && rawTime[n] <= horizon) {
            n++;
        }
        for (int i = 0; i < n; i++) {
            int b = bucketIndex(Math.floorDiv(rawTime[i], r));
            bucketCount[b]++;
            if (agg.readsValues()) {
                bucketSum[b] += rawValue[i];
            }
        }
        if (n > 0) {
            System.arraycopy(rawTime, n, rawTime, 0, raw - n);
            System.arraycopy(rawSeq, n, rawSeq, 0, raw - n);
            System.arraycopy(rawValue, n, rawValue, 0, raw - n);
            raw -= n;
        }
        long keepFrom = Math.floorDiv(Arith.windowStart(horizon, w, r), r);
        int dead = 0;
        while (dead < buckets && bucketNo[dead] < keepFrom) {
            dead++;
        }
        if (dead > 0) {
            System.arraycopy(bucketNo, dead, bucketNo, 0, buckets - dead);
            System.arraycopy(bucketCount, dead, bucketCount, 0, buckets - dead);
            System.arraycopy(bucketSum, dead, bucketSum, 0, buckets - dead);
            buckets -= dead;
        }
    }

    /** The feature's value as of event time {@code t}. */
    double value(Aggregation agg, long w, long r, long t) {
        long s = Arith.windowStart(t, w, r);
        long lo = Math.floorDiv(s, r);
        long hi = Math.floorDiv(t, r);
        long count = 0;
        double sum = 0.0;
        for (int i = 0; i < buckets && bucketNo[i] <= hi; i++) {
            if (bucketNo[i] >= lo) {
                count += bucketCount[i];
                sum += bucketSum[i];
            }
        }
        for (int i = 0; i < raw && rawTime[i] <= t; i++) {
            if (rawTime[i] >= s) {
                count++;
                sum += rawValue[i];
            }
        }
        return agg.value(count, sum);
    }

    /** The index of bucket {@code no}, inserted empty if missing (usually the last one). */
    private int bucketIndex(long no) {
        if (buckets > 0 && bucketNo[buckets - 1] == no) {
            return buckets - 1;
        }
        int i = Arrays.binarySearch(bucketNo, 0, buckets, no);
        if (i >= 0) {
            return i;
        }
        i = -i - 1;
        if (buckets == bucketNo.length) {
            int cap = grow(buckets);
            bucketNo = Arrays.copyOf(bucketNo, cap);
            bucketCount = Arrays.copyOf(bucketCount, cap);
            bucketSum = Arrays.copyOf(bucketSum, cap);
        }
        System.arraycopy(bucketNo, i, bucketNo, i + 1, buckets - i);
        System.arraycopy(bucketCount, i, bucketCount, i + 1, buckets - i);
        System.arraycopy(bucketSum, i, bucketSum, i + 1, buckets - i);
        bucketNo[i] = no;
        bucketCount[i] = 0;
        bucketSum[i] = 0.0;
        buckets++;
        return i;
    }

    /** Short lists grow one entry at a time (most keys hold a few), longer ones by half. */
    private static int grow(int len) {
        return len < 4 ? len + 1 : len + (len >> 1);
    }

    // ---- serialisation (UserStateSerde): values are written only for aggregations that read them

    int serializedSize(Aggregation agg) {
        int v = agg.readsValues() ? 8 : 0;
        return 8 + buckets * (16 + v) + raw * (16 + v);
    }

    void writeTo(ByteBuffer buf, Aggregation agg) {
        boolean values = agg.readsValues();
        buf.putInt(buckets);
        for (int i = 0; i < buckets; i++) {
            buf.putLong(bucketNo[i]).putLong(bucketCount[i]);
            if (values) {
                buf.putDouble(bucketSum[i]);
            }
        }
        buf.putInt(raw);
        for (int i = 0; i < raw; i++) {
            buf.putLong(rawTime[i]).putLong(rawSeq[i]);
            if (values) {
                buf.putDouble(rawValue[i]);
            }
        }
    }

    static WindowState readFrom(ByteBuffer buf, Aggregation agg) {
        boolean values = agg.readsValues();
        WindowState s = new WindowState();
        s.buckets = buf.getInt();
        s.bucketNo = new long[s.buckets];
        s.bucketCount = new long[s.buckets];
        s.bucketSum = new double[s.buckets];
        for (int i = 0; i < s.buckets; i++) {
            s.bucketNo[i] = buf.getLong();
            s.bucketCount[i] = buf.getLong();
            s.bucketSum[i] = values ? buf.getDouble() : 0.0;
        }
        s.raw = buf.getInt();
        s.rawTime = new long[s.raw];
        s.rawSeq = new long[s.raw];
        s.rawValue = new double[s.raw];
        for (int i = 0; i < s.raw; i++) {
            s.rawTime[i] = buf.getLong();
            s.rawSeq[i] = buf.getLong();
            s.rawValue[i] = values ? buf.getDouble() : 1.0;
        }
        return s;
    }
}

package io.streamscore.bench.kstreams;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;

/**
 * One key's state of one sequence feature, as the worker's {@code features::SeqState}: entries
 * (time, seq, value) sorted by (time, seq), pruned after each event to what a future event can
 * still see. Entries at or before H − L (H: the partition's horizon) are outside every future
 * lookback; of the entries at or before H, no later event can come between them, so only the
 * last N of them can still be among a future event's last N.
 */
final class SequenceState {
    private long[] time = {};
    private long[] seq = {};
    private String[] value = {};
    private int size;

    void add(long t, long s, String v) {
        int pos = size;
        while (pos > 0 && (time[pos - 1] > t || (time[pos - 1] == t && seq[pos - 1] > s))) {
            pos--;
        }
        if (size == time.length) {
            int cap = size < 4 ? size + 1 : size + (size >> 1);
            time = Arrays.copyOf(time, cap);
            seq = Arrays.copyOf(seq, cap);
            value = Arrays.copyOf(value, cap);
        }
        System.arraycopy(time, pos, time, pos + 1, size - pos);
        System.arraycopy(seq, pos, seq, pos + 1, size - pos);
        System.arraycopy(value, pos, value, pos + 1, size - pos);
        time[pos] = t;
        seq[pos] = s;
        value[pos] = v;
        size++;
    }

    void prune(int n, long lookback, long horizon) {
        long deadUpTo = Arith.saturatingSub(horizon, lookback);
        int dead = 0;
        while (dead < size && time[dead] <= deadUpTo) {
            dead++;
        }
        int settled = dead;
        while (settled < size && time[settled] <= horizon) {
            settled++;
        }
        int cut = Math.max(dead, settled - n);
        if (cut > 0) {
            System.arraycopy(time, cut, time, 0, size - cut);
            System.arraycopy(seq, cut, seq, 0, size - cut);
            System.arraycopy(value, cut, value, 0, size - cut);
            Arrays.fill(value, size - cut, size, null);
            size -= cut;
        }
    }

    int serializedSize() {
        int n = 4;
        for (int i = 0; i < size; i++) {
            n += 16 + 2 + value[i].length() * 3; // upper bound of the UTF-8 length
        }
        return n;
    }

    void writeTo(ByteBuffer buf) {
        buf.putInt(size);
        for (int i = 0; i < size; i++) {
            byte[] v = value[i].getBytes(StandardCharsets.UTF_8);
            buf.putLong(time[i]).putLong(seq[i]).putShort((short) v.length).put(v);
        }
    }

    static SequenceState readFrom(ByteBuffer buf) {
        SequenceState s = new SequenceState();
        s.size = buf.getInt();
        s.time = new long[s.size];
        s.seq = new long[s.size];
        s.value = new String[s.size];
        for (int i = 0; i < s.size; i++) {
            s.time[i] = buf.getLong();
            s.seq[i] = buf.getLong();
            byte[] v = new byte[Short.toUnsignedInt(buf.getShort())];
            buf.get(v);
            s.value[i] = new String(v, StandardCharsets.UTF_8);
        }
        return s;
    }
}

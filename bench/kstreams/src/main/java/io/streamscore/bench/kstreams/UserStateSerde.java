package io.streamscore.bench.kstreams;

import java.nio.ByteBuffer;
import java.util.List;
import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serializer;

/**
 * Binary form of a {@link UserState} in the state store (and its changelog): a format version,
 * nextSeq, maxTime, then each window feature's buckets and raw entries (values only for sums and
 * averages) and each sequence's entries, in the feature set's order. Fixed-width big-endian
 * fields; the layout is defined by the {@link FeatureSet}, which must not change under a store.
 */
final class UserStateSerde implements Serde<UserState> {
    private static final byte VERSION = 1;
    private final FeatureSet features;

    UserStateSerde(FeatureSet features) {
        this.features = features;
    }

    @Override
    public Serializer<UserState> serializer() {
        return (topic, state) -> state == null ? null : write(state);
    }

    @Override
    public Deserializer<UserState> deserializer() {
        return (topic, bytes) -> bytes == null ? null : read(bytes);
    }

    byte[] write(UserState s) {
        List<WindowFeature> w = features.windows();
        int size = 1 + 16;
        for (int i = 0; i < w.size(); i++) {
            size += s.windows[i].serializedSize(w.get(i).aggregation());
        }
        for (SequenceState q : s.sequences) {
            size += q.serializedSize();
        }
        ByteBuffer buf = ByteBuffer.allocate(size);
        buf.put(VERSION).putLong(s.nextSeq).putLong(s.maxTime);
        for (int i = 0; i < w.size(); i++) {
            s.windows[i].writeTo(buf, w.get(i).aggregation());
        }
        for (SequenceState q : s.sequences) {
            q.writeTo(buf);
        }
        return buf.position() == size ? buf.array() : java.util.Arrays.copyOf(buf.array(), buf.position());
    }

    UserState read(byte[] bytes) {
        ByteBuffer buf = ByteBuffer.wrap(bytes);
        if (buf.get() != VERSION) {
            throw new SerializationException("unknown user state format " + bytes[0]);
        }
        List<WindowFeature> w = features.windows();
        WindowState[] windows = new WindowState[w.size()];
        SequenceState[] sequences = new SequenceState[features.sequences().size()];
        long nextSeq = buf.getLong();
        long maxTime = buf.getLong();
        for (int i = 0; i < windows.length; i++) {
            windows[i] = WindowState.readFrom(buf, w.get(i).aggregation());
        }
        for (int i = 0; i < sequences.length; i++) {
            sequences[i] = SequenceState.readFrom(buf);
        }
        UserState s = new UserState(windows, sequences);
        s.nextSeq = nextSeq;
        s.maxTime = maxTime;
        return s;
    }
}

package io.streamscore.bench.kstreams;

/**
 * Everything kept for one entity key (the value type of the state store): one
 * {@link WindowState} per window feature, one {@link SequenceState} per sequence feature, the
 * key's next arrival number (orders events of equal event time) and its largest event time.
 */
final class UserState {
    final WindowState[] windows;
    final SequenceState[] sequences;
    long nextSeq;
    long maxTime = Long.MIN_VALUE;

    UserState(WindowState[] windows, SequenceState[] sequences) {
        this.windows = windows;
        this.sequences = sequences;
    }

    static UserState empty(FeatureSet features) {
        WindowState[] w = new WindowState[features.windows().size()];
        for (int i = 0; i < w.length; i++) {
            w[i] = new WindowState();
        }
        SequenceState[] s = new SequenceState[features.sequences().size()];
        for (int i = 0; i < s.length; i++) {
            s[i] = new SequenceState();
        }
        return new UserState(w, s);
    }
}

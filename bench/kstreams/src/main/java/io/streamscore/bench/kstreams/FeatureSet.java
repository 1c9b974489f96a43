package io.streamscore.bench.kstreams;

import java.util.List;

/**
 * The feature definitions and the per-event update, as the worker's {@code FeatureSet::apply}:
 * the event is added to each window it counts in, each window is compacted against the horizon
 * and evaluated at the event's time; each sequence records the event's value and is pruned.
 * Sequence values are not computed (the reference pipeline's sequence is state only: neither a
 * model input nor in the output; the worker skips them too).
 */
record FeatureSet(List<WindowFeature> windows, List<SequenceFeature> sequences) {

    /** Index of the window feature {@code name}. */
    int windowIndex(String name) {
        for (int i = 0; i < windows.size(); i++) {
            if (windows.get(i).name().equals(name)) {
                return i;
            }
        }
        throw new IllegalArgumentException("no window feature " + name);
    }

    /**
     * Applies an accepted (not late) event to the key's state and returns each window feature's
     * value as of the event's time. {@code horizon}: the partition's horizon after this event.
     */
    double[] apply(UserState state, Event e, long horizon) {
        long seq = state.nextSeq++;
        state.maxTime = Math.max(state.maxTime, e.time());
        double[] values = new double[windows.size()];
        for (int i = 0; i < values.length; i++) {
            WindowFeature def = windows.get(i);
            WindowState ws = state.windows[i];
            double input = def.input(e);
            if (!Double.isNaN(input)) {
                ws.add(e.time(), seq, input);
            }
            ws.compact(def.aggregation(), def.windowMs(), def.resolutionMs(), horizon);
            values[i] = ws.value(def.aggregation(), def.windowMs(), def.resolutionMs(), e.time());
        }
        for (int i = 0; i < sequences.size(); i++) {
            SequenceFeature def = sequences.get(i);
            SequenceState ss = state.sequences[i];
            String v = def.field().apply(e);
            if (v != null) {
                ss.add(e.time(), seq, v);
            }
            ss.prune(def.length(), def.lookbackMs(), horizon);
        }
        return values;
    }
}

package io.streamscore.bench.kstreams;

import java.nio.file.Path;
import java.time.Duration;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.StoreBuilder;
import org.apache.kafka.streams.state.Stores;

/**
 * The reference pipeline (bench/pipeline.yaml) as a Kafka Streams application, the way one would
 * write it with the Processor API: one source, one processor holding one persistent key-value
 * store (RocksDB, record cache on, changelog on: Kafka Streams' defaults), two sinks. One stream
 * thread, at-least-once, commits every 500 ms (the worker's {@code commitInterval}).
 *
 * <pre>
 * java -cp "target/classes:target/lib/*" io.streamscore.bench.kstreams.Main \
 *   --bootstrap 127.0.0.1:9092 --input events --output scored --dead-letters dlq \
 *   --application-id reference --state-dir /tmp/ks --weights fraud-mlp-weights.json \
 *   [--model models/fraud-mlp.onnx] [--no-changelog]
 * </pre>
 */
public final class Main {
    static final String STORE = "user-state";

    private Main() {}

    public static void main(String[] argv) throws Exception {
        Map<String, String> args = parse(argv);
        String model = args.get("model");
        Mlp mlp = Mlp.load(Path.of(required(args, "weights")), model == null ? null : Path.of(model));
        FeatureSet features = ReferencePipeline.features();
        Topology topology = topology(required(args, "input"), required(args, "output"), required(args, "dead-letters"),
                features, mlp, !args.containsKey("no-changelog"));

        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, required(args, "application-id"));
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, required(args, "bootstrap"));
        props.put(StreamsConfig.STATE_DIR_CONFIG, required(args, "state-dir"));
        props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.AT_LEAST_ONCE);
        props.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, ReferencePipeline.COMMIT_INTERVAL.toMillis());
        props.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");
        // The worker's sink compresses with lz4: the same bytes reach the broker on both sides.
        props.put(StreamsConfig.producerPrefix("compression.type"), "lz4");

        KafkaStreams streams = new KafkaStreams(topology, props);
        CountDownLatch done = new CountDownLatch(1);
        int[] exit = {0};
        streams.setUncaughtExceptionHandler(e -> {
            System.err.println("kstreams-reference: stream thread failed: " + e);
            exit[0] = 1;
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.setStateListener((now, before) -> {
            System.err.println("kstreams-reference: " + before + " -> " + now);
            if (now == KafkaStreams.State.NOT_RUNNING || now == KafkaStreams.State.ERROR) {
                done.countDown();
            }
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close(Duration.ofSeconds(30));
            done.countDown();
        }, "shutdown"));
        System.err.println("kstreams-reference: topology\n" + topology.describe());
        streams.start();
        done.await();
        streams.close(Duration.ofSeconds(30));
        System.exit(exit[0]);
    }

    static Topology topology(String input, String output, String deadLetters, FeatureSet features, Mlp mlp,
            boolean changelog) {
        StoreBuilder<KeyValueStore<String, UserState>> store = Stores.keyValueStoreBuilder(
                        Stores.persistentKeyValueStore(STORE), Serdes.String(), new UserStateSerde(features))
                .withCachingEnabled();
        if (!changelog) {
            store = store.withLoggingDisabled();
        }
        Topology t = new Topology();
        t.addSource("events", Serdes.String().deserializer(), Serdes.ByteArray().deserializer(), input);
        t.addProcessor("score", () -> new ScoringProcessor(STORE, features, mlp), "events");
        t.addStateStore(store, "score");
        t.addSink(ScoringProcessor.OUTPUT_SINK, output, new StringSerializer(), new ByteArraySerializer(), "score");
        t.addSink(ScoringProcessor.DEAD_LETTER_SINK, deadLetters, new StringSerializer(), new ByteArraySerializer(),
                "score");
        return t;
    }

    private static Map<String, String> parse(String[] argv) {
        Map<String, String> m = new LinkedHashMap<>();
        for (int i = 0; i < argv.length; i++) {
            String a = argv[i];
            if (!a.startsWith("--")) {
                throw new IllegalArgumentException("unexpected argument " + a);
            }
            String name = a.substring(2);
            if (name.equals("no-changelog")) {
                m.put(name, "");
            } else if (i + 1 < argv.length) {
                m.put(name, argv[++i]);
            } else {
                throw new IllegalArgumentException(a + " needs a value");
            }
        }
        return m;
    }

    private static String required(Map<String, String> args, String name) {
        String v = args.get(name);
        if (v == null) {
            throw new IllegalArgumentException("--" + name + " is required");
        }
        return v;
    }
}

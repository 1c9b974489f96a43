#!/usr/bin/env python3
"""Helpers of `make bench-compare` (scripts/bench-compare.sh), on the Kafka client only.

  create-topics  creates topics (replication factor 1).
  gen-semantics  writes a small stream that exercises the window rules (see its doc).
  accepted       prints how many events of a topic the pipeline accepts (valid, not late).
  wait   waits until the output topics (scored + dead letters) hold N records, then measures the engine process from
         outside: wall time since its start, CPU seconds (utime + stime of the process and its
         descendants, from /proc), peak RSS (VmHWM). Prints one JSON line.
  check  an independent checker of the outputs: reads the whole input topic and a sample of
         each output topic, recomputes every sampled record's features from the raw events
         with plain arithmetic written from the pipeline's documented rules (below), and its
         score with the exported MLP weights; exits 1 on any mismatch.
  report prints the measurements of `wait` (one JSON line per engine and run) as a table per
         run and a summary.

The rules, from bench/pipeline.yaml and the feature documentation (worker/src/features.rs,
crds/src/pipeline.rs); nothing here calls or imports either engine:
  - state is per (input partition, user_id); an event sees the events of its key that came
    before it in the partition, and itself;
  - watermark per partition = max event time accepted so far - maxOutOfOrderness (5 s); an
    event with time < watermark - allowedLateness (0) is late: no output, counts nowhere;
  - window W with resolution r (default W/60 clamped to [1 s, 1 h], at most W) evaluated at t
    holds the events with time in [S, t], S = (floor((t - W) / r) + 1) * r;
  - count / sum of amount / avg of amount (0 when empty); a filter keeps only matching events;
  - score = sigmoid(relu((x * scale) @ w0 + b0) @ w1 + b1) in float32, x = [tx_1h,
    amount_24h, purchases_30d, amount]; label "review" when score >= 0.5.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

HOUR = 3_600_000
DAY = 24 * HOUR
OUT_OF_ORDERNESS = 5_000
LATENESS = 0


def resolution(w):
    return min(max(w // 60, 1_000), 3_600_000, max(w, 1))


# name -> (aggregation, window, filter on action or None)
FEATURES = {
    "tx_1h": ("count", HOUR, None),
    "amount_24h": ("sum", DAY, None),
    "amount_avg_7d": ("avg", 7 * DAY, None),
    "purchases_30d": ("count", 30 * DAY, "purchase"),
}
MODEL_INPUTS = ["tx_1h", "amount_24h", "purchases_30d", "event.amount"]


def consumer(bootstrap, group=None):
    return Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group or f"bench-compare-check-{os.getpid()}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "fetch.max.bytes": 52428800,
    })


def partitions(c, topic):
    md = c.list_topics(topic, timeout=10)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        raise SystemExit(f"topic {topic} not found: {t.error if t else 'missing'}")
    return sorted(t.partitions)


def end_offsets(c, topic, parts):
    return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts}


# ------------------------------------------------------------------------------- create-topics

def cmd_create_topics(a):
    admin = AdminClient({"bootstrap.servers": a.bootstrap})
    futures = admin.create_topics([NewTopic(t, num_partitions=a.partitions, replication_factor=1) for t in a.topics])
    for t, f in futures.items():
        f.result(timeout=30)
    # Wait until the metadata shows every partition (the engines start right after).
    c = consumer(a.bootstrap)
    for t in a.topics:
        for _ in range(100):
            md = c.list_topics(t, timeout=10).topics.get(t)
            if md is not None and md.error is None and len(md.partitions) == a.partitions:
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"topic {t}: partitions not visible")
    c.close()


# ---------------------------------------------------------------------------------------- wait

def proc_cpu_ticks(pid):
    """utime + stime + cutime + cstime of pid, plus the same of its live descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                ppid = int(st[st.rindex(")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        # fields[0] is the state (stat field 3): utime, stime, cutime, cstime are fields 14-17.
        total += sum(int(x) for x in fields[11:15])
        todo.extend(children.get(p, []))
    return total


def vm_hwm_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def cmd_wait(a):
    c = consumer(a.bootstrap)
    parts = {t: partitions(c, t) for t in a.topic}
    deadline = time.time() + a.timeout
    tick = os.sysconf("SC_CLK_TCK")
    last_report = time.time()
    while True:
        if not os.path.exists(f"/proc/{a.pid}"):
            raise SystemExit(f"the engine (pid {a.pid}) exited before writing {a.count} outputs")
        n = sum(hi for t in a.topic for _, hi in end_offsets(c, t, parts[t]).values())
        if n >= a.count:
            now = time.time()
            cpu = proc_cpu_ticks(a.pid) / tick
            hwm = vm_hwm_kb(a.pid)
            print(json.dumps({"records": n, "wall_s": now - a.start, "cpu_s": cpu, "vm_hwm_kb": hwm}))
            c.close()
            return
        if time.time() > deadline:
            raise SystemExit(f"timeout: {n} of {a.count} records in {a.topic} after {a.timeout}s")
        if time.time() - last_report > 30:
            print(f"  … {n}/{a.count} records in {', '.join(a.topic)}", file=sys.stderr)
            last_report = time.time()
        time.sleep(a.interval)


# --------------------------------------------------------------------------------------- check

def read_range(c, topic, part, start, stop, on_msg):
    """Reads offsets [start, stop) of one partition, calling on_msg(msg) for each record."""
    if stop <= start:
        return
    c.assign([TopicPartition(topic, part, start)])
    nxt = start
    while nxt < stop:
        # Never more than what is left: consume() waits for a full batch (or the timeout).
        msgs = c.consume(num_messages=min(10_000, stop - nxt), timeout=10)
        if not msgs:
            raise SystemExit(f"{topic}[{part}]: no records at offset {nxt} (want up to {stop})")
        for m in msgs:
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(m.error())
            if m.offset() >= stop:
                nxt = stop
                break
            on_msg(m)
            nxt = m.offset() + 1
    c.unassign()


def sample_outputs(c, topic, size):
    """About `size` records of `topic`: per partition four evenly spaced stretches, or the whole
    partition when it is not much larger than its share."""
    parts = partitions(c, topic)
    ends = end_offsets(c, topic, parts)
    per_part = max(1, -(-size // len(parts)))
    chunk = max(1, -(-per_part // 4))
    out = []
    for p in parts:
        lo, hi = ends[p]
        if hi - lo <= 4 * chunk:
            ranges = [(lo, hi)]
        else:
            ranges = [(s, s + chunk) for s in (lo + (hi - lo - chunk) * k // 3 for k in range(4))]
        for start, stop in ranges:
            read_range(c, topic, p, start, stop, lambda m: out.append(json.loads(m.value())))
    total = sum(hi - lo for lo, hi in ends.values())
    return out, total


class Mlp:
    def __init__(self, path):
        w = json.load(open(path))
        self.scale = np.array(w["scale"], dtype=np.float32)
        self.w0 = np.array(w["w0"], dtype=np.float32)
        self.b0 = np.array(w["b0"], dtype=np.float32)
        self.w1 = np.array(w["w1"], dtype=np.float32)
        self.b1 = np.float32(w["b1"])

    def score(self, x):
        x = np.array(x, dtype=np.float32) * self.scale
        h = np.maximum(x @ self.w0 + self.b0, np.float32(0))
        z = float(h @ self.w1 + self.b1)
        return 1.0 / (1.0 + math.exp(-z))


class History:
    """The accepted events of one (partition, key), in arrival order."""

    def __init__(self):
        self.events = []  # (time, amount or None, action or None)
        self._arrays = None

    def append(self, ev):
        self.events.append(ev)
        self._arrays = None

    def arrays(self):
        if self._arrays is None:
            t = np.array([e[0] for e in self.events], dtype=np.int64)
            amount = np.array([np.nan if e[1] is None else e[1] for e in self.events], dtype=np.float64)
            action = np.array([e[2] or "" for e in self.events], dtype=object)
            self._arrays = (t, amount, action)
        return self._arrays


def expected_features(history, i):
    """The features of the i-th accepted event of a key: from its events 0..i (the ones that
    arrived before it, and itself) whose time lies in the window [S, t]."""
    times, amounts, actions = (x[: i + 1] for x in history.arrays())
    t = int(times[i])
    out = {}
    for name, (agg, w, flt) in FEATURES.items():
        r = resolution(w)
        start = ((t - w) // r + 1) * r  # floor division: also right for negative t - w
        sel = (times >= start) & (times <= t)
        if flt is not None:
            sel &= actions == flt
        if agg == "count":
            out[name] = float(sel.sum())
            continue
        sel &= ~np.isnan(amounts)  # an event without an amount does not count in sums
        n, total = int(sel.sum()), float(amounts[sel].sum())
        out[name] = total if agg == "sum" else (total / n if n else 0.0)
    return out


def valid_event(v):
    """(user_id, ts, amount, action, merchant) if the event passes validation, else None."""
    try:
        e = json.loads(v)
    except (ValueError, TypeError):
        return None
    if not isinstance(e, dict):
        return None
    key, ts = e.get("user_id"), e.get("ts")
    if not (isinstance(key, str) and key) or not isinstance(ts, int) or isinstance(ts, bool):
        return None
    # validation.fields: amount a number, action a string, both required (absent or null: invalid)
    amount, action = e.get("amount"), e.get("action")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
        return None
    if not isinstance(action, str):
        return None
    return key, ts, float(amount), action, e.get("merchant")


def close(a, b, rel=1e-9, absolute=1e-6):
    return abs(a - b) <= max(absolute, rel * max(abs(a), abs(b)))


def scan_input(c, topic, keys, wanted):
    """One pass over the input: the watermark of each partition, which events are accepted,
    and the histories of `keys`. Returns (accepted, late, invalid, found) where found maps each
    wanted (partition, offset) to (history, index in it, event)."""
    parts = partitions(c, topic)
    ends = end_offsets(c, topic, parts)
    accepted = late = invalid = 0
    found = {}
    t0 = time.time()
    for p in parts:
        lo, hi = ends[p]
        max_t = None
        histories = {}

        def on_msg(m, p=p):
            nonlocal max_t, accepted, late, invalid
            ev = valid_event(m.value())
            if ev is None:
                invalid += 1
                return
            key, ts = ev[0], ev[1]
            if max_t is not None and ts < max_t - OUT_OF_ORDERNESS - LATENESS:
                late += 1
                return
            max_t = ts if max_t is None else max(max_t, ts)
            accepted += 1
            if key in keys:
                h = histories.get(key)
                if h is None:
                    h = histories[key] = History()
                h.append((ts, ev[2], ev[3]))
                if (p, m.offset()) in wanted:
                    found[(p, m.offset())] = (h, len(h.events) - 1, ev)

        read_range(c, topic, p, lo, hi, on_msg)
    print(f"check: input {topic}: {accepted} accepted, {late} late, {invalid} invalid "
          f"(read in {time.time() - t0:.1f}s)", file=sys.stderr)
    return accepted, late, invalid, found


def cmd_accepted(a):
    c = consumer(a.bootstrap)
    accepted, _, _, _ = scan_input(c, a.input, set(), {})
    c.close()
    print(accepted)


def cmd_check(a):
    mlp = Mlp(a.weights)
    c = consumer(a.bootstrap)
    sides = []
    for spec in a.outputs:
        name, topic = spec.split("=", 1)
        recs, total = sample_outputs(c, topic, a.sample)
        sides.append((name, topic, recs, total))
        print(f"check: {name}: {topic} holds {total} records; {len(recs)} sampled", file=sys.stderr)
    wanted = {}  # (partition, offset) -> [(side index, record)]
    keys = set()
    for si, (_, _, recs, _) in enumerate(sides):
        for r in recs:
            wanted.setdefault((r["partition"], r["offset"]), []).append((si, r))
            keys.add(r["key"])

    accepted, late, invalid, found = scan_input(c, a.input, keys, wanted)
    c.close()

    failed = False
    for name, topic, recs, total in sides:
        problems = []
        if total != accepted:
            problems.append(f"{topic} holds {total} records, {accepted} inputs were accepted")
        seen = set()
        for r in recs:
            at = (r["partition"], r["offset"])
            if at in seen:
                problems.append(f"{at}: duplicate output in the sample")
                continue
            seen.add(at)
            if at not in found:
                problems.append(f"{at}: output for an input that is not an accepted event")
                continue
            hist, i, ev = found[at]
            want = expected_features(hist, i)
            if a.perturb:
                want[a.perturb] += 1.0
            got = r.get("features", {})
            for f, v in want.items():
                g = got.get(f)
                if g is None or not close(float(g), v):
                    problems.append(f"{at} key {ev[0]} t={ev[1]}: {f} = {g}, expected {v}")
            x = [want["tx_1h"], want["amount_24h"], want["purchases_30d"], ev[2] or 0.0]
            score = mlp.score(x)
            got_score = r.get("scores", {}).get("fraud")
            if got_score is None or abs(got_score - score) > 1e-4:
                problems.append(f"{at}: score {got_score}, expected {score:.6f}")
            elif (r.get("label") == "review") != (got_score >= 0.5):
                problems.append(f"{at}: label {r.get('label')!r} with score {got_score}")
            if r.get("key") != ev[0] or r.get("eventTime") != ev[1] or r.get("topic") != a.input:
                problems.append(f"{at}: key/eventTime/topic {r.get('key')}/{r.get('eventTime')}/{r.get('topic')}, "
                                f"expected {ev[0]}/{ev[1]}/{a.input}")
            if r.get("fields", {}).get("merchant") != ev[4]:
                problems.append(f"{at}: merchant {r.get('fields', {}).get('merchant')!r}, expected {ev[4]!r}")
        status = "OK" if not problems else f"FAILED ({len(problems)} problems)"
        print(f"check: {name}: {len(seen)} sampled outputs verified against the input: {status}")
        for pr in problems[:10]:
            print(f"  {pr}")
        failed |= bool(problems)
    if failed:
        raise SystemExit("check: FAILED")


# ------------------------------------------------------------------------------- gen-semantics

def cmd_gen_semantics(a):
    """Events that exercise the window rules (the benchmark's stream spans ~30 minutes of event
    time, inside every window): a few users, event times spread over ~6 weeks so that every
    window fills and expires; times on 1-minute and 1-hour bucket boundaries; pairs of events of
    one user exactly W and W - 1 ms apart (on and just inside a window's edge); disorder up to
    4 s; late events (5-30 s behind); events without amount or action; invalid and malformed
    records."""
    import heapq

    from confluent_kafka import Producer

    rng = np.random.default_rng(a.seed)
    p = Producer({"bootstrap.servers": a.bootstrap, "linger.ms": 20})
    now = int(time.time() * 1000)
    clock = (now - 70 * DAY) // HOUR * HOUR
    step = 35 * DAY // a.count
    edges = []  # (time, user): events due exactly W (or W - 1 ms) after an earlier one
    prev = None
    for _ in range(a.count):
        nxt = clock + int(rng.integers(0, 2 * step))
        roll = rng.random()
        if prev is not None and roll < 0.02:
            # the previous event's user (so its partition) again, older by 4-5 s: accepted out of
            # order, or older by more than 5 s: late
            user = prev[1]
            ts = prev[0] - int(rng.integers(4_000, 5_000) if roll < 0.01 else rng.integers(5_001, 30_000))
        elif edges and edges[0][0] <= nxt:
            ts, user = heapq.heappop(edges)
            clock = max(clock, ts)
        else:
            clock, user = nxt, f"s-{int(rng.integers(0, a.users))}"
            roll = rng.random()
            if roll < 0.05:
                clock = -(-clock // 60_000) * 60_000  # on a 1-minute boundary
            elif roll < 0.07:
                clock = -(-clock // HOUR) * HOUR  # on a 1-hour (and 24-minute) boundary
            ts = clock if roll < 0.07 else clock - int(rng.integers(0, 4_000))
        prev = (ts, user)
        if ts == clock and rng.random() < 0.04:
            w = [HOUR, DAY, 7 * DAY, 30 * DAY][int(rng.integers(0, 4))]
            heapq.heappush(edges, (ts + w - int(rng.integers(0, 2)), user))
        assert ts < now, "gen-semantics: an event in the future"
        ev = {"user_id": user, "ts": ts, "amount": round(float(rng.uniform(1, 3000)), 2),
              "action": ["view", "purchase", "ride_requested", "login", "cart"][int(rng.integers(0, 5))],
              "merchant": f"m{int(rng.integers(0, 50))}"}
        roll = rng.random()
        if roll < 0.01:
            del ev["amount"]
        elif roll < 0.02:
            del ev["action"]
        elif roll < 0.025:
            ev["amount"] = "12"  # not a number: dead-lettered
        value = json.dumps(ev).encode()
        if rng.random() < 0.003:
            value = value[: len(value) // 2]  # malformed
        while True:
            try:
                p.produce(a.topic, key=user.encode(), value=value)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    if p.flush(60) != 0:
        raise SystemExit("gen-semantics: not every event was acknowledged")
    print(f"gen-semantics: {a.count} events of {a.users} users to {a.topic}", file=sys.stderr)


# -------------------------------------------------------------------------------------- report

NAMES = {"streamscore": "streamscore", "kafka-streams": "Kafka Streams"}


def spread(xs, fmt):
    xs = sorted(xs)
    med = xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
    return f"{fmt.format(xs[0])}–{fmt.format(xs[-1])} (median {fmt.format(med)})" if len(xs) > 1 else fmt.format(xs[0])


def cmd_report(a):
    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    by = {}
    for r in rows:
        m = r["m"]
        by.setdefault(r["run"], {})[r["engine"]] = {
            "wall": m["wall_s"], "cpu": m["cpu_s"], "rss": m["vm_hwm_kb"] / 1024,
            "per_cpu": a.count / m["cpu_s"], "per_wall": a.count / m["wall_s"],
        }
    head = f"{'run':>3}  {'engine':<14} {'wall s':>8} {'events/s':>10} {'CPU s':>8} {'events/CPU-s':>13} {'peak RSS MB':>12}"
    ratios = []
    for run in sorted(by):
        print(f"\nrun {run} ({a.count:,} events)")
        print(head)
        for e in ("streamscore", "kafka-streams"):
            if e in by[run]:
                x = by[run][e]
                print(f"{run:>3}  {NAMES[e]:<14} {x['wall']:>8.1f} {x['per_wall']:>10,.0f} {x['cpu']:>8.1f} "
                      f"{x['per_cpu']:>13,.0f} {x['rss']:>12,.0f}")
        if len(by[run]) == 2:
            ratio = by[run]["streamscore"]["per_cpu"] / by[run]["kafka-streams"]["per_cpu"]
            ratios.append(ratio)
            print(f"     events per CPU-second, streamscore / Kafka Streams: {ratio:.2f}x")
    print(f"\nsummary over {len(by)} run(s), {a.count:,} events each (min–max):")
    for e in ("streamscore", "kafka-streams"):
        xs = [by[r][e] for r in by if e in by[r]]
        if xs:
            print(f"  {NAMES[e]:<14} events/CPU-s {spread([x['per_cpu'] for x in xs], '{:,.0f}')}; "
                  f"events/s (wall) {spread([x['per_wall'] for x in xs], '{:,.0f}')}; "
                  f"CPU s {spread([x['cpu'] for x in xs], '{:.1f}')}; "
                  f"peak RSS MB {spread([x['rss'] for x in xs], '{:,.0f}')}")
    if ratios:
        print(f"  ratio streamscore / Kafka Streams (events per CPU-second): {spread(ratios, '{:.2f}x')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("create-topics")
    t.add_argument("--bootstrap", required=True)
    t.add_argument("--partitions", type=int, default=6)
    t.add_argument("topics", nargs="+")
    w = sub.add_parser("wait")
    w.add_argument("--bootstrap", required=True)
    w.add_argument("--topic", required=True, action="append", help="output topic (repeat: their sum counts)")
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--pid", type=int, required=True)
    w.add_argument("--start", type=float, required=True, help="engine start, epoch seconds")
    w.add_argument("--timeout", type=float, default=1800)
    w.add_argument("--interval", type=float, default=0.2)
    k = sub.add_parser("check")
    k.add_argument("--bootstrap", required=True)
    k.add_argument("--input", required=True)
    k.add_argument("--outputs", nargs="+", required=True, help="NAME=TOPIC ...")
    k.add_argument("--sample", type=int, default=2000, help="records sampled per output topic")
    k.add_argument("--weights", required=True)
    k.add_argument("--perturb", choices=sorted(FEATURES), help="self-test: add 1 to this expected feature")
    g = sub.add_parser("gen-semantics")
    g.add_argument("--bootstrap", required=True)
    g.add_argument("--topic", required=True)
    g.add_argument("--count", type=int, default=30_000)
    g.add_argument("--users", type=int, default=20)
    g.add_argument("--seed", type=int, default=5)
    n = sub.add_parser("accepted", help="prints how many events of a topic are accepted (not late, valid)")
    n.add_argument("--bootstrap", required=True)
    n.add_argument("--input", required=True)
    r = sub.add_parser("report")
    r.add_argument("--count", type=int, required=True)
    r.add_argument("results")
    a = ap.parse_args()
    {"create-topics": cmd_create_topics, "gen-semantics": cmd_gen_semantics, "accepted": cmd_accepted,
     "wait": cmd_wait, "check": cmd_check, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()

import itertools
import random

from data_pipeline.plan import Plan, Visits, replan


def positions(plan: Plan, reader: int, visits: Visits, count: int) -> list[tuple[int, int]]:
    """The first `count` positions (visit, k) that `reader` reads under `plan`."""
    out = []
    for g, k0, k1 in plan.ranges(reader, visits):
        out += [(g, k) for k in range(k0, k1)][: count - len(out)]
        if len(out) == count:
            return out
    return out


def test_round_robin_gives_each_reader_its_visits():
    visits = Visits([5, 3, 4], seed=0, split="train")
    plan = Plan(readers=2)
    ranges = list(itertools.islice(plan.ranges(1, visits), 3))
    assert [g for g, _, _ in ranges] == [1, 3, 5]
    assert all(k0 == 0 and k1 == visits.size(g) for g, k0, k1 in ranges)
    assert all(sorted(visits.order(e)) == [0, 1, 2] for e in range(5))  # each epoch visits every shard once
    assert len({tuple(visits.order(e)) for e in range(10)}) > 1  # in orders that change with the epoch


def test_repeated_elastic_replans_read_every_position_exactly_once():
    rng = random.Random(0)
    for trial in range(40):
        visits = Visits([rng.randint(1, 30) for _ in range(rng.randint(1, 9))], seed=trial, split="train")
        plan, seen = Plan(readers=rng.randint(1, 6)), []
        for _ in range(3):  # three layouts, each consuming a random amount per reader, then re-planned
            consumed = [rng.randint(0, 60) for _ in range(plan.readers)]
            for r, c in enumerate(consumed):
                seen += positions(plan, r, visits, c)
            plan = replan(plan, consumed, rng.randint(1, 6), visits)
        assert len(seen) == len(set(seen)), "a position was read twice"
        # Below the final origin every position was read, or is still owed by the final prefixes.
        owed = [(g, k) for prefix in plan.prefix for g, k0, k1 in prefix for k in range(k0, k1)]
        below = {(g, k) for g in range(plan.origin) for k in range(visits.size(g))}
        assert all(g < plan.origin for g, _ in seen + owed)  # the new round-robin starts past all of it
        assert set(seen) | set(owed) == below and not set(seen) & set(owed)

"""The placement rule (mobile.moe.placement): each miss to whichever of link and host finishes the
layer sooner, hot misses placed on the host also copied in behind."""

from __future__ import annotations

from mobile.moe.placement import Costs, Miss, Placement, always, choose

# the demo's regime at R = 40, Hc = 16: a move is 40 device-expert times, a host pair 16
COSTS = Costs(move=40.0, device_pair=1.0, host_pair=16.0)


def test_a_single_miss_goes_where_it_finishes_first():
    assert choose([Miss(3, 1, 0.0)], COSTS, 0.0, 0.0, 1.0) == {3: Placement.HOST}  # 16 < 41
    fast_link = Costs(move=5.0, device_pair=1.0, host_pair=16.0)
    assert choose([Miss(3, 1, 0.0)], fast_link, 0.0, 0.0, 1.0) == {3: Placement.MOVE}  # 6 < 16
    # a prompt: many pairs of one expert make moving it (then computing on the device) cheaper
    assert choose([Miss(3, 8, 0.0)], COSTS, 0.0, 0.0, 1.0) == {3: Placement.MOVE}  # 48 < 128


def test_hot_misses_on_the_host_are_copied_in_behind():
    placed = choose([Miss(1, 1, 5.0), Miss(2, 1, 0.5)], Costs(move=40.0, device_pair=1.0, host_pair=4.0),
                    0.0, 0.0, coldest_resident=2.0)
    assert placed == {1: Placement.BOTH, 2: Placement.HOST}


def test_misses_are_shared_between_link_and_host():
    """Four one-pair misses: the host takes them while it finishes before the link would (16, 32),
    then the link (41 < 48), then the host again (48 < 81)."""
    misses = [Miss(e, 1, 0.0) for e in range(4)]
    placed = choose(misses, COSTS, 0.0, 0.0, 1.0)
    assert [placed[e] for e in range(4)] == [Placement.HOST, Placement.HOST, Placement.MOVE, Placement.HOST]


def test_queues_already_on_the_link_or_host_count():
    assert choose([Miss(0, 1, 0.0)], COSTS, 0.0, 30.0, 1.0) == {0: Placement.MOVE}  # host busy: 41 < 46
    fast_link = Costs(move=5.0, device_pair=1.0, host_pair=16.0)
    assert choose([Miss(0, 1, 0.0)], fast_link, 20.0, 0.0, 1.0) == {0: Placement.HOST}  # link busy: 16 < 26


def test_longest_jobs_first_and_a_stable_order():
    misses = [Miss(7, 1, 0.0), Miss(2, 3, 0.0), Miss(5, 1, 0.0)]
    placed = choose(misses, Costs(move=10.0, device_pair=1.0, host_pair=6.0), 0.0, 0.0, 1.0)
    # 2 (3 pairs): link 13 < host 18; then 5 and 7 (ties by id): host 6, then host 12 < link 21
    assert placed == {2: Placement.MOVE, 5: Placement.HOST, 7: Placement.HOST}
    assert choose(misses, COSTS, 0.0, 0.0, 1.0) == choose(list(reversed(misses)), COSTS, 0.0, 0.0, 1.0)


def test_the_baselines_rules_are_constant():
    misses = [Miss(0, 1, 9.0), Miss(1, 4, 0.0)]
    assert always(Placement.HOST, misses) == {0: Placement.HOST, 1: Placement.HOST}
    assert always(Placement.BOTH, misses) == {0: Placement.BOTH, 1: Placement.BOTH}

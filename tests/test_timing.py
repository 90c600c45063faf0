"""The job's time split: exclusive parts that add up to the total."""

from __future__ import annotations

import time

import pytest

from cwps_lightning.timing import PARTS, Stopwatch


def test_a_part_timed_inside_another_pauses_it_and_the_split_adds_up():
    sw = Stopwatch()
    start = time.perf_counter()
    with sw.timed("t0"):
        time.sleep(0.05)
        with sw.timed("training"):
            time.sleep(0.1)
        time.sleep(0.05)
    sw.add("cpms", 0.02)
    total = time.perf_counter() - start + 0.3  # 0.3 s outside every part
    assert sw.seconds["training"] == pytest.approx(0.1, abs=0.03)
    assert sw.seconds["t0"] == pytest.approx(0.1, abs=0.03)  # without the nested training
    split = sw.split(total)
    assert list(split["seconds"]) == [*PARTS, "other"]
    assert sum(split["seconds"].values()) == pytest.approx(total, abs=0.02)
    assert split["seconds"]["other"] == pytest.approx(0.3 - 0.02, abs=0.03)
    assert sum(split["percent"].values()) == pytest.approx(100, abs=0.1)


def test_an_unknown_part_is_refused_by_name():
    with pytest.raises(KeyError, match="unknown time part 'fitting'"), Stopwatch().timed("fitting"):
        pass


def test_added_seconds_accumulate_and_other_is_never_negative():
    sw = Stopwatch()
    sw.add("training", 1.0)
    sw.add("training", 0.5)
    sw.add("cpms", 0.1234)
    split = sw.split(3.0)
    assert split["total"] == 3.0
    assert split["seconds"]["training"] == 1.5 and split["seconds"]["cpms"] == 0.12
    assert split["seconds"]["other"] == pytest.approx(1.38)
    assert split["percent"]["training"] == 50.0 and split["percent"]["cpms"] == 4.11
    short = sw.split(1.0)  # the parts took more than the total given: nothing is left over
    assert short["seconds"]["other"] == 0.0 and short["percent"]["other"] == 0.0
    assert sw.split(0.0)["percent"] == dict.fromkeys([*PARTS, "other"], 0.0)

"""The recent rates in the live figures: over about the last window, following a stage that stalls."""
from pipeline_cluster.stats import RecentRates


def _figures(items_in, items_out):
    return {"parse": {"items_in": items_in, "items_out": items_out}}


def test_the_first_snapshot_has_no_recent_rate_and_later_ones_use_the_oldest_within_the_window():
    rates = RecentRates(window=5.0)
    first = _figures(100, 90)
    rates.add(10.0, first)
    assert first["parse"]["out_per_s_recent"] is None
    second = _figures(300, 290)
    rates.add(12.0, second)  # only 2 s of history: the rate over those
    assert second["parse"]["in_per_s_recent"] == 100.0 and second["parse"]["out_per_s_recent"] == 100.0


def test_a_stall_shows_as_zero_once_the_window_has_passed_while_the_old_counts_age_out():
    rates = RecentRates(window=5.0)
    for second, out in ((0.0, 0), (2.0, 200), (4.0, 400), (6.0, 600)):  # 100 items/s
        rates.add(second, _figures(out, out))
    stalled = _figures(600, 600)
    rates.add(8.0, stalled)  # base: the snapshot at 2.0, the newest one at least 5 s old
    assert stalled["parse"]["out_per_s_recent"] == (600 - 200) / 6.0
    later = _figures(600, 600)
    rates.add(11.0, later)  # base: 6.0, since when nothing came out
    assert later["parse"]["out_per_s_recent"] == 0.0


def test_a_new_run_starts_its_rates_afresh():
    rates = RecentRates(window=5.0)
    rates.add(0.0, _figures(1000, 1000))
    rates.add(1.0, _figures(1200, 1200))
    new_run = _figures(10, 5)  # counts went down: another run
    rates.add(2.0, new_run)
    assert new_run["parse"]["out_per_s_recent"] is None
    then = _figures(110, 105)
    rates.add(4.0, then)
    assert then["parse"]["out_per_s_recent"] == 50.0

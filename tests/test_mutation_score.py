"""The mutation-score tally (tests/mutation_score.py) on lines in mutmut 3's format, and the test order
used inside mutmut's workers (tests/conftest.py)."""
import collections
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("mutation_score", Path(__file__).with_name("mutation_score.py"))
mutation_score = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutation_score)


def test_tally_groups_by_module_and_scores_killed_over_checked():
    lines = ["    eval.protocol.x_parse_worker__mutmut_7: survived",
             "    eval.protocol.x_shard_path__mutmut_1: killed",
             "    eval.protocol.x_shard_path__mutmut_2: timeout",
             "    magnet_mi_jax.attacks.common.xǁplatform_jitǁ__call__mutmut_3: not checked",
             "    magnet_mi_jax.attacks.common.x_check__mutmut_4: killed",
             "some other line mutmut prints"]
    counts, survivors = mutation_score.tally(lines)
    assert counts == {"eval.protocol": collections.Counter(survived=1, killed=1, timeout=1),
                      "magnet_mi_jax.attacks.common": collections.Counter({"not checked": 1, "killed": 1})}
    assert survivors == ["eval.protocol.x_parse_worker__mutmut_7"]
    rows = mutation_score.table(counts).splitlines()
    assert rows[2] == "| `eval.protocol` | 3 | 3 | 1 | 1 | 1 | 0 | 66.7% | 20.8-93.9% |"
    assert rows[3] == "| `magnet_mi_jax.attacks.common` | 2 | 1 | 1 | 0 | 0 | 1 | 100.0% | 20.7-100.0% |"
    assert rows[4] == "| **all** | 5 | 4 | 2 | 1 | 1 | 1 | 75.0% | 30.1-95.4% |"


def test_fastest_files_first_keeps_files_whole_and_orders_them_by_recorded_time():
    from conftest import fastest_files_first

    Item = collections.namedtuple("Item", "nodeid")
    given = [Item("tests/test_tables.py::a"), Item("tests/test_mi.py::b"), Item("tests/test_tables.py::c"),
             Item("tests/test_new.py::e"), Item("tests/test_mi.py::d"), Item("tests/test_free.py::f")]
    seconds = {"tests/test_tables.py::a": 300.0, "tests/test_tables.py::c": 15.0, "tests/test_mi.py::b": 2.0,
               "tests/test_mi.py::d": 1.0}  # test_new and test_free never timed: 0 s, first seen first
    ordered = [item.nodeid for item in fastest_files_first(given, seconds)]
    assert ordered == ["tests/test_new.py::e", "tests/test_free.py::f", "tests/test_mi.py::b",
                       "tests/test_mi.py::d", "tests/test_tables.py::a", "tests/test_tables.py::c"]


def test_sample_draws_reproducibly_from_unchecked_mutants_of_the_module():
    lines = [f"    magnet_mi_jax.attacks._ead.x_ead__mutmut_{i}: not checked" for i in range(50)]
    lines += [f"    magnet_mi_jax.attacks._cw.x_adam__mutmut_{i}: killed" for i in range(20)]
    lines += [f"    magnet_mi_jax.detectors.mi.x_entropy__mutmut_{i}: not checked" for i in range(30)]
    drawn = mutation_score.sample(lines, 10, seed=3, module_prefix="magnet_mi_jax.attacks")
    assert drawn == mutation_score.sample(lines, 10, seed=3, module_prefix="magnet_mi_jax.attacks")
    assert drawn != mutation_score.sample(lines, 10, seed=4, module_prefix="magnet_mi_jax.attacks")
    assert len(set(drawn)) == 10 and all(".attacks._ead.x_ead__mutmut_" in name for name in drawn)
    assert len(mutation_score.sample(lines, 80, seed=0)) == 80  # every module: 50 + 30 unchecked
    with pytest.raises(ValueError, match="only 50"):
        mutation_score.sample(lines, 51, seed=0, module_prefix="magnet_mi_jax.attacks")


def test_wilson_interval_known_values():
    # Wilson's formula by hand: p = 0.9, n = 100 -> centre (p + z^2/2n) / (1 + z^2/n), half-width as below
    z = 1.959964
    centre = (0.9 + z * z / 200) / (1 + z * z / 100)
    half = z / (1 + z * z / 100) * (0.9 * 0.1 / 100 + z * z / 40000) ** 0.5
    low, high = mutation_score.wilson_interval(90, 100)
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert mutation_score.wilson_interval(10, 10)[1] == pytest.approx(1.0)

"""The mutation-score tally (tests/mutation_score.py) on lines in mutmut 3's format."""
import collections
import importlib.util
from pathlib import Path

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
    assert rows[2] == "| `eval.protocol` | 3 | 3 | 1 | 1 | 1 | 0 | 66.7% |"
    assert rows[3] == "| `magnet_mi_jax.attacks.common` | 2 | 1 | 1 | 0 | 0 | 1 | 100.0% |"
    assert rows[4] == "| **all** | 5 | 4 | 2 | 1 | 1 | 1 | 75.0% |"

"""The mutation score per module, as a Markdown table, from mutmut's committed verdicts (docs/testing.md).

Run from the repository root after (or during) ``mutmut run``::

    python tests/mutation_score.py            # the table
    python tests/mutation_score.py --survivors  # and the name of every surviving mutant
    mutmut run $(python tests/mutation_score.py --sample 100 --seed 0 --module magnet_mi_jax.attacks)

The last form checks a uniform random sample of the mutants not checked yet (here 100 of the attack modules'),
named to ``mutmut run``: when checking every mutant of a module costs more CPU hours than there are, the killed
fraction of a random sample estimates the module's score. The table's 95% interval (Wilson's) is that
estimate's uncertainty; it is meaningful where the checked mutants are such a sample (or all of the module).

The score is killed / checked, where a mutant counts as killed when a test failed (mutmut's "killed") or the
tests ran past their allowance ("timeout": the mutant made them hang or crawl); "not checked" mutants are
listed but count on neither side.
"""
from __future__ import annotations

import argparse
import collections
import random
import re
import subprocess
import sys

import scipy.stats

# mutmut's names: <module>.x_<function>__mutmut_<n> or <module>.xǁ<Class>ǁ<method>__mutmut_<n>
_LINE = re.compile(r"^\s*(?P<name>(?P<module>[\w.]+?)\.x[_ǁ]\S*__mutmut_\d+): (?P<status>.+)$")
KILLED = ("killed", "timeout")


def tally(lines: list[str]) -> tuple[dict[str, collections.Counter], list[str]]:
    """``({module: Counter(status)}, survivors)`` from the lines of ``mutmut results --all true``."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    for line in lines:
        match = _LINE.match(line)
        if match is None:
            continue
        counts[match["module"]][match["status"]] += 1
        if match["status"] == "survived":
            survivors.append(match["name"])
    return dict(counts), survivors


def sample(lines: list[str], size: int, seed: int, module_prefix: str = "") -> list[str]:
    """``size`` names drawn uniformly without replacement (``random.Random(seed)``) from the "not checked"
    mutants of the modules whose name starts with ``module_prefix``, in sorted order: the same lines, size and
    seed always name the same mutants."""
    unchecked = sorted(match["name"] for match in map(_LINE.match, lines)
                       if match and match["status"] == "not checked" and match["module"].startswith(module_prefix))
    if size > len(unchecked):
        raise ValueError(f"asked for {size} mutants, but only {len(unchecked)} under {module_prefix!r} are not "
                         "checked")
    return sorted(random.Random(seed).sample(unchecked, size))


def wilson_interval(killed: int, checked: int) -> tuple[float, float]:
    """Wilson's 95% score interval for the killed fraction (SciPy's ``binomtest``), in [0, 1]."""
    interval = scipy.stats.binomtest(killed, checked).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def table(counts: dict[str, collections.Counter]) -> str:
    rows = ["| module | mutants | checked | killed | timeout | survived | not checked | score | 95% interval |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    total: collections.Counter = collections.Counter()
    for module in sorted(counts):
        total.update(counts[module])
        rows.append(_row(f"`{module}`", counts[module]))
    rows.append(_row("**all**", total))
    return "\n".join(rows)


def _row(label: str, c: collections.Counter) -> str:
    mutants = sum(c.values())
    checked = mutants - c["not checked"]
    killed = sum(c[s] for s in KILLED)
    score = f"{100.0 * killed / checked:.1f}%" if checked else "-"
    interval = "{:.1f}-{:.1f}%".format(*(100 * b for b in wilson_interval(killed, checked))) if checked else "-"
    return (f"| {label} | {mutants} | {checked} | {c['killed']} | {c['timeout']} | {c['survived']} | "
            f"{c['not checked']} | {score} | {interval} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="also list every surviving mutant")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="instead, print N names drawn at random from the mutants not checked yet")
    parser.add_argument("--seed", type=int, default=0, help="the draw's seed (with --sample)")
    parser.add_argument("--module", default="", help="draw only from modules whose name starts with this")
    args = parser.parse_args(argv)
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"mutmut results failed ({out.returncode}): {out.stderr.strip()}")
    if args.sample is not None:
        try:
            print("\n".join(sample(out.stdout.splitlines(), args.sample, args.seed, args.module)))
        except ValueError as error:
            sys.exit(str(error))
        return
    counts, survivors = tally(out.stdout.splitlines())
    if not counts:
        sys.exit("mutmut results listed no mutants: run `mutmut run` first (docs/testing.md)")
    print(table(counts))
    if args.survivors:
        print("\nsurvivors:\n" + "\n".join(survivors))


if __name__ == "__main__":
    main()

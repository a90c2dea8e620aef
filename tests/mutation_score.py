"""The mutation score per module, as a Markdown table, from mutmut's committed verdicts (docs/testing.md).

Run from the repository root after (or during) ``mutmut run``::

    python tests/mutation_score.py            # the table
    python tests/mutation_score.py --survivors  # and the name of every surviving mutant

The score is killed / checked, where a mutant counts as killed when a test failed (mutmut's "killed") or the
tests ran past their allowance ("timeout": the mutant made them hang or crawl); "not checked" mutants are
listed but count on neither side.
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys

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


def table(counts: dict[str, collections.Counter]) -> str:
    rows = ["| module | mutants | checked | killed | timeout | survived | not checked | score |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
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
    return (f"| {label} | {mutants} | {checked} | {c['killed']} | {c['timeout']} | {c['survived']} | "
            f"{c['not checked']} | {score} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="also list every surviving mutant")
    args = parser.parse_args(argv)
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"mutmut results failed ({out.returncode}): {out.stderr.strip()}")
    counts, survivors = tally(out.stdout.splitlines())
    if not counts:
        sys.exit("mutmut results listed no mutants: run `mutmut run` first (docs/testing.md)")
    print(table(counts))
    if args.survivors:
        print("\nsurvivors:\n" + "\n".join(survivors))


if __name__ == "__main__":
    main()

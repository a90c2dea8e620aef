"""magnet_mi_jax.cli: every entry point that writes result files refuses to replace them without --overwrite, and
refuses before it computes anything."""

import importlib

import pytest

from magnet_mi_jax import cli, data


def test_refuse_to_overwrite_names_every_existing_output(tmp_path):
    a, b, missing = tmp_path / "a.json", tmp_path / "b.md", tmp_path / "c.png"
    a.write_text("{}")
    b.write_text("")
    cli.refuse_to_overwrite([missing, None], overwrite=False)            # nothing there: no objection
    with pytest.raises(cli.OverwriteError) as err:
        cli.refuse_to_overwrite([a, missing, b, None], overwrite=False)
    message = str(err.value)
    assert str(a) in message and str(b) in message and str(missing) not in message and "--overwrite" in message
    cli.refuse_to_overwrite([a, b], overwrite=True)


NOWHERE = "/nonexistent/magnet-mi-data"

# (module, arguments given the output folder, output files that must exist for the refusal, the error the same
# arguments raise with --overwrite: the bad input that proves the refusal came before any work; None: not run)
ENTRY_POINTS = [
    ("eval.figure_generator", lambda d: ["--dataset", "mnist", "--source", "files", "--data-dir", NOWHERE,
                                         "--out", str(d / "fig.png")], ["fig.json"], data.DataError),
    ("eval.magnet_clean", lambda d: ["--dataset", "mnist", "--source", "files", "--data-dir", NOWHERE,
                                     "--json", str(d / "clean.json")], ["clean.json"], data.DataError),
    ("eval.detector_auc", lambda d: ["--dataset", "mnist", "--results", str(d)], ["detector_auc.md"], SystemExit),
    ("eval.compare_classifiers", lambda d: ["--dataset", "mnist", "--source", "files", "--data-dir", NOWHERE,
                                            "--models", f"a={NOWHERE}", "--out", str(d)], ["margins.png"], SystemExit),
    ("eval.bench_attacks", lambda d: ["--no-foolbox", "--images", "1", "--iterations", "1", "--search-steps", "1",
                                      "--data-dir", NOWHERE, "--json", str(d / "bench.json")], ["bench.json"],
     data.DataError),
    ("eval.probe_layers", lambda d: ["--train-step", "--repeats", "1", "--json", str(d / "probe.json")],
     ["probe.json"], None),
    ("train.lr_range", lambda d: ["--dataset", "mnist", "--source", "files", "--data-dir", NOWHERE,
                                  "--json", str(d / "lr.json")], ["lr.json"], data.DataError),
]


@pytest.mark.parametrize("module, argv, outputs, then", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_entry_points_refuse_to_replace_results(tmp_path, module, argv, outputs, then):
    main = importlib.import_module(module).main
    for name in outputs:
        (tmp_path / name).write_text("committed result")
    with pytest.raises(cli.OverwriteError, match="already exist"):
        main(argv(tmp_path))
    assert all((tmp_path / name).read_text() == "committed result" for name in outputs)
    if then is not None:                       # with --overwrite it goes on, and stops at the bad input
        with pytest.raises(then) as err:
            main([*argv(tmp_path), "--overwrite"])
        assert not isinstance(err.value, cli.OverwriteError)


def test_run_main_records_the_commit_the_command_started_at(monkeypatch):
    """A command that runs for hours while commits land records the commit it started at, not HEAD at its end
    (found: a CIFAR-10 evaluation named a README commit made while it ran)."""
    monkeypatch.setattr(cli, "_commit_at_start", None)
    head = {"now": "started-here"}
    monkeypatch.setattr(cli, "git_commit", lambda: head["now"])
    recorded = []

    def long_command():
        head["now"] = "committed-meanwhile"           # someone commits while the command runs
        recorded.append(cli.provenance("python -m eval.something")["git_commit"])

    cli.run_main(long_command)
    assert recorded == ["started-here"]
    cli.run_main(long_command)                          # the next command starts at the new HEAD
    assert recorded == ["started-here", "committed-meanwhile"]
    assert cli.provenance("x", commit="given")["git_commit"] == "given"

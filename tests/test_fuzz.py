"""A fuzz of the whole input surface: every config key and the commands' name and path arguments.

For any input the CLI either starts the work (here: reaches the point where a run would train, which the
test stops) or ends before any work with exit code 2 and one ``error:`` line; never a traceback, and
nothing written outside the directories the command was given. ``make test`` draws a bounded number of
examples; ``make drill`` draws many more (``ILORA_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ilora.cli as cli
import ilora.sweep as sweep_module
from ilora.config import PUBLIC_KEYS

EXAMPLES = int(os.environ.get("ILORA_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Started(Exception):
    """Raised where a run would start training: the input was accepted."""


# strings a user or a caller might give where a name or a path is expected
NASTY_STRINGS = st.one_of(
    st.sampled_from(["", ".", "..", "../..", "../../escaped", "/etc", "/tmp/x", "a/b", "a\\b", "~", "~root",
                     ".hidden", "-x", "--force", "nul\x00byte", "é", "名前", "a b", "a\nb", "$HOME", "${oc.env:HOME}",
                     "x" * 300, "fedit", "bbc_news", "smoke", "compare", "all", "cpu", "1e400", "-0", "nan"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
)
NUMBERS = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2**63, 1e-320, 1e308]))
VALUES = st.one_of(
    NUMBERS.map(str), NASTY_STRINGS, st.booleans().map(str).map(str.lower), st.just("null"),
    st.lists(st.integers(-5, 1000), max_size=6).map(lambda v: "[" + ",".join(map(str, v)) + "]"),
    st.sampled_from(["{}", "{a: 1}", "[[1]]", "[a, b]", "'quoted'", '"dq"', "???", "${nope}"]),
)
KEYS = st.one_of(st.sampled_from(PUBLIC_KEYS), st.sampled_from(["method_args.init", "method_args.factor_split",
                                                                  "method_args.nope", "config", "nope"]))


def _files(root: Path, skip: tuple[Path, ...]) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not any(p.is_relative_to(s) for s in skip)}


def _check(argv: list[str], root: Path, allowed: tuple[Path, ...], capsys, monkeypatch) -> None:
    """Run the CLI on ``argv`` and assert the contract (see the module docstring)."""
    allowed = (*allowed, root / "work" / "home")  # the user's own caches (data, partitions) live under HOME
    before = _files(root, allowed)
    try:
        code = cli.main(argv)
    except Started:
        code = None
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    else:
        assert code in (None, 0, 1), (argv, code, err)
    assert _files(root, allowed) == before, (argv, "wrote outside the directories it was given")


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory and a HOME of its own; runs stop where they would train."""
    work = tmp_path / "work"
    (work / "home").mkdir(parents=True)
    (work / "a_file").write_text("x")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work / "home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(cli, "_run_locked", started)
    monkeypatch.setattr(sweep_module, "_execute", started)  # a sweep's (or compare's) runs, in-process
    return tmp_path


@FUZZ
@given(overrides=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
def test_any_config_key_and_value_starts_the_run_or_ends_in_one_line(overrides, sandbox, capsys, monkeypatch):
    out = sandbox / "work" / "runs"
    argv = ["run", "preset=smoke", f"out_dir={out}", *(f"{k}={v}" for k, v in overrides)]
    _check(argv, sandbox, (out,), capsys, monkeypatch)


@FUZZ
@given(name=NASTY_STRINGS, other=NASTY_STRINGS,
       command=st.sampled_from(["sweep", "report", "compare", "export", "eval", "data", "run-cell"]))
def test_any_name_or_path_argument_ends_cleanly_and_writes_only_where_it_was_told(
        name, other, command, sandbox, capsys, monkeypatch):
    work = sandbox / "work"
    runs, results = work / "runs", work / "results"
    argv = {
        "sweep": ["sweep", name, "--preset", "smoke", "--plan", "--out-dir", str(runs)],
        "report": ["report", name, "--preset", "smoke", "--out-dir", str(runs), "--results-dir", str(results)],
        "compare": ["compare", "--benchmark", name, "--preset", "smoke", "--out-dir", str(runs),
                    "--results-dir", str(results)],
        "export": ["export", name, "--out", other],
        "eval": ["eval", name],
        "data": ["data", "show", name],
        "run-cell": ["run", "--benchmark", name, "--preset", "smoke", f"method={other}", f"out_dir={runs}"],
    }[command]
    if "\x00" in "".join(argv):  # the OS refuses a NUL in an argument before the CLI ever sees it
        return
    _check(argv, sandbox, (runs, results), capsys, monkeypatch)

"""Every command shown in README.md and docs/*.md runs, at smoke size where it trains (``make drill``).

The commands are read from the documents' code blocks, in order, and run in one scratch directory:
``ilora`` commands with ``--preset smoke`` / ``preset=smoke`` in place of cpu and paper, ``make``
targets as the ``ilora`` commands their recipes run (``make -n``) with ``PRESET=smoke``. Left out:
installing (``make install``), the test targets themselves, and ``ilora data prepare`` (it downloads).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = (r"^make (install|test|drill|lint|perf|clean)\b", r"^ilora data prepare\b")
ILORA = [sys.executable, "-m", "ilora.cli"]


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every ``ilora``/``make`` line of a bash code block, comments removed."""
    found = []
    for doc in DOCS:
        for language, block in re.findall(r"```(\w*)\n(.*?)```", doc.read_text(), re.S):
            if language not in ("", "bash", "sh"):
                continue
            for line in block.splitlines():
                command = re.split(r"\s+#", line.strip(), maxsplit=1)[0].strip()
                command = re.sub(r"^\.venv/bin/", "", command)
                if re.match(r"^(ilora|make) ", command) and not any(re.match(s, command) for s in SKIP):
                    found.append((doc.name, command))
    return found


def at_smoke(command: str) -> list[list[str]]:
    """The argv lists that run ``command`` at smoke size."""
    words = shlex.split(command)
    if words[0] == "make":
        variables = [w for w in words[1:] if "=" in w and not w.startswith("PRESET=")]
        targets = [w for w in words[1:] if "=" not in w]
        recipe = subprocess.run(["make", "-s", "-n", *targets, "PRESET=smoke", "JOBS=2", *variables], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
        lines = [re.sub(r"^(\w+=\S+\s+)*", "", line).strip() for line in recipe.splitlines() if "ilora" in line]
        return [[sys.executable, *shlex.split(line)[1:]] if " -m ilora." in line else ILORA + shlex.split(line)[1:]
                for line in lines]
    args = words[1:]
    args = [re.sub(r"^preset=(cpu|paper)$", "preset=smoke", a) for a in args]
    for i, a in enumerate(args):
        if a == "--preset" and i + 1 < len(args):
            args[i + 1] = "smoke"
    if args[0] == "run" and "--benchmark" not in args and not any(a.startswith("preset=") for a in args):
        args.append("preset=smoke")
    if args[0] in ("sweep", "report", "compare") and "--preset" not in args:
        args += ["--preset", "smoke"]
    return [ILORA + args]


COMMANDS = documented_commands()


def test_the_documents_show_commands_of_every_kind():
    kinds = {c.split()[1] if c.startswith("ilora") else "make" for _, c in COMMANDS}
    assert {"run", "sweep", "report", "compare", "list", "data", "make"} <= kinds


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("docs")


@pytest.mark.docs
@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}: {c}" for d, c in COMMANDS])
def test_documented_command_runs(doc, command, scratch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_SILENT": "true"}
    for argv in at_smoke(command):
        done = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{doc}: `{command}` ran as {argv[3:]} and exited {done.returncode}:\n" \
                                     f"{done.stderr[-2000:]}"

"""The bad-input drill: every command given a bad input ends before any work, in one line.

Each case runs the ``ilora`` entry point in a fresh working directory and checks: exit code 2, exactly
one line on stderr starting with ``error:`` and naming the field, no traceback, nothing on stdout, and
nothing written (the working directory and the given out dir stay as they were).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ilora.cli import main

# (argv, a fragment the one-line error must contain). ``{tmp}`` is the case's working directory.
CASES: list[tuple[list[str], str]] = [
    # run: the run settings
    (["run", "method=nope"], "unknown method 'nope'"),
    (["run", "dataset=nope"], "unknown dataset 'nope'"),
    (["run", "model=nope"], "unknown model 'nope'"),
    (["run", "preset=nope"], "unknown preset 'nope'"),
    (["run", "optimizer=rmsprop"], "unknown optimizer 'rmsprop'"),
    (["run", "partition=nope"], "unknown partition 'nope'"),
    (["run", "wandb=sometimes"], "unknown wandb 'sometimes'"),
    (["run", "engine=flwr"], "unknown engine 'flwr' (valid: inprocess, flower)"),
    (["run", "export=onnx"], "unknown export 'onnx' (valid: none, peft, merged)"),
    (["run", "flower_client_cpus=0"], "flower_client_cpus and flower_timeout must be positive"),
    (["run", "flower_timeout=-1"], "flower_client_cpus and flower_timeout must be positive"),
    (["run", "flower_client_gpus=-1"], "flower_client_gpus non-negative"),
    (["run", "flower_min_clients=0"], "flower_min_clients must be a positive integer or null"),
    (["run", "engine=flower", "method=fedit", "method_args.authors_merged_base=true"],
     "authors_merged_base runs only in-process"),
    (["run", "num_clients=0"], "num_clients must be at least 1"),
    (["run", "ranks=[2,4]"], "ranks has 2 entries but num_clients is 3"),
    (["run", "ranks=[0,4,6]"], "ranks must all be positive"),
    (["run", "lora_alpha=0"], "lora_alpha must be positive"),
    (["run", "participation=0"], "participation must be in (0, 1]"),
    (["run", "participation=1.5"], "participation must be in (0, 1]"),
    # run: names that become paths stay inside their directory
    (["run", "preset=smoke", "run_id=../../escaped"], "run_id '../../escaped' must be a plain name"),
    (["run", "preset=smoke", "run_id=/tmp/escaped"], "run_id '/tmp/escaped' must be a plain name"),
    (["run", "preset=smoke", "run_id=a/b"], "run_id 'a/b' must be a plain name"),
    (["run", "preset=smoke", "run_id=.hidden"], "run_id '.hidden' must be a plain name"),
    (["run", "dataset=../../configs/preset/cpu"], "dataset '../../configs/preset/cpu' must be a plain name"),
    (["run", "method=fedit/../../x"], "method 'fedit/../../x' must be a plain name"),
    # run: sizes and ranges against the backbone, before any work
    (["run", "preset=smoke", "max_length=4096"], "max_length 4096 exceeds minilm's 512 position embeddings"),
    (["run", "preset=smoke", "max_length=0"], "max_length must be at least 1"),
    (["run", "preset=smoke", "momentum=2"], "momentum must be in [0, 1)"),
    (["run", "preset=smoke", "momentum=1"], "momentum must be in [0, 1)"),
    (["run", "preset=smoke", "ranks=[2,4,500]"], "ranks: rank 500 exceeds 384"),
    (["run", "preset=smoke", "model=efficientnet_lite0", "dataset=fashion_mnist", "ranks=32"], "rank 32 exceeds 16"),
    (["run", "model=vit_base", "dataset=cifar10", "image_size=100"], "image_size 100 is not accepted by vit_base"),
    (["run", "model=swin_base", "dataset=cifar10", "image_size=256"], "image_size 256 is not accepted by swin_base"),
    (["run", "min_partition_size=0"], "min_partition_size and classes_per_client must be at least 1"),
    (["run", "rounds=0"], "rounds must be at least 1"),
    (["run", "local_epochs=0"], "local_epochs must be at least 1"),
    (["run", "batch_size=0"], "batch_size must be at least 1"),
    (["run", "eval_batch_size=0"], "eval_batch_size must be at least 1"),
    (["run", "lr=0"], "lr must be positive"),
    (["run", "lr=nan"], "lr must be a finite number"),
    (["run", "lr=inf"], "lr must be a finite number"),
    (["run", "weight_decay=-inf"], "weight_decay must be a finite number"),
    (["run", "momentum=-1"], "momentum must be in [0, 1)"),
    (["run", "weight_decay=-1"], "weight_decay must be non-negative"),
    (["run", "grad_clip=0"], "grad_clip positive"),
    (["run", "dirichlet_alpha=0"], "dirichlet_alpha must be positive"),
    (["run", "lora_dropout=1"], "lora_dropout must be in [0, 1)"),
    (["run", "device=tpu"], "unknown device 'tpu'"),
    (["run", "device=cuda", "wandb=offline"], "CUDA is not available"),
    (["run", "threads=zero"], "threads must be auto or a positive integer"),
    (["run", "local_steps=0"], "local_steps must be a positive integer"),
    (["run", "image_size=0"], "image_size must be a positive integer"),
    (["run", "max_train_samples=-5"], "max_train_samples must be a positive integer"),
    (["run", "out_dir={tmp}/a_file"], "out_dir"),
    (["run", "out_dir={tmp}/a_file/below"], "is not a directory"),
    (["run", "wandb=online"], "wandb=online needs a W&B API key"),
    (["run", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["run", "rounds"], "override 'rounds' is not key=value"),
    (["run", "config={tmp}/missing.yaml"], "file not found"),
    (["run", "ranks=[a"], "cannot parse overrides"),
    (["run", "dataset=fashion_mnist"], "fashion_mnist"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    # run: a method's options
    (["run", "method_args.nope=1"], "no option 'nope'"),
    (["run", "method=lora_fair", "method_args.correction=bogus"], "unknown correction 'bogus'"),
    (["run", "method=lora_fair", "method_args.lam=abc"], "lam must be a finite number"),
    (["run", "method=hetlora", "method_args.gamma=2"], "gamma must be in (0, 1)"),
    (["run", "method=flora", "method_args.control_variates=true"], "no option 'control_variates'"),
    (["run", "method=ilora", "method_args.qr_mode=rrqr"], "unknown qr_mode 'rrqr'"),
    (["run", "method=fedit", "method_args.control_variates=maybe"], "control_variates must be true or false"),
    (["run", "method=fed_sb", "method_args.init_samples=0"], "init_samples must be at least 1"),
    # export
    (["export", "{tmp}"], "holds no result.json"),
    (["export", "{tmp}/missing_run"], "holds no result.json"),
    (["export", "{tmp}", "--format", "onnx"], "argument --format: invalid choice: 'onnx'"),
    # sweep
    (["sweep", "nope", "--preset", "smoke"], "unknown benchmark 'nope'"),
    (["sweep", "all", "--preset", "nope"], "unknown preset 'nope'"),
    (["sweep", "all", "--preset", "smoke", "--jobs", "0"], "--jobs must be at least 1"),
    (["sweep", "all", "--preset", "smoke", "--bogus"], "unrecognized arguments: --bogus"),
    (["sweep", "all", "--preset", "smoke", "rounds=0"], "rounds must be at least 1"),
    (["sweep", "nlp_dirichlet05", "--preset", "smoke", "--out-dir", "{tmp}/a_file"], "out_dir"),
    (["sweep", "all", "--preset", "smoke", "--backend", "slurm"],
     "argument --backend: invalid choice: 'slurm' (choose from"),
    (["sweep", "all", "--preset", "smoke", "--address", "127.0.0.1:6379"],
     "need --backend ray (valid backends: local, ray)"),
    (["sweep", "all", "--preset", "smoke", "--backend", "ray", "--address", "127.0.0.1:1"],
     "--address 127.0.0.1:1: no Ray cluster answers there"),
    (["sweep", "all", "--preset", "smoke", "--backend", "ray", "--address", "head-node"],
     "--address 'head-node' is not HOST:PORT"),
    (["sweep", "all", "--preset", "smoke", "--backend", "ray", "--cpus-per-run", "0"],
     "--cpus-per-run must be at least 1"),
    # report
    (["report", "all", "--preset", "cpu", "--out-dir", "{tmp}/nothing_here"], "no results records"),
    (["report", "all", "--preset", "cpu", "--out-dir", "{tmp}/empty"], "no results records under"),
    (["report", "nope"], "unknown benchmark 'nope'"),
    (["report", "../benchmarks/compare"], "unknown benchmark '../benchmarks/compare'"),
    (["sweep", "{tmp}/evil.yaml", "--preset", "smoke"], "name '../../evil' must be a plain name"),
    (["export", "{tmp}/nothing_here", "--out", "{tmp}/a_file/x"], "--out '{tmp}/a_file/x' is not a directory"),
    (["report", "all", "--preset", "nope"], "unknown preset 'nope'"),
    (["report", "all", "--preset", "smoke", "--wandb", "sometimes"], "argument --wandb: invalid choice: 'sometimes'"),
    (["report", "all", "--preset", "smoke", "--wandb", "online"], "--wandb online needs a W&B API key"),
    (["report", "all", "--preset", "smoke", "--wandb", "--wandb-dir", "{tmp}/a_file"], "--wandb-dir"),
    (["sweep", "all", "--preset", "smoke", "--wandb", "offline"], "--wandb logs the report: give --report too"),
    # compare
    (["compare", "--preset", "nope"], "unknown preset 'nope'"),
    (["compare", "--benchmark", "nope"], "unknown benchmark 'nope'"),
    (["compare", "--preset", "smoke", "lr=-1"], "lr must be positive"),
    (["compare", "--preset", "smoke", "--jobs", "0"], "--jobs must be at least 1"),
    (["compare", "--preset", "smoke", "--backend", "ray", "--address", "127.0.0.1:1"], "no Ray cluster answers there"),
    # data
    (["data", "show", "nope"], "unknown dataset 'nope'"),
    (["data", "show", "bbc_news", "dirichlet_alpha=-1"], "dirichlet_alpha must be positive"),
    (["data", "prepare", "nope"], "nope"),
    (["data"], "the following arguments are required"),
    # list
    (["list", "extra=1"], "unrecognized arguments: extra=1"),
]


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_ends_in_one_line_exit_2_and_writes_nothing(argv, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no W&B key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "evil.yaml").write_text("name: ../../evil\npresets: {smoke: {grid: {method: [fedit]}}}\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "home").mkdir()
    before = snapshot(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment.replace("{tmp}", str(tmp_path)) in lines[0]
    assert "Traceback" not in err and out == ""
    assert snapshot(tmp_path) == before
    assert not Path(os.getcwd(), "runs").exists()


def test_the_drill_covers_at_least_forty_inputs_across_the_commands():
    assert len(CASES) >= 40
    assert {a[0] for a, _ in CASES} >= {"run", "sweep", "report", "compare", "data"}

"""The reliability matrix: every failure a user can cause is exit code 1 and one `jsft: error:` line
naming the file, key or path, with no traceback, found before the slow work where it can be, and
leaving nothing behind that breaks the next run."""

import json
import math
import os
import shutil
import sys

import pytest

from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny_config.py")
QUICK = ["--config.train.eval_every_steps=0", "--config.train.log_every_steps=1"]


def _run(args, timeout=300):
    return zygote.run(
        [sys.executable, "-m", "jsft.main", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def _tiny(data_dir, workdir, *overrides):
    return [f"--config={TINY}:{data_dir}", f"--workdir={workdir}", *overrides]


def _error_line(r) -> str:
    """The single error line; asserts exit code 1 and that no traceback reached the console."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("jsft: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def _strict_rows(path):
    def no_nan(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=no_nan) for line in open(path).read().splitlines()]


# ------------------------------------------------------------------ config, flags, workdir (seconds)


@pytest.mark.parametrize("form", ["--config=PATH", "--config PATH"])
def test_a_missing_config_file(form, tmp_path):
    args = form.replace("PATH", "configs/nope.py").split(" ")
    line = _error_line(_run([*args, f"--workdir={tmp_path / 'wd'}"]))
    assert "--config=configs/nope.py: no such file" in line


@pytest.mark.parametrize(
    "body, expected",
    [
        ("X = 1\n", "defines no get_config()"),
        ("import not_a_module_xyz\n\ndef get_config():\n    pass\n", "No module named 'not_a_module_xyz'"),
        ("def get_config():\n    raise RuntimeError('broken on purpose')\n", "broken on purpose"),
        # A misspelled field read inside get_config is the file's error, not an override's.
        (
            "import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'a': 1}).b\n",
            "'b'",
        ),
        ("import os\n\ndef get_config():\n    return os.environ['JSFT_TEST_UNSET_VARIABLE']\n", "KeyError"),
    ],
)
def test_a_config_file_that_cannot_load_is_one_line_naming_it(body, expected, tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text(body)
    line = _error_line(_run([f"--config={path}", f"--workdir={tmp_path / 'wd'}"]))
    assert f"--config={path}" in line and expected in line


@pytest.mark.parametrize("module", ["jsft.main", "jsft.bench", "jsft.sweep", "jsft.study"])
def test_help_of_every_entry_point_exits_zero(module):
    r = zygote.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, (module, r.stderr[-2000:])
    assert "--" in r.stdout + r.stderr  # it printed the flags


def test_a_config_argument_the_file_does_not_know(tmp_path):
    line = _error_line(_run(["--config=configs/demo.py:bogus", f"--workdir={tmp_path / 'wd'}"]))
    assert "unknown argument 'bogus'" in line


def test_a_misspelled_field_is_named_alone(tiny_data_dir, tmp_path):
    many = [f"--config.optim.{k}=0.1" for k in ("lr", "b1", "weight_decay")] + ["--config.optim.lrr=1e-3"]
    line = _error_line(_run(_tiny(tiny_data_dir, tmp_path / "wd", *many, "--config.train.steps=5")))
    assert "--config.optim.lrr" in line and 'Did you mean "lr"' in line
    assert "--config.optim.b1" not in line and "--config.train.steps" not in line
    assert not (tmp_path / "wd").exists()


def test_a_bad_value_names_the_key(tiny_data_dir, tmp_path):
    line = _error_line(_run(_tiny(tiny_data_dir, tmp_path / "wd", "--config.train.on_nonfinite=ignore")))
    assert "config.train.on_nonfinite='ignore'" in line


def test_a_best_metric_nothing_reports(tiny_data_dir, tmp_path):
    line = _error_line(_run(_tiny(tiny_data_dir, tmp_path / "wd", "--config.train.best_metric=eval/acc")))
    assert "config.train.best_metric='eval/acc'" in line and "eval/loss" in line


def test_a_vocabulary_smaller_than_the_tokenizer_fails_before_tokenizing(tiny_data_dir, tmp_path):
    line = _error_line(_run(_tiny(tiny_data_dir, tmp_path / "wd", "--config.model.vocab_size=100")))
    assert "config.model.vocab_size=100" in line and "config.data.vocab_size=300" in line
    assert not (tmp_path / "wd" / "cache").exists()


@pytest.mark.parametrize("kind", ["a file", "a read-only directory", "an uncreatable directory"])
def test_a_workdir_that_cannot_be_written(kind, tiny_data_dir, tmp_path):
    if kind == "a file":
        workdir = tmp_path / "wd"
        workdir.write_text("not a directory")
    elif kind == "a read-only directory":
        workdir = "/sys/kernel"  # read-only even for root (tests run as root in CI)
    else:
        workdir = "/sys/jsft_workdir"
    line = _error_line(_run(_tiny(tiny_data_dir, workdir)))
    assert f"--workdir={workdir}" in line
    assert ("is a file" in line) if kind == "a file" else ("cannot write there" in line)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_workdir_without_permission(tiny_data_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = _error_line(_run(_tiny(tiny_data_dir, locked / "wd")))
    assert "cannot write there" in line


def test_a_config_with_required_fields_names_them(tmp_path):
    line = _error_line(_run(["--config=configs/hf_sft.py", f"--workdir={tmp_path / 'wd'}"]))
    assert "config.model.hf_path" in line and "config.data.sources.sft.path" in line
    assert not (tmp_path / "wd").exists()


# ------------------------------------------------------------------ numerics, checkpoints, resume


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_first_nonfinite_step_and_never_saves_it(tiny_data_dir, tmp_path):
    wd = tmp_path / "wd"
    over = ["--config.optim.lr=1e30", "--config.optim.clip_norm=0", "--config.train.checkpoint_every_steps=1"]
    line = _error_line(_run(_tiny(tiny_data_dir, wd, *QUICK, *over)))
    bad_step = int(line.split("not finite at step ")[1].split(";")[0])
    saved = sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
    assert saved and max(saved) < bad_step  # nothing at or after the bad step
    assert not [d for d in os.listdir(wd / "checkpoints") if "tmp" in d]  # no half-written save
    rows = _strict_rows(wd / "metrics.jsonl")
    assert max(r["step"] for r in rows) < bad_step

    # skip: the bad steps are dropped and counted, and the run stops after too many in a row.
    wd2 = tmp_path / "wd2"
    skip = [
        "--config.train.on_nonfinite=skip",
        "--config.train.max_skipped_steps=2",
        "--config.train.steps=20",
    ]
    line = _error_line(_run(_tiny(tiny_data_dir, wd2, *QUICK, *over, *skip)))
    assert "3 steps in a row" in line and "config.train.max_skipped_steps=2" in line
    rows = _strict_rows(wd2 / "metrics.jsonl")
    assert sum(r.get("train/skipped_steps", 0) for r in rows) >= 2
    saved = sorted(int(d) for d in os.listdir(wd2 / "checkpoints") if d.isdigit())
    assert saved and max(saved) < bad_step + 2


@pytest.mark.slow
def test_a_corrupted_latest_checkpoint_is_set_aside_and_the_run_resumes_exactly(tiny_data_dir, tmp_path):
    full, wd = tmp_path / "full", tmp_path / "wd"
    steps = ["--config.train.checkpoint_every_steps=2", "--config.train.keep_checkpoints=3"]
    assert _run(_tiny(tiny_data_dir, full, *QUICK, *steps)).returncode == 0
    r = _run(_tiny(tiny_data_dir, wd, *QUICK, *steps, "--config.train.stop_after_steps=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(wd / "checkpoints" / "4" / "state")  # the latest checkpoint is broken ...
    r = _run(_tiny(tiny_data_dir, wd, *QUICK, *steps))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "jsft: warning: checkpoint" in out and "Resuming from the checkpoint at step 2" in out
    assert os.listdir(tmp_path / "wd" / "checkpoints_corrupt")

    def losses(d):
        return {r["step"]: r["train/loss"] for r in _strict_rows(d / "metrics.jsonl") if "train/loss" in r}

    assert losses(wd) == losses(full)  # ... and the run goes on from step 2, bitwise as if uninterrupted

    for step in os.listdir(wd / "checkpoints"):  # every checkpoint broken: one line, nothing trained
        if step.isdigit():
            with open(wd / "checkpoints" / step / "data" / "metadata", "w") as f:
                f.write("{")
    line = _error_line(_run(_tiny(tiny_data_dir, wd, *QUICK, "--config.train.steps=8")))
    assert "no intact checkpoint in" in line and str(wd / "checkpoints") in line
    metrics = (wd / "metrics.jsonl").read_bytes()
    line = _error_line(_run(_tiny(tiny_data_dir, wd, *QUICK, "--config.train.steps=8")))
    assert "holds set-aside ones" in line  # the next run does not start afresh over them ...
    assert (wd / "metrics.jsonl").read_bytes() == metrics  # ... nor rewrite the run's metrics


def _files(directory) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return out


@pytest.mark.slow
def test_a_changed_config_on_resume_names_the_field_moves_nothing_and_the_old_config_resumes(
    tiny_data_dir, tmp_path
):
    full, wd = tmp_path / "full", tmp_path / "wd"
    steps = ["--config.train.checkpoint_every_steps=2", "--config.train.steps=6"]
    assert _run(_tiny(tiny_data_dir, full, *QUICK, *steps)).returncode == 0
    r = _run(_tiny(tiny_data_dir, wd, *QUICK, *steps, "--config.train.stop_after_steps=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoints, metrics = _files(wd / "checkpoints"), (wd / "metrics.jsonl").read_bytes()
    line = _error_line(_run(_tiny(tiny_data_dir, wd, *QUICK, *steps, "--config.model.mlp_dim=96")))
    assert "model.mlp_dim: 64 in the checkpoint, 96 now" in line and "Nothing was moved" in line
    assert _files(wd / "checkpoints") == checkpoints and not os.path.exists(wd / "checkpoints_corrupt")
    assert (wd / "metrics.jsonl").read_bytes() == metrics
    r = _run(_tiny(tiny_data_dir, wd, *QUICK, *steps))  # the original config resumes at step 4
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming from the checkpoint at step 4" in r.stdout + r.stderr

    def losses(d):
        return {r["step"]: r["train/loss"] for r in _strict_rows(d / "metrics.jsonl") if "train/loss" in r}

    assert losses(wd) == losses(full) and sorted(losses(full)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_resume_with_another_data_stream_names_what_changed(tiny_data_dir, tmp_path):
    wd = tmp_path / "wd"
    r = _run(_tiny(tiny_data_dir, wd, *QUICK, "--config.train.steps=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    line = _error_line(
        _run(_tiny(tiny_data_dir, wd, *QUICK, "--config.train.steps=4", "--config.data.batch_size=8"))
    )
    assert "data.batch_size: 4 -> 8" in line and "config.data.on_changed_data='restart'" in line
    shrunk = tmp_path / "shrunk"
    shrunk.mkdir()
    lines = (tiny_data_dir / "train.jsonl").read_text().splitlines()
    (shrunk / "train.jsonl").write_text("\n".join(lines[:100]) + "\n")
    (shrunk / "val.jsonl").write_text((tiny_data_dir / "val.jsonl").read_text())
    cmd = [f"--config={TINY}:{shrunk}", f"--workdir={wd}", *QUICK, "--config.train.steps=4"]
    line = _error_line(_run(cmd))
    assert "data.sources.demo.path" in line and "'records': " not in line and "records: 400 -> 100" in line
    r = _run([*cmd, "--config.data.on_changed_data=restart"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "starting the data afresh" in r.stdout + r.stderr
        and "Resuming from the checkpoint at step 2" in r.stdout + r.stderr
    )


def test_metrics_lines_are_strict_json():
    from jsft.train.writer import json_line

    row = json.loads(json_line(7, {"train/loss": math.nan, "eval/loss": math.inf, "ok": 1.5}))
    assert row == {
        "step": 7,
        "train/loss": None,
        "eval/loss": None,
        "ok": 1.5,
        "nonfinite": ["train/loss", "eval/loss"],
    }


# ------------------------------------------------------------------ tokenizer and model paths


def test_a_missing_tokenizer_path(tiny_data_dir, tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    line = _error_line(_run(_tiny(tiny_data_dir, tmp_path / "wd", f"--config.data.tokenizer={missing}")))
    assert "config.data.tokenizer" in line and str(missing) in line and "no such file" in line


def test_the_hf_template_with_a_tokenizer_that_has_none(tiny_data_dir, tmp_path):
    wd = tmp_path / "wd"
    r = _run(_tiny(tiny_data_dir, wd, *QUICK, "--config.train.steps=1"))  # trains a SentencePiece model
    assert r.returncode == 0, r.stderr[-3000:]
    line = _error_line(
        _run(
            _tiny(
                tiny_data_dir,
                tmp_path / "wd2",
                f"--config.data.tokenizer={wd / 'tokenizer.model'}",
                "--config.data.template=hf",
            )
        )
    )
    assert "config.data.template='hf'" in line and "chatml" in line


def test_an_hf_path_with_only_pickle_weights_fails_before_reading_data(tiny_data_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 320,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            }
        )
    )
    (model / "pytorch_model.bin").write_bytes(b"\0" * 64)
    line = _error_line(_run(_tiny(tiny_data_dir, tmp_path / "wd", f"--config.model.hf_path={model}")))
    assert "config.model.hf_path" in line and "safetensors" in line
    assert not (tmp_path / "wd" / "cache").exists()  # refused before any data was read


def test_a_configured_tokenizer_larger_than_the_model_fails_before_tokenizing(tiny_data_dir, tmp_path):
    wd = tmp_path / "wd"
    r = _run(_tiny(tiny_data_dir, wd, *QUICK, "--config.train.steps=1"))  # trains a 300-piece tokenizer
    assert r.returncode == 0, r.stderr[-3000:]
    over = [f"--config.data.tokenizer={wd / 'tokenizer.model'}", "--config.model.vocab_size=100"]
    line = _error_line(_run(_tiny(tiny_data_dir, tmp_path / "wd2", *over)))
    assert "config.model.vocab_size=100" in line and "300" in line
    assert not (tmp_path / "wd2" / "cache").exists()


def test_a_missing_eval_task_file(tiny_data_dir, tmp_path):
    line = _error_line(
        _run(_tiny(tiny_data_dir, tmp_path / "wd", "--config.eval.tasks.words.path=/no/such.jsonl"))
    )
    assert "config.eval.tasks.words.path='/no/such.jsonl'" in line


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    from jsft.train.writer import MetricWriter

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    writer = MetricWriter(str(tmp_path), enabled=True)
    writer.truncate_after(2)
    writer.write(3, {"a": 3.0})
    writer.close()
    assert [r["step"] for r in _strict_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]

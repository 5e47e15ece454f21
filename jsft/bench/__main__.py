"""Benchmarks: is the input pipeline fast enough to keep the train step busy? How fast do we decode?

    python -m jsft.bench data --config configs/demo.py [--config.data.seq_len=256] [--seconds 10]
    python -m jsft.bench data --config configs/demo.py --sizes_gb=0.05,0.2 --processes=1,2,4 --workers=0,2
    python -m jsft.bench generate --config configs/demo.py
    python -m jsft.bench train --config configs/bench_workload.py [--compare torch] [--json OUT]
    python -m jsft.bench peft --config configs/llama3_8b_sft.py:gpu1 --peft_what plan
    python -m jsft.bench peft --config configs/demo.py --peft_what steps --steps 20
    python -m jsft.bench best --config configs/bench_workload.py:llama1b [--workdir DIR]

`data` builds the configured data twice in a temporary workdir (the first build tokenizes, the
second hits the cache), pulls batches from the train stream for `--seconds`, then times the train
step on the same batch shape and prints one table with the ratio of the two rates. `generate` times
KV-cache decoding of the configured model at batch 1 and 16. `train` times the train step on the
shared peer workload (jsft/bench/train.py). `peft` compares full fine-tuning, a frozen subset, LoRA
and QLoRA: planner bytes, or step times on this machine (jsft/bench/peft.py). `best` measures how
long a new best evaluation stalls the train loop, on the configured model's full train state (weights
and AdamW moments): the former second, synchronous save against keeping the regular checkpoint
(jsft/bench/checkpoint.py). `data` is jsft/bench/data.py, `generate` jsft/bench/decode.py; `data` with
`--sizes_gb` is the streaming engine at scale (jsft/bench/data_scale.py): synthetic JSONL and Parquet
of each size, read by 1, 2, 4 local processes with K grain workers each.

This file only parses the flags and dispatches; each benchmark is imported once the flags are parsed
(`--help` loads no JAX).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jsft.errors import help_exits_zero

BENCHMARKS = ("data", "generate", "train", "peft", "best")

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file, e.g. configs/demo.py (optionally configs/demo.py:ARG).",
    lock_config=True,
)
_SECONDS = flags.DEFINE_float("seconds", 10.0, "How long to pull batches from the train stream.")
_STEPS = flags.DEFINE_integer("steps", 10, "Train steps timed (after one warm-up step).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 60, "train: steps on the workload rows (10 are warm-up).")
_ROWS = flags.DEFINE_enum(
    "rows", "packed", ["packed", "padded", "synthetic"], "train: the workload's rows, or random packed rows"
)
_COMPARE = flags.DEFINE_enum("compare", "", ["", "torch"], "train: also run the plain torch reference now.")
_JSON = flags.DEFINE_string("json", "", "train: write the result record (with the config) here.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "train: the device's peak TFLOP/s for MFU (0: known devices).")
_WORKDIR = flags.DEFINE_string("workdir", "", "best: where to write the checkpoints (default: a temp dir).")
_PEFT_WHAT = flags.DEFINE_enum("peft_what", "plan", ["plan", "steps"], "peft: planner bytes or step times.")
_SIZES = flags.DEFINE_list(
    "sizes_gb", [], "data: synthetic data sizes (GB) for the streaming engine at scale."
)
_PROCESSES = flags.DEFINE_list("processes", ["1", "2", "4"], "data --sizes_gb: local process counts.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "data --sizes_gb: grain workers per stream.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "data --sizes_gb: where the synthetic files go (default: temp)."
)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        given = f"got {argv[1:]}" if len(argv) > 1 else "got none"
        raise app.UsageError(
            f"name one benchmark of {list(BENCHMARKS)} ({given}), e.g. "
            "`python -m jsft.bench data --config configs/demo.py --seconds 10`"
        )
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        import datasets  # noqa: PLC0415

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    from jsft import config as config_lib  # noqa: PLC0415
    from jsft.errors import DataError  # noqa: PLC0415

    config = _CONFIG.value
    try:
        # train, peft: no data or checkpoint needed
        config_lib.validate(config, "plan" if argv[1] in ("train", "peft", "best") else "train")
        if argv[1] == "data" and _SIZES.value:
            from jsft.bench import data_scale  # noqa: PLC0415

            sizes, procs, workers = ([float(x) for x in f.value] for f in (_SIZES, _PROCESSES, _WORKERS))
            print(
                data_scale.bench_scale(
                    config.data.to_dict(),
                    sizes,
                    [int(p) for p in procs],
                    [int(k) for k in workers],
                    _SECONDS.value,
                    _DATA_DIR.value,
                )  # fmt: skip
            )
        elif argv[1] == "data":
            from jsft.bench import data  # noqa: PLC0415

            print(data.bench_data(config, _SECONDS.value, _STEPS.value))
        elif argv[1] == "generate":
            from jsft.bench import decode  # noqa: PLC0415

            print(decode.bench_generate(config))
        elif argv[1] == "peft":
            from jsft.bench import peft  # noqa: PLC0415

            if _PEFT_WHAT.value == "plan":
                from jsft.modes import plan  # noqa: PLC0415

                plan.simulate_devices(config)
                print(peft.plan_table(config))
            else:
                print(peft.step_table(config, _STEPS.value))
        elif argv[1] == "best":
            from jsft.bench import checkpoint  # noqa: PLC0415

            print(checkpoint.bench_best(config, _WORKDIR.value))
        else:
            from jsft.bench import train  # noqa: PLC0415

            print(
                train.train_table(
                    config, _TRAIN_STEPS.value, _ROWS.value, _PEAK.value, bool(_COMPARE.value), _JSON.value
                )
            )
    except (config_lib.ConfigError, DataError) as e:
        sys.exit(f"jsft: error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=help_exits_zero(app.parse_flags_with_usage))

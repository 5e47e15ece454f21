"""Command-line entry: `python -m jsft.main --config configs/demo.py --workdir DIR [--mode MODE]`.

Modes: `train` (the default), `inspect` (read and tokenize the data, write a report), `plan` (memory
plan for the mesh), `export` (a checkpoint as a Hugging Face model directory), `eval` (validation and
the eval suite on a checkpoint) and `generate` (outputs for a JSONL of prompts, or interactively).

Any config field can be overridden, e.g. `--config.optim.lr=3e-4`; a misspelled field is an error.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jsft import config as config_lib
from jsft.data.sources import DataError
from jsft.interop.hf import UnsupportedCheckpoint

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file, e.g. configs/demo.py (optionally configs/demo.py:ARG).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and metrics (all modes but plan)."
)
_MODE = flags.DEFINE_enum("mode", "train", list(config_lib.MODES), "What to do.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-process runs: HOST:PORT of process 0 (not needed on TPU pods/SLURM)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-process runs: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-process runs: this process's index.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", "", "--mode export: where to write the HF model directory.")
_EXPORT_STEP = flags.DEFINE_integer("export_step", 0, "--mode export: checkpoint step (0: the latest).")
_EXPORT_DTYPE = flags.DEFINE_string("export_dtype", "bfloat16", "--mode export: dtype of the safetensors.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "latest", "--mode eval/generate: latest, best, a step, or hf."
)
_PROMPTS = flags.DEFINE_string("prompts", "", "--mode generate: a JSONL of prompts (empty: read stdin).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "--mode generate: 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "--mode generate: top-k sampling (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "--mode generate: nucleus sampling (1: off).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0, "--mode generate: 0 takes config.eval.max_new_tokens.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax and JAX log every file operation at INFO; keep the console to what users act on.
        logging.set_verbosity(logging.WARNING)
        import datasets  # noqa: PLC0415

        datasets.disable_progress_bars()  # one line per source is printed instead
        datasets.logging.set_verbosity_error()
    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        sys.exit(f"jsft: error: {e}")
    logging.info("Config:\n%s", config)
    if _MODE.value == "plan":
        return _plan(config)
    if not _WORKDIR.value:
        sys.exit(f"jsft: error: --workdir is required for --mode={_MODE.value}")
    from jsft.parallel.mesh import initialize_distributed  # noqa: PLC0415

    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from jsft.train import loop  # import jax-heavy modules only once flags are parsed

    try:
        if _MODE.value == "train":
            loop.train_and_evaluate(config, _WORKDIR.value)
        elif _MODE.value == "export":
            if not _EXPORT_DIR.value:
                sys.exit("jsft: error: --mode export needs --export_dir")
            from jsft.interop.export import run_export  # noqa: PLC0415

            run_export(config, _WORKDIR.value, _EXPORT_DIR.value, _EXPORT_STEP.value, _EXPORT_DTYPE.value)
        elif _MODE.value == "eval":
            from jsft.evals.run import run_eval  # noqa: PLC0415

            run_eval(config, _WORKDIR.value, _CHECKPOINT.value)
        elif _MODE.value == "generate":
            from jsft.evals import generate  # noqa: PLC0415
            from jsft.evals.run import run_generate  # noqa: PLC0415

            sampling = generate.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, config.seed)
            run_generate(
                config,
                _WORKDIR.value,
                _CHECKPOINT.value,
                _PROMPTS.value,
                sampling,
                _MAX_NEW.value or config.eval.max_new_tokens,
            )
        elif _MODE.value == "inspect":
            from jsft.data.inspect import run_inspect  # noqa: PLC0415

            run_inspect(config, _WORKDIR.value)
    except (config_lib.ConfigError, DataError, FileNotFoundError, UnsupportedCheckpoint) as e:
        sys.exit(f"jsft: error: {e}")


def _plan(config) -> None:
    """Memory plan on as many simulated CPU devices as the mesh names (set before JAX starts)."""
    import os  # noqa: PLC0415

    from jsft.parallel import plan  # noqa: PLC0415

    try:
        n = plan.devices_needed(config.mesh)
    except ValueError as e:
        sys.exit(f"jsft: error: {e}")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    import jax  # noqa: PLC0415

    jax.config.update("jax_platforms", "cpu")
    plan.run_plan(config)


def _parse_flags(argv):
    """absl's parser, with a misspelled `--config.x.y` reported in one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        msg = str(e).replace("\\n", "\n")
        hint = msg[msg.find("Did you mean") :].split("\n")[0].rstrip("'\"") if "Did you mean" in msg else ""
        sys.exit(f"jsft: error: unknown config field among {bad}. {hint}".rstrip())
    except flags.Error as e:
        sys.exit(f"jsft: error: {e}\nPass --help for the flags.")


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()

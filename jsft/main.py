"""Command-line entry: `python -m jsft.main --config configs/demo.py --workdir DIR [--mode MODE]`.

Modes: `train` (the default), `inspect` (read and tokenize the data, write a report), `plan` (memory
plan for the mesh), `export` (a checkpoint as a Hugging Face model directory), `eval` (validation and
the eval suite on a checkpoint), `generate` (outputs for a JSONL of prompts, or interactively) and
`report` (the curves of one or several runs as a PNG: `--mode report --workdir A --workdir B`; no
config needed).

Any config field can be overridden, e.g. `--config.optim.lr=3e-4`; a misspelled field is an error.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jsft import config as config_lib
from jsft.data.sources import DataError
from jsft.errors import help_exits_zero
from jsft.interop.hf import UnsupportedCheckpoint

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file, e.g. configs/demo.py (optionally configs/demo.py:ARG).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_multi_string(
    "workdir",
    None,
    "Directory for checkpoints, logs and metrics (all modes but plan); --mode report takes several.",
)
_REPORT_OUT = flags.DEFINE_string(
    "report_out", "", "--mode report: the PNG to write (default: WORKDIR/report.png, or report_compare.png)."
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
_EXPORT_ADAPTER = flags.DEFINE_bool(
    "export_adapter",
    False,
    "--mode export of a LoRA/QLoRA run: a Hugging Face PEFT adapter directory, not the merged model.",
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "latest", "--mode eval/generate: latest, best, a step, or hf."
)
_PROMPTS = flags.DEFINE_string("prompts", "", "--mode generate: a JSONL of prompts (empty: read stdin).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "--mode generate: 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "--mode generate: top-k sampling (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "--mode generate: nucleus sampling (1: off).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0, "--mode generate: 0 takes config.eval.max_new_tokens.")
# --config is required by every mode but report (checked in main, one line).


def _user_errors() -> tuple[type[BaseException], ...]:
    from jsft.train.checkpoint import CheckpointError  # noqa: PLC0415
    from jsft.train.nonfinite import NonFiniteError  # noqa: PLC0415

    return (
        config_lib.ConfigError,
        DataError,
        UnsupportedCheckpoint,
        CheckpointError,
        NonFiniteError,
        OSError,  # names its path: permissions, a full disk, a file where a directory should be
    )


def _fail(e: BaseException) -> None:
    """One line on the console; the traceback only with an explicit --verbosity >= 1."""
    if flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1:
        logging.exception("jsft: the error below came from here")
    sys.exit(f"jsft: error: {e}")


def check_workdir(path: str) -> str:
    """The absolute workdir, created if needed; a file, a read-only or a forbidden path fails here, in
    the first second, instead of after the data is tokenized. Remote (gs://) paths are left to orbax."""
    if "://" in path:
        return path
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise config_lib.ConfigError(f"--workdir={path} is a file, not a directory: name a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".jsft-write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise config_lib.ConfigError(
            f"--workdir={path}: cannot write there ({reason}); choose a directory you can write to"
        ) from e
    return path


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax and JAX log every file operation at INFO; keep the console to what users act on.
        logging.set_verbosity(logging.WARNING)
        import datasets  # noqa: PLC0415

        datasets.disable_progress_bars()  # one line per source is printed instead
        datasets.logging.set_verbosity_error()
    workdirs = _WORKDIR.value or []
    if _MODE.value == "report":
        return _report(workdirs)
    config = _load_config()
    try:
        config_lib.validate(config, _MODE.value)
        if _MODE.value == "plan":
            return _plan(config)
        if len(workdirs) != 1:
            raise config_lib.ConfigError(
                f"--mode={_MODE.value} takes one --workdir (given {len(workdirs)}); "
                "only --mode report takes several"
            )
        workdir = check_workdir(workdirs[0])
        if config.model.hf_path:  # cheap (config.json and a file listing): before any data is read
            from jsft.interop import hf  # noqa: PLC0415

            config.model.hf_path = hf.resolve_path(config.model.hf_path)  # a hub id: its cached snapshot
            needs_weights = _MODE.value == "train" or _CHECKPOINT.value == "hf"
            hf.check_directory(config.model.hf_path, weights=needs_weights)
        _check_vocabulary(config)
        _run_mode(config, workdir)
    except _user_errors() as e:
        _fail(e)


def _check_vocabulary(config) -> None:
    """The model's vocabulary against a configured tokenizer's, before any data is tokenized (a
    tokenizer trained on the data is checked statically by config.validate)."""
    if not (config.data.tokenizer or config.model.hf_path):
        return
    from jsft.data.tokenizer import load_tokenizer  # noqa: PLC0415

    if config.data.tokenizer:
        tok = load_tokenizer(config.data.tokenizer)
    else:
        tok = load_tokenizer(config.model.hf_path, key="config.model.hf_path")
    if config.model.hf_path:
        from jsft.interop import hf  # noqa: PLC0415

        vocab = hf.config_from_hf(hf.read_config(config.model.hf_path)).vocab_size
        owner = f"the model in config.model.hf_path={config.model.hf_path}"
    else:
        vocab, owner = config.model.vocab_size, f"config.model.vocab_size={config.model.vocab_size}"
    if vocab and vocab < tok.vocab_size:
        raise config_lib.ConfigError(
            f"{owner} has a vocabulary of {vocab}, smaller than the tokenizer's {tok.vocab_size} "
            f"({config.data.tokenizer or config.model.hf_path}); "
            + (
                "set config.model.vocab_size=0 to follow the tokenizer"
                if not config.model.hf_path
                else "use the checkpoint's own tokenizer (config.data.tokenizer='')"
            )
        )


def _load_config():
    """The parsed config; a missing config file or one whose get_config raises is one line."""
    if _CONFIG.value is None:
        _fail(
            config_lib.ConfigError(
                f"--config is required for --mode={_MODE.value} (e.g. --config=configs/demo.py)"
            )
        )
    try:
        config = _CONFIG.value
        config.to_dict()  # a config that failed to load raises only when it is first used
        return config
    except Exception as e:  # noqa: BLE001 - ml_collections wraps the file's own error in OSError
        _fail(config_lib.ConfigError(f"--config={_config_path(sys.argv) or '?'}: {_last_line(str(e))}"))


def _config_path(argv: list[str]) -> str | None:
    """The config file named on the command line (`--config=F[:ARG]` or `--config F[:ARG]`)."""
    path = None
    for i, a in enumerate(argv[1:], start=1):
        if a.startswith(("--config=", "-config=")):
            path = a.split("=", 1)[1]
        elif a in ("--config", "-config") and i + 1 < len(argv):
            path = argv[i + 1]
    return path.split(":", 1)[0] if path else None


def _last_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else message


def _run_mode(config, workdir: str) -> None:
    from jsft.parallel.mesh import initialize_distributed  # noqa: PLC0415

    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from jsft.modes import train as train_mode  # import jax-heavy modules only once flags are parsed

    if _MODE.value == "train":
        if "://" not in workdir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            # A restarted run (preemption, stop_after_steps) reuses the compiled step instead of
            # compiling again (the same program, so the same numbers).
            import jax  # noqa: PLC0415

            jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
        train_mode.train_and_evaluate(config, workdir)
    elif _MODE.value == "export":
        if not _EXPORT_DIR.value:
            raise config_lib.ConfigError("--mode export needs --export_dir")
        from jsft.modes.export import run_export  # noqa: PLC0415

        run_export(
            config, workdir, _EXPORT_DIR.value, _EXPORT_STEP.value, _EXPORT_DTYPE.value, _EXPORT_ADAPTER.value
        )
    elif _MODE.value == "eval":
        from jsft.modes.evaluate import run_eval  # noqa: PLC0415

        run_eval(config, workdir, _CHECKPOINT.value)
    elif _MODE.value == "generate":
        from jsft.evals import generate  # noqa: PLC0415
        from jsft.modes.evaluate import run_generate  # noqa: PLC0415

        sampling = generate.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, config.seed)
        max_new = _MAX_NEW.value or config.eval.max_new_tokens
        run_generate(config, workdir, _CHECKPOINT.value, _PROMPTS.value, sampling, max_new)
    elif _MODE.value == "inspect":
        from jsft.data import inspect  # noqa: PLC0415
        from jsft.run import Run  # noqa: PLC0415

        run = Run.create(config, workdir)
        inspect.run_inspect(config, run.workdir, run.data(0, inspect.inspect_config(config.data)))


def _report(workdirs: list[str]) -> None:
    """--mode report: the runs' curves overlaid in one PNG."""
    from jsft.train import report  # noqa: PLC0415

    if not workdirs:
        _fail(config_lib.ConfigError("--mode report needs at least one --workdir"))
    default = "report.png" if len(workdirs) == 1 else "report_compare.png"
    out = _REPORT_OUT.value or os.path.join(workdirs[0], default)
    try:
        print(f"wrote {report.write_report(workdirs, out)}")
    except (FileNotFoundError, ValueError) as e:
        _fail(e)


def _plan(config) -> None:
    """Memory plan on as many simulated CPU devices as the mesh names (set before JAX starts)."""
    from jsft.modes import plan  # noqa: PLC0415

    try:
        plan.simulate_devices(config)  # a plan takes the shapes from the config
        plan.run_plan(config)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e


def _parse_flags(argv):
    """absl's parser, with every flag mistake (a misspelled `--config.x.y` above all) and every config
    file that cannot be loaded (missing, failing to import, without get_config) in one line."""
    path = _config_path(argv)
    if path and not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        sys.exit(f"jsft: error: --config={path}: {what} (name a config file, e.g. configs/demo.py)")
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        if path and isinstance(e, AttributeError) and "get_config" in str(e):
            sys.exit(f"jsft: error: --config={path}: the file defines no get_config() (see configs/demo.py)")
        _unknown_field(argv, e)  # a `--config.x.y` override naming no field exits here
        if not path:
            raise
        sys.exit(f"jsft: error: --config={path}: cannot load it ({type(e).__name__}: {_last_line(str(e))})")
    except flags.Error as e:
        text = _last_line(str(e)) if "Traceback" in str(e) else str(e).split("\n")[0]
        sys.exit(f"jsft: error: {text} (pass --help for the flags)")
    except Exception as e:  # noqa: BLE001 - the config file's own import or get_config failed
        if not path or isinstance(e, BrokenPipeError):  # (--help piped into `head`)
            raise
        sys.exit(f"jsft: error: --config={path}: cannot load it ({type(e).__name__}: {_last_line(str(e))})")


def _unknown_field(argv, e: BaseException) -> None:
    """Exit with one line naming the `--config.x.y` override whose field does not exist; return when
    no override names the missing component (the error came from the config file itself)."""
    # ml_collections names only the first unknown component ('lrr'); find the flag that holds it.
    msg = str(e).replace("\\n", "\n")
    name = (re.findall(r"[A-Za-z_]\w*", msg) or [""])[0]
    passed = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    bad = [a for a in passed if name in a[len("--config.") :].split(".")]
    if not bad:
        return
    hint = msg[msg.find("Did you mean") :].split("\n")[0].rstrip("'\"\\") if "Did you mean" in msg else ""
    sys.exit(f"jsft: error: {bad[0]}: no such config field. {hint}".rstrip())


def run() -> None:
    app.run(main, flags_parser=help_exits_zero(_parse_flags))


if __name__ == "__main__":
    run()

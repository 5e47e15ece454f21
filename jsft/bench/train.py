"""`python -m jsft.bench train`: the train step on fixed rows, timed the way every peer is timed.

    python -m jsft.bench train --config configs/bench_workload.py [--compare torch] [--json OUT]

The rows come from the shared peer benchmark (`../shared/bench/`, written by its `make_data.py` into
`$BENCH_DATA`, default /tmp/jsft-bench/data): `packed_{ids,labels,pos,seg}.npy` (or `padded_*`), fed
in order, 8 per step, through jsft's own model (weights imported from `$BENCH_DATA/init`), optimizer
and jitted step. The clock follows the workload's rules: step k ends when its loss is on the host;
step 1 includes compilation; the timed window is steps 11..N.

Reported: real (non-pad) and all tokens/s, median step time, compile (step 1) time, loss at step 1 and
N, peak memory (the device's `memory_stats()` where the backend has it, else XLA's compiled memory
analysis), and MFU = model FLOP/s / peak FLOP/s of the device (a table of known devices below, or
`--peak_tflops`). Model FLOPs per trained token (forward + backward):

    6 * (matmul parameters: every projection and the output head, not the embedding lookup)
    + 6 * n_layers * n_heads * head_dim * S     (QK^T and PV, 2 FLOPs each, x3 for the backward)

with S the mean number of keys a query sees: (seq_len + 1) / 2 for causal rows (PaLM's convention
with the causal half). `--compare torch` runs the workload's plain PyTorch eager reference
(`torch_plain.py`) right after, in the same sitting, and prints the ratio of real tokens/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

from jsft.models.llama import LlamaConfig
from jsft.run import Run

BENCH_DATA = os.environ.get("BENCH_DATA", "/tmp/jsft-bench/data")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCH_PLAIN = os.path.join(REPO, "..", "shared", "bench")
WARMUP = 10
# Dense bf16 peak FLOP/s per device (vendor figures).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}


def synthetic_batches(
    vocab: int, seq_len: int, steps: int, rows: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Random packed rows for any model shape (an accelerator check has no workload files): examples
    of 64 .. seq_len / 2 tokens packed first-fit, half of each trained, ~97% of positions real."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        seg = np.zeros((rows, seq_len), np.int32)
        pos = np.zeros((rows, seq_len), np.int32)
        mask = np.zeros((rows, seq_len), np.int32)
        for r in range(rows):
            start, k = 0, 1
            while seq_len - start >= 64:
                n = int(min(rng.integers(64, max(65, seq_len // 2)), seq_len - start))
                seg[r, start : start + n], pos[r, start : start + n] = k, np.arange(n)
                mask[r, start + n // 2 : start + n - 1] = 1
                start, k = start + n, k + 1
        ids = rng.integers(3, vocab, (rows, seq_len)).astype(np.int32) * (seg > 0)
        targets = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
        out.append(
            dict(
                inputs=ids,
                targets=targets,
                loss_mask=mask,
                segment_ids=seg,
                positions=pos,
                source_ids=0 * ids,
            )
        )
    return out


def workload_batches(data_dir: str, mode: str, steps: int, rows: int = 8) -> list[dict[str, np.ndarray]]:
    """The workload's rows as jsft batches: next-token targets, the HF labels' mask (a label -100 is
    not trained), per-example positions and segment ids (padded rows: one segment per row)."""
    ids = np.load(os.path.join(data_dir, f"{mode}_ids.npy"))
    labels = np.load(os.path.join(data_dir, f"{mode}_labels.npy"))
    if mode == "packed":
        pos, seg = (
            np.load(os.path.join(data_dir, "packed_pos.npy")),
            np.load(os.path.join(data_dir, "packed_seg.npy")),
        )
    else:
        seg = (ids != 0).astype(np.int32)
        pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    if len(ids) < steps * rows:
        raise ValueError(f"{data_dir}: {len(ids)} {mode} rows, fewer than {steps} steps x {rows}")
    out = []
    for k in range(steps):
        sl = slice(k * rows, (k + 1) * rows)
        x, y = ids[sl].astype(np.int32), labels[sl]
        targets, mask = np.zeros_like(x), np.zeros_like(x)
        targets[:, :-1], mask[:, :-1] = x[:, 1:], y[:, 1:] != -100  # HF labels are unshifted
        out.append(
            dict(
                inputs=x,
                targets=targets,
                loss_mask=mask.astype(np.int32),
                segment_ids=seg[sl].astype(np.int32),
                positions=np.asarray(pos[sl], np.int32),
                source_ids=np.zeros_like(x),
            )
        )
    return out


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Forward + backward model FLOPs per token (see the module docstring)."""
    d, h = cfg.d_model, cfg.head_dim
    per_layer = d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.mlp_dim
    matmul_params = cfg.n_layers * per_layer + d * cfg.vocab_size
    attention = 6 * cfg.n_layers * cfg.n_heads * h * (seq_len + 1) / 2
    return 6 * matmul_params + attention


def device_peak_tflops(override: float = 0.0) -> float | None:
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def _peak_memory(compiled) -> tuple[float, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 1e9, "device memory_stats"
    m = compiled.memory_analysis()
    used = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return used / 1e9, "XLA memory analysis"


def bench_train(
    config: ml_collections.ConfigDict, steps: int = 60, mode: str = "packed", peak_tflops: float = 0.0
) -> dict:
    """Train `steps` steps on the workload rows; returns the result record (printed by the caller)."""
    run = Run.create(config)
    model = run.model(config.model.vocab_size)
    if mode == "synthetic":
        batches = synthetic_batches(
            model.config.vocab_size, config.data.seq_len, steps, config.data.batch_size
        )
    else:
        batches = workload_batches(config.bench.data_dir, mode, steps, config.data.batch_size)
    tx, schedule = run.optimizer()
    _, state_sharding, _ = run.state_layout(model, tx)
    state = run.initial_state(model, tx, state_sharding)
    step = jax.jit(
        run.train_step(model, tx, schedule),
        in_shardings=(state_sharding, run.batch_sharding),
        out_shardings=(state_sharding, run.replicated),
        donate_argnums=0,
    )
    start = time.perf_counter()  # step 1 includes compilation, as the workload's clock says
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    losses, ends = [], []
    for batch in batches:
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))  # the step's end: its loss is on the host
        ends.append(time.perf_counter())
    times = np.diff([start, *ends])
    warm = min(WARMUP, steps - 1)
    wall = ends[-1] - ends[warm - 1]
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches[warm:])
    every = sum(b["inputs"].size for b in batches[warm:])
    flops = flops_per_token(model.config, config.data.seq_len) * every / wall
    peak = device_peak_tflops(peak_tflops)
    memory_gb, memory_source = _peak_memory(compiled)
    return {
        "framework": "jsft",
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "mode": mode,
        "steps": steps,
        "real_tokens_per_s": real / wall,
        "all_tokens_per_s": every / wall,
        "step_time_median_s": float(np.median(times[warm:])),
        "compile_and_step1_s": float(times[0]),
        "compile_s": compile_s,
        "loss_step1": losses[0],
        f"loss_step{steps}": losses[-1],
        "losses": [round(v, 6) for v in losses],
        "model_tflops_per_s": flops / 1e12,
        "mfu": flops / (peak * 1e12) if peak else None,
        "peak_tflops": peak,
        "peak_memory_gb": memory_gb,
        "peak_memory_source": memory_source,
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
    }


def compare_torch(steps: int, mode: str) -> dict:
    """The workload's plain PyTorch eager reference, run now (same sitting), as its result record."""
    script = os.path.join(os.path.normpath(TORCH_PLAIN), "torch_plain.py")
    if not os.path.exists(script):
        raise FileNotFoundError(f"{script} is missing: --compare torch needs the shared benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        cmd = [sys.executable, script, "--mode", mode, "--steps", str(steps), "--out", out]
        subprocess.run(
            cmd, check=True, capture_output=True, text=True, env=dict(os.environ, BENCH_DATA=BENCH_DATA)
        )
        with open(out) as f:
            return json.load(f)


def report(result: dict, torch: dict | None = None) -> str:
    steps = result["steps"]
    rows = [
        ("real tokens/s", f"{result['real_tokens_per_s']:,.0f}"),
        ("all tokens/s", f"{result['all_tokens_per_s']:,.0f}"),
        ("step time, median", f"{result['step_time_median_s']:.3f} s"),
        (
            "step 1 (with compile)",
            f"{result['compile_and_step1_s']:.1f} s ({result['compile_s']:.1f} s compile)",
        ),
        (f"loss @1 / @{steps}", f"{result['loss_step1']:.6f} / {result[f'loss_step{steps}']:.6f}"),
        ("model TFLOP/s", f"{result['model_tflops_per_s']:.3f}"),
        ("MFU", f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (pass --peak_tflops)"),
        ("peak memory", f"{result['peak_memory_gb']:.2f} GB ({result['peak_memory_source']})"),
    ]
    if torch:
        ratio = result["real_tokens_per_s"] / torch["real_tokens_per_s"]
        rows += [
            ("torch eager real tokens/s", f"{torch['real_tokens_per_s']:,.0f}"),
            (f"torch loss @1 / @{steps}", f"{torch['loss_step1']:.6f} / {torch[f'loss_step{steps}']:.6f}"),
            ("jsft / torch (real tokens/s)", f"{ratio:.2f}x"),
        ]
    width = max(len(k) for k, _ in rows)
    title = (
        f"jsft bench train: {result['mode']} rows, {steps} steps, {result['devices']} x {result['device']}"
    )
    return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows])


def train_table(
    config: ml_collections.ConfigDict,
    steps: int,
    mode: str,
    peak_tflops: float = 0.0,
    compare: bool = False,
    json_path: str = "",
) -> str:
    """`python -m jsft.bench train`: the table, with the torch reference run right after if `compare`,
    and the result record (with the config) written to `json_path` if given."""
    result = bench_train(config, steps, mode, peak_tflops)
    torch = compare_torch(steps, mode) if compare else None
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"jsft": result, "torch": torch}, f, indent=1)
    return report(result, torch)

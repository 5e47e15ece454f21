"""`python -m jsft.bench data --sizes_gb=0.05,0.2 --processes=1,2,4 --workers=0,2`: the streaming
engine at data sizes that do not fit a table in RAM.

For each size it writes a synthetic source pair (half the bytes as JSONL, half as Parquet with 4,096-row
groups) of prompt/response records, then for each process count P and worker count K starts P local
processes at once (simulated hosts, as `data.num_shards = P`), each of which builds its part of the
stream, takes the first batch, then pulls batches for `--seconds`. Each prints one JSON line: records
drawn/s and non-pad tokens/s after the first batch, time to first batch (from the start of
`build_data`, imports excluded), peak RSS of the process and of its largest grain worker, and the bytes
of the shards it owns against the data set's bytes (what it reads: index, then records).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

WORDS = np.array(
    "the of and to in is was for on that with as by at from his her an which are were be this has "
    "data model train token batch shard stream window pack chunk loss step epoch host worker grain".split()
)
ROW_GROUP = 4096


def _records(n: int, rng: np.random.Generator) -> list[dict]:
    lengths = rng.integers(20, 160, size=(n, 2))
    words = WORDS[rng.integers(0, len(WORDS), size=int(lengths.sum()))]
    out, at = [], 0
    for a, b in lengths:
        out.append({"prompt": " ".join(words[at : at + a]), "response": " ".join(words[at + a : at + a + b])})
        at += a + b
    return out


def write_sources(directory: str, size_gb: float, seed: int = 0) -> tuple[str, str]:
    """(jsonl path, parquet path), together about size_gb * 1e9 bytes; reused when present."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    half = int(size_gb * 1e9 / 2)
    jsonl, parquet = (os.path.join(directory, f"synthetic_{size_gb:g}gb.{e}") for e in ("jsonl", "parquet"))
    rng = np.random.default_rng(seed)
    if not os.path.exists(jsonl):
        with open(jsonl + ".part", "w") as f:
            while f.tell() < half:
                f.writelines(json.dumps(r) + "\n" for r in _records(1000, rng))
        os.replace(jsonl + ".part", jsonl)
    if not os.path.exists(parquet):
        with pq.ParquetWriter(
            parquet + ".part", pa.schema([("prompt", pa.string()), ("response", pa.string())])
        ) as w:
            written = 0
            while written < half:
                table = pa.Table.from_pylist(_records(ROW_GROUP, rng))
                w.write_table(table, row_group_size=ROW_GROUP)
                written += table.nbytes
        os.replace(parquet + ".part", parquet)
    return jsonl, parquet


def child(args: dict) -> None:
    """One simulated host: build its part of the stream, time the first batch and the throughput."""
    import ml_collections  # noqa: PLC0415

    from jsft.data.pipeline import build_data  # noqa: PLC0415

    data_cfg = ml_collections.ConfigDict(args["data"])
    data_cfg.sources = ml_collections.ConfigDict(
        {name: {"path": args[name], "fields": {}} for name in ("jsonl", "parquet")}
    )
    data_cfg.update(
        engine="stream", num_shards=args["processes"], workers=args["workers"], tokenizer=args["tokenizer"],
        on_bad_record="skip", template="plain",
        # at least ~32 JSONL shards, so that 4 processes each own several
        shard_bytes=max(1 << 20, min(64 << 20, os.path.getsize(args["jsonl"]) // 32)),
    )  # fmt: skip
    i = args["index"]
    start = time.perf_counter()
    data = build_data(data_cfg, 0, os.path.join(args["workdir"], f"p{i}"), i, args["processes"])
    next(data.train)
    first = time.perf_counter() - start
    tokens, start = 0, time.perf_counter()
    draws0 = _draws(data)
    while time.perf_counter() - start < args["seconds"]:
        tokens += int((next(data.train)["segment_ids"] > 0).sum())
    elapsed = time.perf_counter() - start
    draws = _draws(data) - draws0
    owned = sum(
        (sh.end - sh.start) if sh.kind == "jsonl" else 0
        for st in data.train.streams.values()
        for src in st.spec.sources
        for sh in src.shards
    )
    owned_groups = sum(
        sh.kind == "parquet"
        for st in data.train.streams.values()
        for src in st.spec.sources
        for sh in src.shards
    )
    data.train.close()
    print(
        json.dumps(
            {
                "index": i,
                "records_per_s": draws / elapsed,
                "tokens_per_s": tokens / elapsed,
                "first_batch_s": first,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "jsonl_share": owned / os.path.getsize(args["jsonl"]),
                "parquet_groups": owned_groups,
            }
        )
    )


def _draws(data) -> int:
    """Records drawn so far by this process's streams (at their current chunks' starts)."""
    return sum(st.state()["sampler"]["draws"] for st in data.train.streams.values())


def _tokenizer(directory: str, jsonl: str) -> str:
    """A 512-piece SentencePiece model trained once on the start of the first source (not timed)."""
    from jsft.data.tokenizer import train_sentencepiece  # noqa: PLC0415

    path = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(path):
        with open(jsonl) as f:
            texts = [" ".join(json.loads(next(f)).values()) for _ in range(2000)]
        train_sentencepiece(texts, 512, path)
    return path


def bench_scale(
    data_cfg: dict,
    sizes_gb: list[float],
    processes: list[int],
    workers: list[int],
    seconds: float,
    data_dir: str,
) -> str:
    """Run every (size, P, K) and return one table row per run (means over its P processes)."""
    directory = data_dir or tempfile.mkdtemp(prefix="jsft_bench_data_")
    os.makedirs(directory, exist_ok=True)
    lines = [
        f"jsft bench data (streaming engine): {seconds:g} s of batches per run, batch "
        f"{data_cfg['batch_size']} x {data_cfg['seq_len']}, pack chunk {data_cfg['pack_chunk_examples']}, "
        f"window {data_cfg['shuffle_window']}, data in {directory}",
        f"  {'size GB':>7} {'P':>2} {'K':>2} {'records/s/proc':>15} {'tokens/s/proc':>14} "
        f"{'first batch s':>13} {'peak RSS MB/proc':>16} {'worker RSS MB':>13} {'JSONL bytes/proc':>16}",
    ]
    for size in sizes_gb:
        t = time.perf_counter()
        jsonl, parquet = write_sources(directory, size)
        print(f"data {size:g} GB ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        tok = _tokenizer(directory, jsonl)
        for p in processes:
            for k in workers:
                results = _run(data_cfg, p, k, jsonl, parquet, tok, seconds)
                mean = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
                peak = max(r["rss_mb"] for r in results)
                lines.append(
                    f"  {size:>7g} {p:>2} {k:>2} {mean['records_per_s']:>15,.0f} "
                    f"{mean['tokens_per_s']:>14,.0f} "
                    f"{max(r['first_batch_s'] for r in results):>13.2f} {peak:>16,.0f} "
                    f"{max(r['worker_rss_mb'] for r in results):>13,.0f} {mean['jsonl_share']:>15.1%}"
                )
                print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


def _run(data_cfg: dict, p: int, k: int, jsonl: str, parquet: str, tok: str, seconds: float) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="jsft_bench_run_") as workdir:
        procs = []
        for i in range(p):
            args = dict(
                index=i, processes=p, workers=k, jsonl=jsonl, parquet=parquet, tokenizer=tok, seconds=seconds,
                workdir=workdir, data=data_cfg,
            )  # fmt: skip
            code = "import json, sys; from jsft.bench.data_scale import child; child(json.loads(sys.argv[1]))"
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE, text=True
                )
            )
        outs = [proc.communicate()[0] for proc in procs]
        if any(proc.returncode for proc in procs):
            raise RuntimeError(f"a benchmark process failed (P={p}, K={k}): {outs}")
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]

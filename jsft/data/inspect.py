"""The data report of `--mode inspect`: what each source holds, what is cut, and what is trained.

    python -m jsft.main --config configs/demo.py --mode inspect --workdir DIR

Per source (training and validation) it reports records and tokens, bad records by reason with
their locations, prompt/response length percentiles, truncations and drops under the overlong
policy, exact duplicates, packing efficiency for `best_fit` and `pad`, the share of tokens in the
loss, how many examples hold tools, tool calls, tool results and reasoning, and three decoded examples
(plus the first of each of those kinds) with every trained run of tokens in [[ ]]. The text goes to stdout
and DIR/inspect_report.txt; a histogram of example lengths goes to DIR/inspect_lengths.png.

Bad records never stop the report: the data is read with on_bad_record='skip' (the report says
when the configured 'error' would stop training on them).
"""

from __future__ import annotations

import collections
import hashlib
import os

import ml_collections
import numpy as np

from jsft.data import formats, packing
from jsft.data.examples import TokenizedSource
from jsft.data.pipeline import Data, build_data
from jsft.data.tokenizer import Tokenizer

PACK_SAMPLE = 20_000  # examples packed per source to measure packing efficiency
RENDERED = 3  # decoded examples shown per source
PERCENTILES = (50, 90, 99)


def example_lengths(src: TokenizedSource) -> dict[str, np.ndarray]:
    """Per kept example: all tokens, trained (response) tokens and untrained (prompt) tokens."""
    if not len(src):
        empty = np.zeros(0, np.int64)
        return {"prompt": empty, "response": empty, "example": empty}
    start, end = src.offsets[src.kept].astype(np.int64), src.offsets[src.kept + 1].astype(np.int64)
    # Bad and dropped rows hold no ids, so kept examples tile `ids` and each sum runs to the next start.
    trained = np.add.reduceat(src.mask, start, dtype=np.int64)
    return {"prompt": end - start - trained, "response": trained, "example": end - start}


def duplicates(src: TokenizedSource) -> list[tuple[int, int]]:
    """(example, earlier example with the same token ids) for every exact repeat within the source."""
    first: dict[bytes, int] = {}
    out = []
    for i, r in enumerate(src.kept):
        key = hashlib.blake2b(src.ids[src.offsets[r] : src.offsets[r + 1]].tobytes(), digest_size=16).digest()
        if key in first:
            out.append((i, first[key]))
        else:
            first[key] = i
    return out


def packing_efficiency(
    examples: list[packing.Example], seq_len: int, mode: str, chunk: int
) -> dict[str, float]:
    """`packing.packing_stats` over `examples` packed `chunk` at a time (as the train stream packs)."""
    totals = collections.Counter()
    for start in range(0, len(examples), chunk):
        st = packing.packing_stats(packing.pack(examples[start : start + chunk], seq_len, mode))
        totals["rows"] += st["rows"]
        for key in ("examples_per_row", "non_pad_fraction", "target_fraction"):
            totals[key] += st[key] * st["rows"]  # every row has seq_len positions: weigh by rows
    rows = max(totals["rows"], 1)
    return {"rows": totals["rows"], **{k: v / rows for k, v in totals.items() if k != "rows"}}


def render_example(ids: np.ndarray, mask: np.ndarray, tok: Tokenizer) -> str:
    """The example decoded run by run (never re-tokenized), each trained run wrapped in [[ ]]."""
    bounds = np.flatnonzero(np.diff(np.asarray(mask, np.int8))) + 1
    parts = []
    specials = {tok.eos_id: "<eos>", **({tok.bos_id: "<bos>"} if tok.bos_id is not None else {})}
    for run_ids, run_mask in zip(np.split(ids, bounds), np.split(mask, bounds), strict=True):
        # BOS/EOS decode to nothing in SentencePiece; show them, so a trained EOS is visible.
        pieces, text = [], []
        for i in run_ids.tolist():
            if i in specials:
                pieces += [tok.decode(text), specials[i]]
                text = []
            else:
                text.append(i)
        text = "".join(pieces) + tok.decode(text)
        parts.append(f"[[{text}]]" if run_mask[0] else text)
    return "".join(parts)


def _where(src: TokenizedSource, i: int) -> str:
    return src.table[int(src.kept[i])]["where"]


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.split("\n"))


def _bad_lines(src: TokenizedSource, on_bad_record: str) -> list[str]:
    if not src.bad:
        return ["bad records: none"]
    by_kind = collections.defaultdict(list)
    for (where, reason), code in zip(src.bad, src.bad_codes, strict=True):
        by_kind[code].append(f"{where}: {reason}")
    note = (
        "; on_bad_record='error' stops training on them (fix them or set config.data.on_bad_record='skip')"
        if on_bad_record == "error"
        else " (skipped)"
    )
    lines = [f"bad records: {len(src.bad):,}{note}"]
    for kind, items in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {kind}: {len(items):,}")
        lines += [f"    {item}" for item in items[:3]]
    return lines


def _overlong_lines(src: TokenizedSource, policy: str, seq_len: int) -> list[str]:
    st = src.stats
    well_formed = st["records"] - st["bad"]
    rate = st["truncated"] / max(well_formed, 1)
    return [
        f"over-long (more than {seq_len + 1} tokens; config.data.overlong={policy!r}): truncated "
        f"{st['truncated']:,} ({rate:.2%} of {well_formed:,} well-formed records), dropped "
        f"{st['dropped_overlong']:,}"
    ]


def _duplicate_lines(src: TokenizedSource) -> list[str]:
    dups = duplicates(src)
    lines = [f"exact duplicates: {len(dups):,} ({len(dups) / max(len(src), 1):.2%} of examples)"]
    lines += [f"  {_where(src, i)} repeats {_where(src, j)}" for i, j in dups[:3]]
    return lines


def _length_lines(lengths: dict[str, np.ndarray]) -> list[str]:
    header = "".join(f"{'p' + str(q):>8}" for q in PERCENTILES) + f"{'max':>8}"
    lines = [f"lengths in tokens {header}"]
    for name, x in lengths.items():
        qs = np.percentile(x, PERCENTILES, method="inverted_cdf")
        lines.append(f"  {name:<16}" + "".join(f"{int(v):>8,}" for v in (*qs, x.max())))
    return lines


def _packing_lines(src: TokenizedSource, seq_len: int, chunk: int) -> list[str]:
    order = np.random.default_rng(0).permutation(len(src))[:PACK_SAMPLE]
    examples = [src.example(int(i)) for i in order]
    chunk = min(chunk, len(examples))
    lines = [
        f"packing ({len(examples):,} of {len(src):,} examples, packed {chunk:,} at a time):",
        f"  {'mode':<10}{'rows':>10}{'non_pad':>10}{'target':>10}{'examples/row':>14}",
    ]
    for mode in packing.PACKING_MODES:
        st = packing_efficiency(examples, seq_len, mode, chunk)
        lines.append(
            f"  {mode:<10}{st['rows']:>10,}{st['non_pad_fraction']:>10.3f}{st['target_fraction']:>10.3f}"
            f"{st['examples_per_row']:>14.2f}"
        )
    return lines


def part_examples(src: TokenizedSource) -> dict[str, np.ndarray]:
    """For each of formats.CHAT_PARTS, the (sorted) kept examples that hold it."""
    import pyarrow.compute as pc  # noqa: PLC0415

    column = src.table.with_format("arrow")[:].column("parts").combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False).astype(str)
    rows = pc.list_parent_indices(column).to_numpy()
    example = np.full(len(column), -1)
    example[src.kept] = np.arange(len(src.kept))
    held = {p: example[rows[values == p]] for p in formats.CHAT_PARTS}
    return {p: np.unique(x[x >= 0]) for p, x in held.items()}


def _parts_lines(parts: dict[str, np.ndarray], count: int) -> list[str]:
    found = ", ".join(f"{len(x):,} with {p.replace('_', ' ')}" for p, x in parts.items() if len(x))
    return [f"tool calling and reasoning: {found} (of {count:,} examples)"] if found else []


def _rendered_lines(src: TokenizedSource, tok: Tokenizer, parts: dict[str, np.ndarray]) -> list[str]:
    """The first RENDERED examples, then the first holding each of CHAT_PARTS not yet shown."""
    shown = list(range(min(RENDERED, len(src))))
    for held in parts.values():
        if len(held) and not np.isin(shown, held).any():
            shown.append(int(held[0]))
    lines = ["rendered examples ([[ ]] marks trained tokens):"]
    for i in shown:
        ex = src.example(i)
        lines.append(f"  {_where(src, i)} ({len(ex.ids)} tokens, {int(ex.mask.sum())} trained)")
        lines.append(_indent(render_example(ex.ids, ex.mask, tok), "    "))
    return lines


def source_report(
    src: TokenizedSource, title: str, tok: Tokenizer, data_cfg: ml_collections.ConfigDict, chunk: int
) -> str:
    """One source's section of the report; `chunk` is how many examples are packed together."""
    st = src.stats
    lengths = example_lengths(src)
    trained = int(lengths["response"].sum())
    lines = [
        f"== {title}",
        f"records {st['records']:,} | examples {st['examples']:,} | tokens {st['tokens']:,} | "
        f"in the loss {trained:,} ({trained / max(st['tokens'], 1):.1%} of tokens)",
        *_bad_lines(src, data_cfg.on_bad_record),
        *_overlong_lines(src, data_cfg.overlong, data_cfg.seq_len),
    ]
    if not len(src):
        return "\n".join([*lines, "no examples"])
    parts = part_examples(src)
    lines += _parts_lines(parts, len(src))
    lines += _duplicate_lines(src)
    lines += _length_lines(lengths)
    lines += _packing_lines(src, data_cfg.seq_len, chunk)
    lines += _rendered_lines(src, tok, parts)
    return "\n".join(lines)


def _header(config: ml_collections.ConfigDict, data: Data) -> str:
    d = config.data
    mixture = ", ".join(f"{name} {p:.3f}" for name, p in data.mixture.items())
    return "\n".join(
        [
            "jsft data report",
            f"seq_len {d.seq_len} | template {d.template!r} | train_on {d.train_on!r} | train_reasoning "
            f"{d.get('train_reasoning', True)} | overlong {d.overlong!r} | packing {d.packing!r} | "
            f"on_bad_record {d.on_bad_record!r}",
            f"tokenizer: {data.tokenizer.vocab_size:,} pieces, {data.tokenizer.source}",
            f"mixture ({d.mixture!r}): {mixture}",
        ]
    )


def plot_lengths(lengths: dict[str, np.ndarray], seq_len: int, path: str) -> None:
    """A histogram of tokens per example, one subplot per labelled source, written to `path`."""
    import matplotlib  # noqa: PLC0415  (only the report needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(len(lengths), 1, figsize=(8, 2.6 * len(lengths)), squeeze=False)
    for ax, (label, x) in zip(axes[:, 0], lengths.items(), strict=True):
        top = int(x.max()) if len(x) else 1
        ax.hist(x, bins=np.arange(top + 2) if top <= 200 else 100)
        ax.axvline(seq_len + 1, color="tab:red", linestyle="--", label=f"seq_len + 1 = {seq_len + 1}")
        ax.set(title=f"{label}: {len(x):,} examples", xlabel="tokens per example", ylabel="examples")
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _origin(spec: ml_collections.ConfigDict, split: str) -> str:
    if split == "train":
        return spec.path
    if spec.val_path:
        return spec.val_path
    held_out = f"split {spec.val_split!r}" if spec.val_split else f"{spec.val_fraction:.0%} held out"
    return f"{spec.path} ({held_out})"


def inspect_config(data_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The data section as inspect reads it: bad records are reported, not fatal, and every source is
    read whole (engine "table": the report counts every record; the streaming engine parses only
    what it draws)."""
    data_cfg = data_cfg.copy_and_resolve_references()
    data_cfg.on_bad_record = "skip"
    if "engine" in data_cfg:
        data_cfg.engine = "table"
    return data_cfg


def run_inspect(config: ml_collections.ConfigDict, workdir: str, data: Data | None = None) -> str:
    """Print the report of `data` (default: the configured data, built with `inspect_config`), write
    it and the length histogram to `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    if data is None:
        data = build_data(inspect_config(config.data), config.seed, workdir, hf_path=config.model.hf_path)
    # (label, source, examples packed together): evaluation packs the whole validation set at once.
    sections = [(f"train {s.name!r}", s, config.data.pack_chunk_examples) for s in data.train_sources]
    sections += [(f"val {s.name!r}", s, PACK_SAMPLE) for s in data.val_sources]
    parts = [_header(config, data)]
    for label, src, chunk in sections:
        origin = _origin(config.data.sources[src.name], label.split()[0])
        parts.append(source_report(src, f"{label}: {origin}", data.tokenizer, config.data, chunk))
    report = "\n\n".join(parts)
    print(report)
    with open(os.path.join(workdir, "inspect_report.txt"), "w", encoding="utf-8") as f:
        f.write(report + "\n")
    plot_lengths(
        {label: example_lengths(src)["example"] for label, src, _ in sections},
        config.data.seq_len,
        os.path.join(workdir, "inspect_lengths.png"),
    )
    return report

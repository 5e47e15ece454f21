"""Studies that compare whole runs on one config, side by side (issue 13's checks of the papers).

    python -m jsft.study gem --config configs/gem_study.py --workdir W --config.model.hf_path=BASE
    python -m jsft.study neftune --config configs/demo.py --workdir W
    python -m jsft.study qsft --config configs/qsft_study.py --workdir W --config.model.hf_path=BASE

`gem` trains the config with cross-entropy and with GEM (`loss.objective`), then samples
`config.study.samples` answers per prompt of `config.study.prompts` (records with `prompt` and the list
of correct `answers`) at `config.study.temperature` and reports: validity (share of samples that are a
correct answer), diversity (distinct correct answers per prompt among the samples), the entropy of
the first answer token's distribution, and the final train / validation losses and their gap.
`neftune` trains with and without NEFTune noise (`loss.neftune_alpha` 0 and 5) and reports the final
evaluation metrics. `qsft` trains plain SFT on rewarded data, exports it, trains Q-SFT from that
export (its behaviour policy), trains SFT on the reward-1 records only, and repeats SFT and Q-SFT on
the multi-turn data; it reports validation exact match. Every run keeps its workdir (W/<variant>), so a
finished variant is not retrained.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jsft.errors import help_exits_zero

STUDIES = {
    "qsft": {},  # a chain of runs: qsft_variants in jsft/study/runs.py
    "gem": {
        "ce": {"loss.objective": "ce"},
        "gem": {},  # the config's GEM settings
        "gem_linear": {"loss.objective": "gem", "loss.gem_h": "linear"},
    },
    "neftune": {"plain": {"loss.neftune_alpha": 0.0}, "neftune_5": {"loss.neftune_alpha": 5.0}},
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "The config the study varies.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "One subdirectory per variant.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in STUDIES:
        raise app.UsageError(f"name one study of {sorted(STUDIES)}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from jsft import config as config_lib  # noqa: PLC0415
    from jsft.study import runs  # noqa: PLC0415 - JAX loads once the flags are parsed

    base = _CONFIG.value
    try:
        config_lib.validate(base)
        rows = runs.run_study(argv[1], STUDIES[argv[1]], base, _WORKDIR.value)
    except config_lib.ConfigError as e:
        sys.exit(f"jsft: error: {e}")
    print(runs.table(rows))
    with open(os.path.join(_WORKDIR.value, f"{argv[1]}_study.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main, flags_parser=help_exits_zero(app.parse_flags_with_usage))

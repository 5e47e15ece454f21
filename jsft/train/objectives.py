"""SFT objectives and regularisers, chosen in `config.loss` and summed as named per-token terms.

    ce       cross-entropy, -log p(y); with `label_smoothing` eps: (1 - eps) CE + eps (-mean_v log p_v)
    gem      GEM, entropic distribution matching (Li et al., "Entropic Distribution Matching in
             Supervised Fine-tuning of LLMs: Less Overfitting and Better Diversity", arXiv 2408.16673,
             ICLR 2025): per token  -sum_v q_v w_v (log p(y) - log p(v)),  q = softmax(logits / beta)
             and w = h'(.) held constant (h = linear: w = 1; h = log_sigmoid: w = sigmoid(0.01 (l_v -
             l_y))), as in the reference implementation (liziniu/GEM, `SFTTrainer.gem_loss`, read at
             e5b1430). beta -> 1 and h = linear recovers CE's gradient.
    qsft     Q-SFT (jsft/train/qsft.py): a weighted CE whose weights are Bellman backups of the
             data's rewards through a Polyak-averaged target copy; needs rewards in the data
    z_loss   + coefficient * (log Z)^2 per token (PaLM, MaxText), with any objective
    prompt_weight   trains the prompt/template tokens too, with this weight in [0, 1]
    per-example weights   a record's `weight` field scales its tokens (the loss is the weighted mean)

Each term is weighted per token like CE (the `token` / `sequence` normalisation of
jsft/train/losses.py) and logged on its own as `train/loss/<term>` (`ce` is always the plain
cross-entropy, so runs with different objectives compare on it); evaluation stays plain CE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax

from jsft.train.qsft import weighted_ce
from jsft.train.token_terms import GEM_H, Terms

OBJECTIVES = ("ce", "gem", "qsft")


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str = "ce"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    gem_beta: float = 0.7
    gem_h: str = "linear"
    prompt_weight: float = 0.0  # weight of the untrained (prompt, template) tokens: 0 trains replies only
    qsft_gamma: float = 1.0  # discount between assistant turns
    qsft_polyak: float = 0.005  # target <- (1 - rate) target + rate params, every step

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"config.loss.objective={self.name!r} is not one of {list(OBJECTIVES)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"config.loss.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0.0 <= self.prompt_weight <= 1.0:
            raise ValueError(f"config.loss.prompt_weight={self.prompt_weight} must be in [0, 1]")
        if self.name == "qsft":
            if not 0.0 <= self.qsft_gamma <= 1.0:
                raise ValueError(f"config.loss.qsft_gamma={self.qsft_gamma} must be in [0, 1]")
            if not 0.0 < self.qsft_polyak <= 1.0:
                raise ValueError(f"config.loss.qsft_polyak={self.qsft_polyak} must be in (0, 1]")
            if self.label_smoothing or self.prompt_weight:
                raise ValueError(
                    "config.loss.label_smoothing / prompt_weight do not combine with objective='qsft'"
                )
        if self.z_loss < 0:
            raise ValueError(f"config.loss.z_loss={self.z_loss} must be >= 0")
        if self.name == "gem":
            if not 0.0 < self.gem_beta <= 1.0:
                raise ValueError(f"config.loss.gem_beta={self.gem_beta} must be in (0, 1] (1: CE's gradient)")
            if self.gem_h not in GEM_H:
                raise ValueError(f"config.loss.gem_h={self.gem_h!r} is not one of {list(GEM_H)}")
            if self.label_smoothing:
                raise ValueError("config.loss.label_smoothing applies to objective='ce', not 'gem'")

    @classmethod
    def from_config(cls, loss_cfg: Mapping) -> Objective:
        get = loss_cfg.get
        return cls(
            get("objective", "ce"),
            float(get("label_smoothing", 0.0)),
            float(get("z_loss", 0.0)),
            float(get("gem_beta", 0.7)),
            get("gem_h", "linear"),
            float(get("prompt_weight", 0.0)),
            float(get("qsft_gamma", 1.0)),
            float(get("qsft_polyak", 0.005)),
        )

    @property
    def is_plain(self) -> bool:
        """Plain cross-entropy (prompt weight aside): the step keeps the CE-only kernel (bitwise
        today's training when nothing else is set)."""
        return self.name == "ce" and not self.label_smoothing and not self.z_loss

    @property
    def state_copies(self) -> tuple[str, ...]:
        """Parameter copies the train state carries for this objective (Q-SFT: target, behaviour)."""
        return ("target", "behavior") if self.name == "qsft" else ()

    @property
    def terms(self) -> Terms:
        return Terms(
            z=self.z_loss > 0,
            smooth=self.label_smoothing > 0 or self.name == "qsft",
            gem_beta=self.gem_beta if self.name == "gem" else 0.0,
            gem_h=self.gem_h,
        )

    def combine(
        self, t: Mapping[str, jax.Array], qsft_target: jax.Array | None = None, vocab: int = 0
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the per-token loss that is trained, {term name: per-token value} to log); Q-SFT needs its
        Bellman targets and the vocabulary size."""
        logged = {"ce": t["nll"]}
        if self.name == "qsft":
            main = logged["qsft"] = weighted_ce(t["nll"], t["smooth"], qsft_target, vocab)
            logged["qsft_target"] = qsft_target
        elif self.name == "gem":
            main = logged["gem"] = t["gem"]
        elif self.label_smoothing:
            main = (1.0 - self.label_smoothing) * t["nll"] + self.label_smoothing * t["smooth"]
            logged["smoothed_ce"] = main
        else:
            main = t["nll"]
        if self.z_loss:
            logged["z"] = t["z"]
            main = main + self.z_loss * t["z"]
        return main, logged

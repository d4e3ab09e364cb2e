"""Typed records that travel through one RL step (and between ranks, pickled): what the engine sampled
and the grader scored, what the no-grad pass scored per token, and what the loss reads per trajectory."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Sample:
    """One generated response."""
    token_ids: list[int]
    log_probs: list[float]  # the engine's sampling log-probs, one per token
    finish_reason: str
    reward: float


@dataclass
class SampledGroup:
    """The `n` graded samples of one prompt. Grader errors travel with the group, so every rank sees the
    same totals."""
    prompt: int  # index into the step's prompt list
    samples: list[Sample]
    grader_errors: int = 0
    grader_timeouts: int = 0  # grading calls past reward.timeout_s (scored 0.0)
    grader_error: str | None = None  # one error's text, for the message
    grader_timeout: str | None = None  # one timed-out answer, for the message

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]


@dataclass
class TokenScores:
    """Per-token scores of one trajectory's response, [n] host tensors: π_old of the original view, and
    (when the algorithm scores the perturbed view) of the perturbed view and the exact full-vocabulary KL."""
    old: Tensor
    aug: Tensor | None = None
    kl: Tensor | None = None
    jsd: Tensor | None = None  # VEPO: Jensen-Shannon divergence of the two views' full distributions
    ent_old: Tensor | None = None  # VEPO: entropy of the original view's distribution
    ent_aug: Tensor | None = None  # VEPO: entropy of the second view's distribution


@dataclass
class ShapedTrajectory:
    """What the policy loss reads for one trajectory, held fixed for the step's optimizer steps."""
    old_logp: Tensor  # [n] π_old
    tgf_mask: Tensor  # [n] 1 = the policy-gradient term keeps the token
    is_weight: Tensor | None = None  # [n] rollout-correction weight (None = ones)
    advantage: float = 0.0  # shaped Â
    token_weight: Tensor | None = None  # [n] per-token advantage weight (PGPO; None = ones)
    aug_logp: Tensor | None = None  # [n] π_old on the second view, read by the loss (PAPO)

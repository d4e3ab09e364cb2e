"""RL algorithm core: pure tensor functions (spec §1–§6), GSPO, the perception family (PAPO, PGPO, VEPO:
spec/perception_family.md), and the `ALGORITHMS` registry the trainer reads. The golden CLI lives in
`algo.golden`."""
from .advantages import dynamic_sampling_keep, grpo_advantages
from .dependency import exact_kl_dependency, sampled_k3, sequence_dependency
from .gspo import gspo_policy_loss
from .loss import PPOTerms, ppo_token_loss, vppo_policy_loss
from .papo import papo_k3, perception_term
from .pgpo import pgpo_token_weights
from .registry import ALGORITHMS, Algorithm, LossInputs, LossSettings, get_algorithm
from .tas import shape_advantages, tas_alpha, tas_alpha_global, tas_alpha_official
from .tgf import keep_counts, tgf_mask
from .vepo import vepo_scores, vepo_token_mask
from .vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_jsd_entropies,
    vocab_parallel_kl,
    vocab_parallel_log_prob,
)
from .vppo import Shaping, compute_shaping, shaping_metrics

__all__ = [
    "ALGORITHMS", "Algorithm", "LossInputs", "LossSettings", "get_algorithm", "gspo_policy_loss",
    "PPOTerms", "Shaping", "compute_shaping", "dynamic_sampling_keep", "exact_kl_dependency", "grpo_advantages",
    "keep_counts", "ppo_token_loss", "sampled_k3", "sequence_dependency", "shape_advantages", "shaping_metrics",
    "tas_alpha", "tas_alpha_global", "tas_alpha_official", "tgf_mask", "vocab_parallel_entropy",
    "vocab_parallel_kl", "vocab_parallel_log_prob", "vppo_policy_loss", "papo_k3", "perception_term",
    "pgpo_token_weights", "vepo_scores", "vepo_token_mask", "vocab_parallel_jsd_entropies",
]

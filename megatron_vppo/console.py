"""What a run prints: INFO from this package on global rank 0 (step summaries, data skips, checkpoints),
warnings elsewhere, and none of the third-party notices that repeat per rank and per call.

The trainer (`megatron-vppo train`), the demo, eval and the tools (convert, score) set up their console
here, so a new entry point gets the same quiet output (issue 19: Megatron's parameter list on the demo,
torch's ShardedTensor FutureWarning from the converters)."""
from __future__ import annotations

import logging
import os
import warnings


def setup_logging() -> None:
    """INFO from `megatron_vppo` on global rank 0, WARNING from everything else (Megatron logs its bucket
    parameter lists and optimizer config at INFO)."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    logging.getLogger("megatron_vppo").setLevel(logging.INFO if rank == "0" else logging.WARNING)
    quiet_third_party_warnings()


def quiet_third_party_warnings() -> None:
    """Megatron's "no Apex / Transformer Engine" notices and torch's deprecation notices (ShardedTensor,
    which Megatron's dist_checkpointing uses), per rank and per call, would bury the step summaries on CPU."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|megatron)\.")
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead")
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")

"""Megatron DDP + optimizer + LR schedule (megatron_vppo.train.optimizer).

Oracles: a plain torch AdamW loop on a copy of the same model (param groups, decoupled weight decay,
global-norm clipping and the LR schedule written out independently here), and a single-process run
for the data-parallel distributed optimizer.
"""
from __future__ import annotations

import math

import pytest
import torch

from dist_helpers import run_distributed
from megatron_vppo.config import OptimConfig, ParallelConfig

VOCAB, SEQ, BATCH = 64, 8, 4
GPT = dict(num_attention_heads=4, num_query_groups=2, num_layers=2)


# --------------------------------------------------------------------------- shared helpers


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234):
    from megatron_vppo.distributed import init_distributed

    return init_distributed(ParallelConfig(tp=tp, pp=pp), **GPT, seed=seed)


def build_tiny_gpt(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer Megatron GPTModel (local spec) for the current parallel state.

    Weights are made on CPU from the full master tensors and then split (use_cpu_initialization), so
    the same seed gives the same global weights at every TP size.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    cfg = TransformerConfig(
        num_layers=GPT["num_layers"],
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=GPT["num_attention_heads"],
        num_query_groups=GPT["num_query_groups"],
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        normalization="RMSNorm",
    )
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    if dtype != torch.float32:
        model = Float16Module(cfg, model)
    return model


def make_batch(step: int, batch: int = BATCH):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def lm_loss(model, tokens, labels):
    """Mean next-token loss (vocab-parallel cross entropy inside GPTModel)."""
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    per_token = model(tokens, pos, None, labels=labels)
    return per_token.float().mean()


def train_steps(ddp_chunks, optimizer, scheduler, steps, *, dp_rank=0, dp_size=1, first_step=0):
    """Plain PP=1 loop; each DP rank takes its slice of the same global batch. Returns global losses."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    model = ddp_chunks[0]
    losses = []
    for s in range(first_step, first_step + steps):
        for c in ddp_chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        tokens, labels = make_batch(s)
        per = tokens.shape[0] // dp_size
        sl = slice(dp_rank * per, (dp_rank + 1) * per)
        loss = lm_loss(model, tokens[sl], labels[sl])
        loss.backward()
        finalize_model_grads(list(ddp_chunks))
        ok, grad_norm, _ = optimizer.step()
        assert ok
        scheduler.step(1)
        g = loss.detach().clone()
        if dp_size > 1:
            torch.distributed.all_reduce(g, group=ps.get_data_parallel_group())
            g /= dp_size
        losses.append(g.item())
    return losses


# --------------------------------------------------------------------------- schedule


def _lr_oracle(lr, warmup, total, style, step):
    if warmup > 0 and step <= warmup:
        start = lr / warmup
        return start + (lr - start) * step / warmup
    if style == "constant":
        return lr
    frac = (step - warmup) / (max(total, warmup + 1) - warmup)
    if frac > 1:
        return 0.0
    return lr * (1 - frac) if style == "linear" else lr * 0.5 * (1 + math.cos(math.pi * frac))


def _schedule_and_state():
    from megatron_vppo.train.optimizer import build_scheduler, current_lr

    out = {}
    for style in ("constant", "linear", "cosine"):
        cfg = OptimConfig(lr=1e-3, lr_schedule=style, warmup_steps=3, weight_decay=0.1)
        p = torch.nn.Parameter(torch.zeros(2, 2))
        bias = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW(
            [{"params": [p], "wd_mult": 1.0}, {"params": [bias], "wd_mult": 0.0}], lr=0.0
        )
        sched = build_scheduler(opt, cfg, total_steps=10)
        lrs, wds = [], []
        for _ in range(12):
            lrs.append(current_lr(opt))
            wds.append([g["weight_decay"] for g in opt.param_groups])
            sched.step(1)
        # Resume: a fresh scheduler loaded from a mid-run state continues identically.
        ref = build_scheduler(opt, cfg, total_steps=10)
        ref.step(5)
        state = ref.state_dict()
        fresh = build_scheduler(opt, cfg, total_steps=10)
        fresh.load_state_dict(state)
        out[style] = dict(lrs=lrs, wds=wds, resumed_lr=current_lr(opt), resumed_steps=fresh.num_steps)
    return out


def test_lr_schedule_matches_formula_and_resumes():
    out = _schedule_and_state()
    for style, res in out.items():
        want = [_lr_oracle(1e-3, 3, 10, style, s) for s in range(12)]
        assert res["lrs"] == pytest.approx(want, rel=1e-12, abs=1e-15), style
        assert res["lrs"][0] > 0  # no wasted zero-lr first step
        assert res["wds"][0] == [0.1, 0.0]  # wd_mult 0 group gets no decay
        assert res["resumed_steps"] == 5
        assert res["resumed_lr"] == pytest.approx(_lr_oracle(1e-3, 3, 10, style, 5), rel=1e-12)


def test_bad_schedule_config_is_rejected():
    from megatron_vppo.train.optimizer import build_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(opt, OptimConfig(lr_schedule="cosine", warmup_steps=10), total_steps=10)


# --------------------------------------------------------------------------- optimizer step vs torch


STEPS = 4
OPT = dict(lr=3e-3, lr_schedule="cosine", warmup_steps=1, weight_decay=0.1, grad_clip=0.05)


def _megatron_vs_torch(rank, world):
    from megatron_vppo.train.optimizer import build_optimizer

    init_parallel()
    model = build_tiny_gpt(seed=0)
    ref = build_tiny_gpt(seed=0)  # same seed -> same weights
    same_init = all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    cfg = OptimConfig(**OPT, use_distributed_optimizer=False)
    ddp, opt, sched = build_optimizer([model], cfg, "fp32", total_steps=STEPS)
    losses = train_steps(ddp, opt, sched, STEPS)

    # Oracle: torch AdamW, no decay on biases / 1-D params, global-norm clip, schedule written out.
    decay = [p for n, p in ref.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in ref.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    topt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPT["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=OPT["lr"], betas=(0.9, 0.999), eps=1e-8,
    )
    ref_losses = []
    for s in range(STEPS):
        topt.zero_grad()
        tokens, labels = make_batch(s)
        loss = lm_loss(ref, tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), OPT["grad_clip"])
        for g in topt.param_groups:
            g["lr"] = _lr_oracle(OPT["lr"], OPT["warmup_steps"], STEPS, OPT["lr_schedule"], s)
        topt.step()
        ref_losses.append(loss.item())
    max_diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    init = build_tiny_gpt(0).parameters()
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), init))

    # bf16 model: fp32 main params inside the optimizer, one step runs and moves the weights.
    bmodel = build_tiny_gpt(seed=0, dtype=torch.bfloat16)
    before = [p.detach().clone() for p in bmodel.parameters()]
    bddp, bopt, bsched = build_optimizer([bmodel], OptimConfig(lr=1e-2), "bf16", total_steps=2)
    bf16_losses = train_steps(bddp, bopt, bsched, 2)
    main_dtypes = {p.dtype for g in bopt.param_groups for p in g["params"]}
    bf16_moved = any(not torch.equal(a, b) for a, b in zip(before, bmodel.parameters()))
    return dict(same_init=same_init, losses=losses, ref_losses=ref_losses, max_diff=max_diff, moved=moved,
                bf16_losses=bf16_losses, main_dtypes=sorted(str(d) for d in main_dtypes),
                bf16_moved=bf16_moved, param_dtype=str(next(bmodel.parameters()).dtype))


def test_megatron_optimizer_matches_torch_adamw():
    (out,) = run_distributed(_megatron_vs_torch, 1)
    assert out["same_init"]
    assert out["moved"] > 1e-4  # the steps did something
    assert out["losses"] == pytest.approx(out["ref_losses"], abs=1e-6)
    assert out["max_diff"] < 1e-6
    assert out["param_dtype"] == "torch.bfloat16" and out["main_dtypes"] == ["torch.float32"]
    assert out["bf16_moved"] and all(math.isfinite(x) for x in out["bf16_losses"])


def _schedule_steps(ddp, opt, sched, steps, dp_rank, dp_size):
    """Like train_steps, but through Megatron's forward_backward_func: the DP grad sync then comes
    only from the hooks attach_to_model_config put on the model config."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        pos = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
        out = model(tokens, pos, None, labels=labels)
        return out, lambda t: (t.float().mean(), {"loss": t.float().mean().detach()})

    losses = []
    for s in range(steps):
        for c in ddp:
            c.zero_grad_buffer()
        opt.zero_grad()
        tokens, labels = make_batch(s)
        per = tokens.shape[0] // dp_size
        sl = slice(dp_rank * per, (dp_rank + 1) * per)
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([(tokens[sl], labels[sl])]), model=ddp,
            num_microbatches=1, seq_length=SEQ, micro_batch_size=per,
        )
        ok, _, _ = opt.step()
        assert ok
        sched.step(1)
        g = out[0]["loss"].clone()
        torch.distributed.all_reduce(g, group=ps.get_data_parallel_group())
        losses.append((g / dp_size).item())
    return losses


def _dp_run(rank, world, use_dist_opt):
    from megatron.core import parallel_state as ps

    from megatron_vppo.train.optimizer import attach_to_model_config, build_optimizer

    init_parallel()
    model = build_tiny_gpt(seed=0)
    cfg = OptimConfig(**OPT, use_distributed_optimizer=use_dist_opt)
    ddp, opt, sched = build_optimizer([model], cfg, "fp32", total_steps=STEPS)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if use_dist_opt:
        attach_to_model_config(ddp, opt)
        losses = _schedule_steps(ddp, opt, sched, STEPS, dp_rank, dp_size)
    else:
        losses = train_steps(ddp, opt, sched, STEPS, dp_rank=dp_rank, dp_size=dp_size)
    return dict(losses=losses, params={n: p.detach().clone() for n, p in model.named_parameters()})


def test_dp2_distributed_optimizer_matches_single_process():
    (single,) = run_distributed(_dp_run, 1, False)
    dp = run_distributed(_dp_run, 2, True)
    for r in range(2):
        assert dp[r]["losses"] == pytest.approx(single["losses"], abs=1e-6)
        for n, p in single["params"].items():
            assert torch.allclose(dp[r]["params"][n], p, atol=1e-6, rtol=0), n

"""ZeroAdamW against torch.optim.AdamW, across world sizes (gloo on CPU), and across resumes.

The toy model has ~5.1k trainable elements, so with 2048-element chunks the flat space really
is split: params straddle shard boundaries and the last shard is short.
"""
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from phi3v import dist as pdist
from phi3v import optim
from phi3v.optim import DynamicLossScaler, ZeroAdamW, lr_at, memory_plan

STEPS, RESUME_AT, WARMUP, PEAK_LR, MAX_NORM = 6, 3, 2, 2e-2, 3.3
# w2 starts off the 16-element grid, and the shard boundaries of 2 and 3 ranks cut it with a partial
# vector on either side: the fused kernel's pieces must not follow the shards.
SHAPES = {"emb": (50, 45), "w1": (61, 45), "b1": (61,), "w2": (37, 61), "b2": (37,)}


def build(dtype=torch.float32) -> dict:
    """Toy model: frozen embedding, two trainable linears. Same weights in every process."""
    g = torch.Generator().manual_seed(1234)
    model = {n: torch.nn.Parameter((torch.randn(s, generator=g) * 0.5).to(dtype))
             for n, s in SHAPES.items()}
    model["emb"].requires_grad_(False)
    return model


def no_decay(name, p):
    return name.startswith("b")


def micro_batch(model, step, m):
    """Sum-reduced CE of micro-batch m of global step `step`, and its supervised-token count."""
    g = torch.Generator().manual_seed(1000 * step + m)
    n = 3 + (step + 2 * m) % 5
    ids = torch.randint(0, 50, (n,), generator=g)
    labels = torch.randint(0, 37, (n,), generator=g)
    labels[1:][torch.rand(n - 1, generator=g) < 0.3] = -100
    h = torch.tanh(model["emb"][ids] @ model["w1"].T + model["b1"])
    logits = (h @ model["w2"].T + model["b2"]).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"), int((labels >= 0).sum())


def train(model, opt, start, stop, n_micro, rank=0, world=1, sync=True):
    """Global step = n_micro micro-batches; rank r takes r, r+world, ... (possibly none). With `sync`
    the last backward of each step starts the gradient reduction, as train.py does; between it and
    step() sits a collective of the loop's own, as in train.py. Returns grad norms."""
    norms = []
    for s in range(start, stop):
        opt.lr = lr_at(s, PEAK_LR, WARMUP, STEPS)
        count = 0
        mine = list(range(rank, n_micro, world))
        for m in mine:
            loss, n = micro_batch(model, s, m)
            opt.sync_grads = sync and m == mine[-1]
            loss.backward()
            count += n
        total = pdist.all_reduce_sum(torch.tensor(count)).item()
        norms.append(opt.step(grad_scale=1.0 / total))
        opt.zero_grad()
    return norms


def make_opt(model, offload=False):
    return ZeroAdamW(model.items(), lr=PEAK_LR, no_decay=no_decay, max_grad_norm=MAX_NORM, offload=offload)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.items() if p.requires_grad}


def merged(states):
    """Full flat (step, master, exp_avg, exp_avg_sq) from all ranks' state dicts."""
    numel = states[0]["layout"]["numel"]
    shards = sorted(states, key=lambda s: s["layout"]["shard_rank"])
    return {"step": states[0]["step"], **{k: torch.cat([s[k] for s in shards])[:numel]
                                          for k in ("master", "exp_avg", "exp_avg_sq")}}


def assert_equal_dicts(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if exact:
                assert torch.equal(a[k], b[k]), k
            else:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert a[k] == b[k], k


# --- single process ---------------------------------------------------------------------------

def test_lr_schedule_boundaries():
    peak, w, T = 4e-5, 50, 1000
    assert lr_at(0, peak, w, T) == 0.0  # HF applies lr(0) = 0 on the first step
    assert lr_at(25, peak, w, T) == peak * (25 / 50)
    assert lr_at(49, peak, w, T) == peak * (49 / 50)
    assert lr_at(50, peak, w, T) == peak
    assert lr_at(51, peak, w, T) == peak * ((T - 51) / (T - w))
    assert lr_at(999, peak, w, T) == peak * (1 / 950)
    assert lr_at(1000, peak, w, T) == 0.0 and lr_at(1200, peak, w, T) == 0.0
    assert lr_at(0, peak, 0, T) == peak
    assert lr_at(50, peak, w, T, "cosine") == peak
    assert lr_at(525, peak, w, T, "cosine") == pytest.approx(peak / 2, rel=1e-12)
    assert lr_at(1000, peak, w, T, "cosine") == 0.0 and lr_at(1500, peak, w, T, "cosine") == 0.0
    assert lr_at(10, peak, w, T, "cosine") == peak * (10 / 50)
    with pytest.raises(ValueError):
        lr_at(0, peak, w, T, "constant")


def test_world1_matches_torch_adamw():
    model, ref = build(), build()
    opt = make_opt(model)
    decay = [p for n, p in ref.items() if p.requires_grad and not no_decay(n, p)]
    skip = [p for n, p in ref.items() if p.requires_grad and no_decay(n, p)]
    ref_opt = torch.optim.AdamW([{"params": decay}, {"params": skip, "weight_decay": 0.0}],
                                lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.01,
                                foreach=False)
    clipped = []
    for s in range(STEPS):
        lr = lr_at(s, PEAK_LR, WARMUP, STEPS)
        norm = train(model, opt, s, s + 1, n_micro=3)[0]
        count = 0
        for m in range(3):
            loss, n = micro_batch(ref, s, m)
            loss.backward()
            count += n
        for p in decay + skip:
            p.grad.mul_(1.0 / count)
        ref_norm = torch.nn.utils.clip_grad_norm_(decay + skip, MAX_NORM).item()
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
        ref_opt.zero_grad()
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        clipped.append(ref_norm > MAX_NORM)
        for n in ("w1", "b1", "w2", "b2"):
            torch.testing.assert_close(model[n].data, ref[n].data, rtol=1e-5, atol=1e-6)
    assert any(clipped) and not all(clipped), "the test should exercise both clipped and free steps"
    assert torch.equal(model["emb"], build()["emb"])  # frozen: untouched, not in the optimizer
    assert opt.numel == sum(math.prod(SHAPES[n]) for n in ("w1", "b1", "w2", "b2"))


def test_bf16_params_keep_fp32_masters():
    model = build(torch.bfloat16)
    ref = {n: torch.nn.Parameter(p.detach().float()) for n, p in model.items() if p.requires_grad}
    opt = make_opt(model)
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=1e-3, betas=(0.9, 0.95), eps=1e-7,
                                weight_decay=0.0, foreach=False)
    opt.lr, opt.weight_decay, opt.max_grad_norm = 1e-3, 0.0, 0.0
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        for n, p in ref.items():
            grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            model[n].grad, p.grad = grad, grad.float()
        opt.step()
        ref_opt.step()
    full = merged([opt.state_dict()])["master"]
    for n, off in zip(opt.names, opt.offsets):
        master = full[off:off + model[n].numel()].view(model[n].shape)
        torch.testing.assert_close(master, ref[n].data, rtol=1e-5, atol=1e-6)
        assert model[n].dtype == torch.bfloat16 and torch.equal(model[n].data, master.bfloat16())


def test_nonfinite_grad_skips_step():
    model = build()
    opt = make_opt(model)
    train(model, opt, 0, 2, n_micro=2)
    before, state = trainable(model), opt.state_dict()
    for bad in (float("inf"), float("nan")):
        for _, p in list(model.items())[1:]:
            p.grad = torch.zeros_like(p)
        model["b2"].grad[3] = bad
        assert not math.isfinite(opt.step())
        opt.zero_grad()
        assert_equal_dicts(trainable(model), before)
        assert_equal_dicts(merged([opt.state_dict()]), merged([state]))


def test_discard_and_all_finite():
    """discard() drops a step's gradients without touching weights or state; all_finite() sees a nan
    or inf in the weights, the masters (bf16 parameters) or a moment."""
    for dtype in (torch.float32, torch.bfloat16):
        model = build(dtype)
        opt = make_opt(model)
        train(model, opt, 0, 2, n_micro=2)
        before, state = trainable(model), opt.state_dict()
        loss, _ = micro_batch(model, 2, 0)
        loss.backward()
        opt.discard()
        assert all(p.grad is None for p in model.values())
        assert_equal_dicts(trainable(model), before)
        assert_equal_dicts(merged([opt.state_dict()]), merged([state]))
        assert opt.all_finite()
        for t, bad in ((model["w2"].data, float("nan")), (opt.master, float("inf")), (opt.exp_avg, float("-inf")),
                       (opt.exp_avg_sq, float("nan"))):
            keep = t[7].clone()
            t[7] = bad
            assert not opt.all_finite()
            t[7] = keep
            assert opt.all_finite()


def test_dynamic_loss_scaler():
    scaler = DynamicLossScaler(init_scale=2.0 ** 3, growth_interval=3, min_scale=2.0)
    assert scaler.update(float("inf")) and scaler.scale == 4.0 and not scaler.stuck
    assert scaler.update(float("nan")) and scaler.scale == 2.0 and not scaler.stuck   # reached the floor
    assert scaler.update(float("inf")) and scaler.scale == 2.0 and scaler.stuck   # clamped at min_scale
    assert not any(scaler.update(1.0) for _ in range(2)) and scaler.scale == 2.0 and not scaler.stuck
    assert not scaler.update(1.0) and scaler.scale == 4.0  # grows after 3 clean steps
    fresh = DynamicLossScaler()
    assert fresh.scale == 2.0 ** 16
    fresh.load_state_dict(scaler.state_dict())
    assert fresh.state_dict() == scaler.state_dict()


def test_state_dict_roundtrip_same_world_is_bitwise():
    model = build()
    opt = make_opt(model)
    train(model, opt, 0, RESUME_AT, n_micro=2)
    state, weights = opt.state_dict(), trainable(model)
    train(model, opt, RESUME_AT, STEPS, n_micro=2)

    model2 = build()
    opt2 = make_opt(model2)
    opt2.load_state_dict(state)
    assert_equal_dicts(trainable(model2), weights)  # params restored from the masters
    assert_equal_dicts(merged([opt2.state_dict()]), merged([state]))
    train(model2, opt2, RESUME_AT, STEPS, n_micro=2)
    assert_equal_dicts(trainable(model2), trainable(model))
    assert_equal_dicts(merged([opt2.state_dict()]), merged([opt.state_dict()]))


def test_load_rejects_other_params():
    model = build()
    state = make_opt(model).state_dict()
    model.pop("b2")
    with pytest.raises(ValueError, match="params"):
        make_opt(model).load_sharded([state])


# --- several ranks (gloo) ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_early_reductions(opt) -> list[int]:
    """Wrap opt.step to record, per step, how many reduction buckets had started before it (in backward)."""
    started, step = [], opt.step

    def wrapped(grad_scale=1.0):
        started.append(len(opt._comm) - 1 - opt._next)
        return step(grad_scale)
    opt.step = wrapped
    return started


def _worker(rank, world, port, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        # Two reduction buckets over the flat space (8192 elements for 2 ranks, 6144 for 3), the
        # first straddling two shards.
        optim._BUCKET = {2: 3 * optim._CHUNK, 3: 2 * optim._CHUNK}[world]
        out = {}
        # Gradient accumulation over 6 micro-batches per step, split over the ranks; the gradients
        # are reduced during each rank's last backward (sync) or in step().
        for sync in (True, False):
            model = build()
            opt = make_opt(model)
            started = record_early_reductions(opt)
            train(model, opt, 0, STEPS, n_micro=6, rank=rank, world=world, sync=sync)
            out[f"accum_sync{sync}"], out[f"started_sync{sync}"] = trainable(model), started
            out["n_buckets"] = len(opt._comm)
        # The same with masters and moments in host memory (a copy of their own here on the CPU).
        model = build()
        opt = make_opt(model, offload=True)
        train(model, opt, 0, STEPS, n_micro=6, rank=rank, world=world)
        out["accum_offload"] = trainable(model)

        # One micro-batch per step: only rank 0 runs a backward (and reduces during it); the others
        # reduce in step(), after the loop's all-reduce of the token count. Also with bf16
        # parameters (fp32 masters, bf16 gradients reduced in fp32, bf16 all-gather).
        for dtype in (torch.float32, torch.bfloat16):
            model = build(dtype)
            opt = make_opt(model)
            started = record_early_reductions(opt)
            train(model, opt, 0, STEPS, n_micro=1, rank=rank, world=world)
            out[f"uneven_{dtype}"], out[f"uneven_started_{dtype}"] = trainable(model), started
            out[f"uneven_state_{dtype}"] = opt.state_dict()

        # Two micro-batches per step: the summed gradients are then bitwise the same for one,
        # two or three ranks, so resumed runs can be compared bitwise across world sizes.
        if world == 2:
            model = build()
            opt = make_opt(model)
            train(model, opt, 0, RESUME_AT, n_micro=2, rank=rank, world=world)
            torch.save(opt.state_dict(), tmp / f"ws2_rank{rank}.pt")
            train(model, opt, RESUME_AT, STEPS, n_micro=2, rank=rank, world=world)
            out["straight"], out["straight_state"] = trainable(model), opt.state_dict()
        sources = {2: ["ws2", "ws1"], 3: ["ws2"]}[world]
        for src in sources:
            files = sorted(tmp.glob(f"{src}_rank*.pt"))
            model = build()
            opt = make_opt(model)
            opt.load_sharded(files)
            train(model, opt, RESUME_AT, STEPS, n_micro=2, rank=rank, world=world)
            out[f"from_{src}"], out[f"from_{src}_state"] = trainable(model), opt.state_dict()

        # An inf on one rank only must make every rank skip.
        model = build()
        opt = make_opt(model)
        for n in ("w1", "b1", "w2", "b2"):
            model[n].grad = torch.ones_like(model[n])
        if rank == world - 1:
            model["w1"].grad[0, 0] = float("inf")
        out["inf_norm"] = opt.step()
        out["inf_weights_unchanged"] = all(torch.equal(a, b) for a, b in
                                           zip(trainable(model).values(), trainable(build()).values()))

        # A step discarded after its last backward started the reductions (train.py, on a non-finite
        # loss): nothing is updated and every rank finishes; then a nan in one rank's moments makes
        # all_finite() False on every rank.
        model = build()
        opt = make_opt(model)
        loss, _ = micro_batch(model, 0, rank)
        opt.sync_grads = True
        loss.backward()
        opt.discard()
        out["discard_unchanged"] = all(torch.equal(a, b) for a, b in
                                       zip(trainable(model).values(), trainable(build()).values()))
        out["finite_before"] = opt.all_finite()
        if rank == world - 1:
            opt.exp_avg_sq[-1] = float("nan")
        out["finite_after"] = opt.all_finite()

        # sync_grads on a backward that is not the last: the next backward's gradients would miss
        # the reduction, which is an error; step() then finishes what was started, on every rank.
        model = build()
        opt = make_opt(model)
        for m in range(2):
            loss, _ = micro_batch(model, 0, m)
            opt.sync_grads = True
            try:
                loss.backward()
            except RuntimeError as e:
                out["misuse"] = str(e)
        opt.step()

        # Device memory of the optimizer, measured, against the planner's figures.
        out["plan"] = memory_plan([p for p in build().values() if p.requires_grad], world)
        (params, opt), out["allocated"], _ = allocations(
            lambda: (ps := [p for p in build().values() if p.requires_grad], ZeroAdamW(ps, lr=PEAK_LR)))
        out["weights"] = sum(p.numel() for p in params) * 4     # the parameters, now in opt.flat
        torch.save(out, tmp / f"out_ws{world}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """World size 1 in process, then 2 and 3 ranks spawned; returns every rank's results."""
    tmp = tmp_path_factory.mktemp("zero")
    # Matmul results depend on the thread count; the workers use one thread, so do we.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _runs(tmp)
    finally:
        torch.set_num_threads(threads)


def _runs(tmp):
    res = {1: {}}
    for n_micro in (6, 2, 1):
        model = build()
        opt = make_opt(model)
        train(model, opt, 0, STEPS, n_micro=n_micro)
        res[1][f"accum_{n_micro}"] = trainable(model)
        res[1][f"state_{n_micro}"] = opt.state_dict()
    model = build(torch.bfloat16)
    opt = make_opt(model)
    train(model, opt, 0, STEPS, n_micro=1)
    res[1]["accum_1_bf16"], res[1]["state_1_bf16"] = trainable(model), opt.state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        model = build(dtype)
        opt = make_opt(model, offload=True)
        assert opt.master.data_ptr() != opt.flat.data_ptr()     # the masters are a copy of their own
        train(model, opt, 0, STEPS, n_micro=6 if dtype == torch.float32 else 1)
        res[1][f"offload_{dtype}"], res[1][f"offload_state_{dtype}"] = trainable(model), opt.state_dict()
    model = build()
    opt = make_opt(model)
    train(model, opt, 0, RESUME_AT, n_micro=2)
    torch.save(opt.state_dict(), tmp / "ws1_rank0.pt")
    for world in (2, 3):
        mp.spawn(_worker, args=(world, _free_port(), tmp), nprocs=world, join=True)
        res[world] = [torch.load(tmp / f"out_ws{world}_rank{r}.pt") for r in range(world)]
    # 2 ranks -> 1 rank, in process.
    model = build()
    opt = make_opt(model)
    opt.load_sharded([tmp / "ws2_rank0.pt", tmp / "ws2_rank1.pt"])
    train(model, opt, RESUME_AT, STEPS, n_micro=2)
    res[1]["from_ws2"], res[1]["from_ws2_state"] = trainable(model), opt.state_dict()
    return res


@pytest.mark.parametrize("world", [2, 3])
def test_world_sizes_agree_with_accumulation(runs, world):
    for r in range(world):  # every rank ends with the full, identical parameters
        for sync in (True, False):  # and reducing during backward changes no bit
            assert_equal_dicts(runs[world][r][f"accum_sync{sync}"], runs[world][0]["accum_syncTrue"])
    assert_equal_dicts(runs[world][0]["accum_syncTrue"], runs[1]["accum_6"], exact=False)


def test_offload_changes_no_bit(runs):
    """Masters and moments in host memory (here: a separate copy) give bitwise the same run, on one
    rank (fp32 and bf16 parameters) and on two and three."""
    assert_equal_dicts(runs[1]["offload_torch.float32"], runs[1]["accum_6"])
    assert_equal_dicts(runs[1]["offload_torch.bfloat16"], runs[1]["accum_1_bf16"])
    for key in ("master", "exp_avg", "exp_avg_sq"):
        assert torch.equal(runs[1]["offload_state_torch.float32"][key], runs[1]["state_6"][key])
    for world in (2, 3):
        for r in range(world):
            assert_equal_dicts(runs[world][r]["accum_offload"], runs[world][0]["accum_syncTrue"])


def test_memory_plan_offload():
    params = [torch.nn.Parameter(torch.zeros(5000, dtype=torch.bfloat16))]
    on, off = memory_plan(params, offload=True), memory_plan(params)
    assert on["master"] == on["exp_avg"] == on["exp_avg_sq"] == 0 and on["host"] == off["master"] * 3
    assert off["persistent"] - on["persistent"] == 3 * off["master"]


@pytest.mark.parametrize("world", [2, 3])
def test_reduction_starts_during_the_last_backward(runs, world):
    for r in range(world):
        out = runs[world][r]
        assert out["n_buckets"] == 2
        assert out["started_syncTrue"] == [2] * STEPS     # every bucket started before step()
        assert out["started_syncFalse"] == [0] * STEPS    # without sync_grads, all in step()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_without_backward_reduces_in_step(runs, world, dtype):
    """Rank 0 reduces during its backward, the others (no micro-batch) only in step(), after the loop's
    all-reduce: no deadlock, and bitwise the one-rank result (the others add zero gradients)."""
    one = {torch.float32: ("accum_1", "state_1"), torch.bfloat16: ("accum_1_bf16", "state_1_bf16")}[dtype]
    assert runs[world][0][f"uneven_started_{dtype}"] == [2] * STEPS
    for r in range(world):
        if r:
            assert runs[world][r][f"uneven_started_{dtype}"] == [0] * STEPS
        assert_equal_dicts(runs[world][r][f"uneven_{dtype}"], runs[1][one[0]])
    assert_equal_dicts(merged([runs[world][r][f"uneven_state_{dtype}"] for r in range(world)]),
                       merged([runs[1][one[1]]]))


@pytest.mark.parametrize("world", [2, 3])
def test_gradient_after_its_reduction_is_an_error(runs, world):
    for r in range(world):
        assert "after it was reduced" in runs[world][r]["misuse"]


def test_shards_are_uneven_and_split_params(runs):
    layout = runs[3][0]["from_ws2_state"]["layout"]
    assert layout["n_shards"] == 3
    assert layout["numel"] % (3 * layout["shard_numel"]) != 0
    inner = [o % layout["shard_numel"] for o in layout["offsets"]]
    straddle = [o + math.prod(s) > (o // layout["shard_numel"] + 1) * layout["shard_numel"]
                for o, s in zip(layout["offsets"], layout["shapes"])]
    assert any(straddle) and any(i != 0 for i in inner)


def test_resume_same_world_is_bitwise(runs):
    for r in range(2):
        out = runs[2][r]
        assert_equal_dicts(out["from_ws2"], out["straight"])
        assert_equal_dicts(out["from_ws2_state"], out["straight_state"])


def test_resume_two_ranks_on_one_is_bitwise(runs):
    straight = runs[2][0]["straight"]
    assert_equal_dicts(runs[1]["from_ws2"], straight)
    assert_equal_dicts(merged([runs[1]["from_ws2_state"]]),
                       merged([runs[2][r]["straight_state"] for r in range(2)]))


def test_resume_one_rank_on_two_is_bitwise(runs):
    for r in range(2):
        assert_equal_dicts(runs[2][r]["from_ws1"], runs[1]["accum_2"])
    assert_equal_dicts(merged([runs[2][r]["from_ws1_state"] for r in range(2)]),
                       merged([runs[1]["state_2"]]))


def test_resume_two_ranks_on_three_is_bitwise(runs):
    # The third rank gets no micro-batch (n_micro=2), and x + 0 is exact, so sums still agree.
    for r in range(3):
        assert_equal_dicts(runs[3][r]["from_ws2"], runs[2][0]["straight"])
    assert_equal_dicts(merged([runs[3][r]["from_ws2_state"] for r in range(3)]),
                       merged([runs[2][r]["straight_state"] for r in range(2)]))


@pytest.mark.parametrize("world", [2, 3])
def test_inf_on_one_rank_skips_everywhere(runs, world):
    for r in range(world):
        assert runs[world][r]["inf_norm"] == float("inf")
        assert runs[world][r]["inf_weights_unchanged"]


@pytest.mark.parametrize("world", [2, 3])
def test_discard_and_all_finite_on_every_rank(runs, world):
    for r in range(world):
        assert runs[world][r]["discard_unchanged"]
        assert runs[world][r]["finite_before"] and not runs[world][r]["finite_after"]


@pytest.mark.parametrize("world", [2, 3])
def test_memory_plan_several_ranks(runs, world):
    """Persistent bytes per rank (masters none: fp32; moments and reduced-gradient shard; padding)."""
    for r in range(world):
        plan, allocated = runs[world][r]["plan"], runs[world][r]["allocated"]
        assert plan["grad_shard"] == plan["exp_avg"] and plan["master"] == 0
        allocated -= runs[world][r]["weights"]
        assert abs(allocated - plan["persistent"]) <= 0.03 * plan["persistent"], (allocated, plan)


# --- dist helpers -------------------------------------------------------------------------------

def test_dist_helpers_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert pdist.init().type in ("cpu", "cuda") and not dist.is_initialized()
    assert pdist.rank() == 0 and pdist.world_size() == 1 and pdist.is_main()
    t = torch.tensor([3.0])
    assert pdist.all_reduce_sum(t) is t and t.item() == 3.0
    pdist.barrier()
    pdist.cleanup()


def test_dist_init_from_torchrun_env():
    script = ("import torch; from phi3v import dist; dist.init(); "
              "t = dist.all_reduce_sum(torch.tensor([dist.rank() + 1.0])); "
              "dist.barrier(); print(dist.world_size(), t.item()); dist.cleanup()")
    port = str(_free_port())
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env,
                                      stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["2 3.0", "2 3.0"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_world1_bucket_size_changes_no_bit(monkeypatch, dtype):
    """One rank works bucket by bucket (bf16: an fp32 copy of one bucket of gradients at a time). The
    bucket size must not change a single bit: parameters, decay groups, norm chunks and the fused
    kernel's 16-element pieces all cross bucket boundaries here."""
    torch.manual_seed(0)
    shapes = [(37, 300), (5000,), (64, 129), (3,)]
    base = [torch.randn(s).to(dtype) for s in shapes]
    runs = []
    for bucket in (optim._BUCKET, optim._CHUNK):
        monkeypatch.setattr(optim, "_BUCKET", bucket)
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = ZeroAdamW(params, lr=1e-2, weight_decay=0.1, no_decay=[params[1]], max_grad_norm=0.5)
        assert opt.grad is None and len(opt.buckets) == (1 if bucket > opt.numel else opt.shard_numel // bucket)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * 3).to(dtype)
            opt.step(grad_scale=0.25)
            opt.zero_grad()
        runs.append([p.detach().clone() for p in params] + [opt.master.clone(), opt.exp_avg.clone(),
                                                              opt.exp_avg_sq.clone()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_fp32_params_are_their_own_masters():
    """fp32 parameters become views of the flat buffer whose shard is the master: nothing copied,
    nothing written back; bf16 ones keep an fp32 master. One rank holds no gradient buffer."""
    model = build()
    opt = make_opt(model)
    assert opt.grad is None and opt.flat.dtype == torch.float32
    assert opt.master.data_ptr() == opt.flat.data_ptr() == model["w1"].data_ptr()
    for n, off in zip(opt.names, opt.offsets):
        assert model[n].data_ptr() == opt.flat[off:].data_ptr()
    train(model, opt, 0, 2, n_micro=2)
    assert torch.equal(merged([opt.state_dict()])["master"][opt.offsets[2]:opt.offsets[3]],
                       model["w2"].detach().view(-1))
    bf = build(torch.bfloat16)
    opt = make_opt(bf)
    assert opt.flat.dtype == torch.bfloat16 and opt.master.dtype == torch.float32
    assert opt.master.data_ptr() != opt.flat.data_ptr()


def test_rejects_mixed_dtypes():
    model = build()
    model["b2"].data = model["b2"].data.bfloat16()
    with pytest.raises(ValueError, match="one dtype"):
        make_opt(model)


def test_missing_gradient_counts_as_zero():
    a, b = build(), build()
    opt_a, opt_b = make_opt(a), make_opt(b)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        for n in ("w1", "b1", "w2"):
            a[n].grad = torch.randn(a[n].shape, generator=g)
            b[n].grad = a[n].grad.clone()
        b["b2"].grad = torch.zeros_like(b["b2"])   # a["b2"] gets none
        assert opt_a.step() == opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    assert_equal_dicts(trainable(a), trainable(b))
    assert_equal_dicts(merged([opt_a.state_dict()]), merged([opt_b.state_dict()]))


# --- memory: what the planner is told, against what is allocated --------------------------------

def allocations(fn):
    """(fn(), net bytes, peak bytes) of CPU memory allocated while fn runs. The profiler's memory
    tracking reports every allocation and free of torch's CPU allocator, kernel temporaries included."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return out, total, peak


def big_params(dtype):
    """About 1.1M elements in odd shapes (no parameter 16-element aligned), decay and no-decay."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1021, 517), (517,), (333, 1013), (1013,), (77, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_plan_matches_allocations(monkeypatch, dtype):
    """ZeroAdamW's persistent state, step() peak and state_dict() peak as measured on CPU, against
    memory_plan (computed from meta parameters), within 3% (plus 4 KiB of small tensors)."""
    monkeypatch.setattr(optim, "_BUCKET", 1 << 16)     # several buckets: the bf16 step copies one at a time
    plan = memory_plan([torch.nn.Parameter(p.detach().to("meta")) for p in big_params(dtype)])
    assert plan == memory_plan(big_params(dtype))

    def close(measured, planned):
        assert abs(measured - planned) <= 0.03 * planned + 4096, (measured, planned)

    # Built inside the measurement, so that freeing the parameters' old storage is seen too.
    (params, opt), net, peak = allocations(
        lambda: (ps := big_params(dtype), ZeroAdamW(ps, lr=1e-3, no_decay=lambda n, p: p.dim() < 2)))
    weights = sum(p.numel() for p in params) * dtype.itemsize     # the parameters, now in opt.flat
    close(net - weights, plan["persistent"])
    close(peak - weights, plan["init"])
    for p in params:
        p.grad = torch.randn(p.shape).to(dtype)
    norm, net, peak = allocations(opt.step)
    assert 0 < norm < float("inf") and opt.step_count == 1
    close(peak, plan["step"])
    assert net <= 4096                                    # nothing kept (a few scalars)
    state, net, peak = allocations(opt.state_dict)
    assert net == peak == plan["save_host"]               # the state itself and nothing more
    assert plan["save"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_is_a_snapshot_with_no_transient(monkeypatch, dtype):
    """state_dict() allocates its result and nothing beyond it (the bound asked: one bucket), and a
    later step does not change it."""
    monkeypatch.setattr(optim, "_BUCKET", 1 << 16)
    params = big_params(dtype)
    opt = ZeroAdamW(params, lr=1e-3)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape).to(dtype)
        opt.step()
    state, net, peak = allocations(opt.state_dict)
    size = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    assert size == 3 * 4 * opt.shard_numel and net == size
    assert peak - size <= 4 * optim._BUCKET
    assert peak == size
    before = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    opt.step()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert not torch.equal(opt.exp_avg, before["exp_avg"])

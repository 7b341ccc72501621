"""ZeroAdamW against torch.optim.AdamW, across world sizes (gloo on CPU), and across resumes.

The toy model has ~5.2k trainable elements, so with 2048-element chunks the flat space really
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
from phi3v.optim import DynamicLossScaler, ZeroAdamW, lr_at

STEPS, RESUME_AT, WARMUP, PEAK_LR, MAX_NORM = 6, 3, 2, 2e-2, 3.3
SHAPES = {"emb": (50, 47), "w1": (61, 47), "b1": (61,), "w2": (37, 61), "b2": (37,)}


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


def train(model, opt, start, stop, n_micro, rank=0, world=1):
    """Global step = n_micro micro-batches; rank r takes r, r+world, ... Returns grad norms."""
    norms = []
    for s in range(start, stop):
        opt.lr = lr_at(s, PEAK_LR, WARMUP, STEPS)
        count = 0
        for m in range(rank, n_micro, world):
            loss, n = micro_batch(model, s, m)
            loss.backward()
            count += n
        total = pdist.all_reduce_sum(torch.tensor(count)).item()
        norms.append(opt.step(grad_scale=1.0 / total))
        opt.zero_grad()
    return norms


def make_opt(model, mode="zero2"):
    return ZeroAdamW(model.items(), lr=PEAK_LR, no_decay=no_decay, max_grad_norm=MAX_NORM, mode=mode)


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


def test_dynamic_loss_scaler():
    scaler = DynamicLossScaler(init_scale=2.0 ** 3, growth_interval=3, min_scale=2.0)
    assert scaler.update(float("inf")) and scaler.scale == 4.0
    assert scaler.update(float("nan")) and scaler.scale == 2.0
    assert scaler.update(float("inf")) and scaler.scale == 2.0  # clamped at min_scale
    assert not any(scaler.update(1.0) for _ in range(2)) and scaler.scale == 2.0
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


def _worker(rank, world, port, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        out = {}
        # Gradient accumulation over 6 micro-batches per step, split over the ranks.
        for mode in ("zero2", "allreduce"):
            model = build()
            train(model, make_opt(model, mode), 0, STEPS, n_micro=6, rank=rank, world=world)
            out[f"accum_{mode}"] = trainable(model)

        # Two micro-batches per step: the summed gradients are then bitwise the same for one,
        # two or three ranks, so resumed runs can be compared bitwise across world sizes.
        if world == 2:
            model = build()
            opt = make_opt(model)
            train(model, opt, 0, RESUME_AT, n_micro=2, rank=rank, world=world)
            torch.save(opt.state_dict(), tmp / f"ws2_rank{rank}.pt")
            train(model, opt, RESUME_AT, STEPS, n_micro=2, rank=rank, world=world)
            out["straight"], out["straight_state"] = trainable(model), opt.state_dict()
            model = build()
            opt = make_opt(model, mode="allreduce")
            train(model, opt, 0, RESUME_AT, n_micro=2, rank=rank, world=world)
            torch.save(opt.state_dict(), tmp / f"allreduce2_rank{rank}.pt")
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
    for n_micro in (6, 2):
        model = build()
        opt = make_opt(model)
        train(model, opt, 0, STEPS, n_micro=n_micro)
        res[1][f"accum_{n_micro}"] = trainable(model)
        res[1][f"state_{n_micro}"] = opt.state_dict()
    model = build()
    opt = make_opt(model)
    train(model, opt, 0, RESUME_AT, n_micro=2)
    torch.save(opt.state_dict(), tmp / "ws1_rank0.pt")
    for world in (2, 3):
        mp.spawn(_worker, args=(world, _free_port(), tmp), nprocs=world, join=True)
        res[world] = [torch.load(tmp / f"out_ws{world}_rank{r}.pt") for r in range(world)]
    # 2 ranks -> 1 rank, in process; also from the allreduce mode's (replicated) state.
    for src in ("ws2", "allreduce2"):
        model = build()
        opt = make_opt(model)
        opt.load_sharded([tmp / f"{src}_rank0.pt", tmp / f"{src}_rank1.pt"])
        train(model, opt, RESUME_AT, STEPS, n_micro=2)
        res[1][f"from_{src}"], res[1][f"from_{src}_state"] = trainable(model), opt.state_dict()
    return res


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["zero2", "allreduce"])
def test_world_sizes_agree_with_accumulation(runs, world, mode):
    for r in range(world):  # every rank ends with the full, identical parameters
        assert_equal_dicts(runs[world][r][f"accum_{mode}"], runs[world][0][f"accum_{mode}"])
    assert_equal_dicts(runs[world][0][f"accum_{mode}"], runs[1]["accum_6"], exact=False)


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


def test_resume_from_allreduce_mode_state(runs):
    assert runs[1]["from_allreduce2_state"]["layout"]["mode"] == "zero2"
    assert_equal_dicts(runs[1]["from_allreduce2"], runs[2][0]["straight"])
    assert_equal_dicts(merged([runs[1]["from_allreduce2_state"]]),
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


# --- dist helpers -------------------------------------------------------------------------------

def test_dist_helpers_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert pdist.init().type in ("cpu", "cuda") and not dist.is_initialized()
    assert pdist.rank() == 0 and pdist.world_size() == 1 and pdist.is_main()
    t = torch.tensor([3.0])
    assert pdist.all_reduce_sum(t) is t and t.item() == 3.0
    assert pdist.broadcast_object({"a": 1}) == {"a": 1}
    pdist.barrier()
    pdist.cleanup()


def test_dist_init_from_torchrun_env():
    script = ("import torch; from phi3v import dist; dist.init(); "
              "t = dist.all_reduce_sum(torch.tensor([dist.rank() + 1.0])); "
              "o = dist.broadcast_object('from %d' % dist.rank()); dist.barrier(); "
              "print(dist.world_size(), t.item(), o); dist.cleanup()")
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
    assert outs == ["2 3.0 from 0", "2 3.0 from 0"]


def test_world1_streamed_buckets_bitwise_equal_one_bucket():
    """One rank reads gradients bucket by bucket (no full fp32 copy); the bucket size must not
    change a single bit: decay ranges and the chunked norm cross bucket boundaries here."""
    from phi3v.optim import _CHUNK
    torch.manual_seed(0)
    shapes = [(37, 300), (5000,), (64, 129), (3,)]
    base = [torch.randn(s) for s in shapes]
    runs = []
    for bucket in (None, _CHUNK):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = ZeroAdamW(params, lr=1e-2, weight_decay=0.1, no_decay=[params[1]], max_grad_norm=0.5)
        if bucket:
            opt.bucket = bucket
        assert opt.grad is None and len(list(opt._buckets())) == (1 if bucket is None else opt.shard_numel // _CHUNK)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 3
            opt.step(grad_scale=0.25)
            opt.zero_grad()
        runs.append([p.detach().clone() for p in params] + [opt.exp_avg.clone(), opt.exp_avg_sq.clone()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)

"""AWP under DistributedDataParallel (2 CPU processes, gloo): every rank must add the same v, the ascent
direction of the global batch, and DDP's own gradient reduction must still work after the ascent pass."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flatrobust import AWP, models


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = models.create("smallcnn", in_channels=1)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    g = torch.Generator().manual_seed(1)
    x_all, y_all = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    x, y = x_all[rank * 8:(rank + 1) * 8], y_all[rank * 8:(rank + 1) * 8]  # each rank its half
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    awp = AWP(ddp, gamma=0.01)
    for _ in range(2):  # two steps: DDP's reducer must not be left waiting by the ascent pass
        awp.perturb(lambda m: F.cross_entropy(m(x), y))
        v = [t.clone() for t in awp.perturbation()]
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        awp.restore()
    torch.save({"v": v, "w": [p.detach().clone() for p in net.parameters()]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_awp_under_ddp_adds_the_global_ascent_direction_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for a, b in zip(r0["v"], r1["v"]):
        assert torch.equal(a, b)
    for a, b in zip(r0["w"], r1["w"]):
        assert torch.allclose(a, b, atol=1e-7)
    # v is the direction of the gradient of the mean of both ranks' losses (the global batch)
    torch.manual_seed(0)
    net = models.create("smallcnn", in_channels=1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    # replay step 1 on one process: grads averaged over the halves == gradient of the mean of half-losses
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    awp = AWP(net, gamma=0.01)
    loss_fn = lambda m: 0.5 * (F.cross_entropy(m(x[:8]), y[:8]) + F.cross_entropy(m(x[8:]), y[8:]))  # noqa: E731
    for _ in range(2):
        awp.perturb(loss_fn)
        v = [t.clone() for t in awp.perturbation()]
        net.train()
        loss = loss_fn(net)
        opt.zero_grad()
        loss.backward()
        opt.step()
        awp.restore()
    for a, b in zip(v, r0["v"]):
        assert torch.allclose(a, b, atol=1e-6)


def test_torchrun_training_two_processes(tmp_path):
    """`torchrun --nproc_per_node=2 -m flatrobust train`: one process writes the run directory, every
    evaluation example is counted exactly once across the processes, and the checkpoint is usable."""
    import json
    import subprocess
    import sys

    from flatrobust.checkpoint import model_from_checkpoint
    from flatrobust.config import load_config
    from flatrobust.train import build

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "flatrobust", "train", "recipes/digits_at_awp.yaml", "awp.warmup=0", "data.train_subset=256", "data.eval_subset=60",
           "batch_size=64", "eval.batch_size=16", "attack.steps=2", "eval.steps=2", "epochs=2", "device=cpu",
           f"out_dir={tmp_path}", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "digits_at_awp"
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]  # written once, not once per process
    assert lines[-1]["step"] == 2 * (256 // 64)  # global batches of 64, 32 per process
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2

    # Clean accuracy is deterministic: recomputing it in one process from the final checkpoint must give
    # exactly the figure the two processes summed (60 examples in batches of 16 split unevenly over 2 ranks).
    cfg = load_config(run_dir / "config.yaml")
    run = build(cfg)
    model, _ = model_from_checkpoint(run_dir / "last.pt")
    model.eval()
    with torch.no_grad():
        clean = (model(run.eval_test.x).argmax(1) == run.eval_test.y).sum().item() / len(run.eval_test)
        clean_train = (model(run.eval_train.x).argmax(1) == run.eval_train.y).sum().item() / len(run.eval_train)
    assert lines[-1]["test_clean_acc"] == pytest.approx(clean, abs=1e-9)
    assert lines[-1]["train_clean_acc"] == pytest.approx(clean_train, abs=1e-9)
    assert 0 <= lines[-1]["test_robust_acc"] <= lines[-1]["test_clean_acc"]


def _fit_worker(rank: int, world: int, jobs: list[tuple[int, list[str], int | None, str | None]]) -> None:
    """Each job (port, overrides, stop_after_steps, resume_dir) is one `fit` under DDP, one after the other."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from flatrobust.config import load_config
    from flatrobust.train import fit

    for port, over, stop, resume in jobs:
        os.environ["MASTER_PORT"] = str(port)
        fit(load_config("recipes/digits_at_awp.yaml", over), progress=False, stop_after_steps=stop, resume_dir=resume)


def test_ddp_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    """checkpoint_every under 2 processes: stopped inside an epoch and resumed with 2 processes, the run ends
    bit-identical to the uninterrupted one (each process's noise stream is in the checkpoint); resuming it with
    another number of processes is refused with one line."""
    import json

    from flatrobust.config import load_config
    from flatrobust.errors import UserError
    from flatrobust.rundir import without_timing
    from flatrobust.train import fit

    over = ["awp.warmup=0", "data.train_subset=256", "data.eval_subset=32", "batch_size=64", "attack.steps=1",
            "eval.steps=1", "epochs=2", "checkpoint_every=1", "device=cpu", f"out_dir={tmp_path}"]
    cut = tmp_path / "cut"
    jobs = [(_free_port(), over + ["name=full"], None, None), (_free_port(), over + ["name=cut"], 6, None)]  # cut: epoch 2, step 2
    mp.spawn(_fit_worker, args=(2, jobs), nprocs=2, join=True)
    stopped = torch.load(cut / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["batch"], stopped["world_size"], len(stopped["ranks"])) == (1, 2, 2, 2)
    assert not torch.equal(stopped["ranks"][0]["noise_state"], stopped["ranks"][1]["noise_state"])
    with pytest.raises(UserError, match="taken inside epoch 2 by 2 process"):
        fit(load_config(cut / "config.yaml"), resume_dir=cut, progress=False)
    mp.spawn(_fit_worker, args=(2, [(_free_port(), over + ["name=cut"], None, str(cut))]), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / n / "last.pt", weights_only=True) for n in ("full", "cut"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = [[without_timing(json.loads(ln)) for ln in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("full", "cut")]
    assert rows[0] == rows[1] and len(rows[0]) == 2

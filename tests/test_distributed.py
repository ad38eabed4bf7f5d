"""AWP under DistributedDataParallel (2 CPU processes, gloo): every rank must add the same v, the ascent
direction of the global batch, and DDP's own gradient reduction must still work after the ascent pass."""
import os
import socket

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

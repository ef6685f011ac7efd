"""fit_clusters under DistributedDataParallel: rank 0 fits, every rank ends with its clusters.

Two CPU processes (gloo, file rendezvous: no ports) run this file as a script. Each builds the
same seeded model, wraps it in DistributedDataParallel and calls ``fit_clusters`` on its own
data, in which different channels are dead, so a fit on each rank's data would differ. One
launch loops over every ``unstructured`` rule and both ``broadcast_buffers`` settings; each rank
writes what it holds to a file and the test compares the files. The same launch fits a 1-D and
a 3-D net (DropCluster1d, DropCluster3d) under the ``"dead"`` rule.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from dropcluster.nn import DropCluster1d, DropCluster2d, DropCluster3d, fit_clusters

WORLD = 2
#: (label, unstructured, identical_neighbours) of every rule the layer offers.
RULES = [
    ("rena/merge", "rena", "merge"),
    ("rena/split", "rena", "split"),
    ("dead", "dead", "merge"),
    ("hopkins", "hopkins", "merge"),
    ("none", "none", "merge"),
]
N_IMAGES = 48
#: Seconds a launch may take (two torch imports on two shared cores, then a few small fits).
LAUNCH_TIMEOUT = 240


class _Net(nn.Module):
    """Conv + ReLU stem, DropCluster2d, pooling, linear: the layer sits where the paper puts it.

    Stem channels 0-1 sum their (positive) window, so they are alive on images >= 0 and dead on
    images <= 0; channel 2 is dead on any image; the others are random.
    """

    def __init__(self, unstructured: str, identical_neighbours: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        with torch.no_grad():
            self.stem.weight[:2] = 0.2
            self.stem.bias[:2] = -0.01
            self.stem.weight[2] = 0.0
            self.stem.bias[2] = -1.0
        self.drop = DropCluster2d(
            0.5,
            4,
            unstructured=unstructured,
            identical_neighbours=identical_neighbours,
            max_rounds=200,
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.stem(x))))


def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth 1x10x10 images, >= 0 on rank 0 and <= 0 on rank 1, and their labels."""
    generator = torch.Generator().manual_seed(100 + rank)
    noise = torch.randn(N_IMAGES, 1, 10, 10, generator=generator)
    images = nn.functional.avg_pool2d(noise, 3, 1, padding=1).abs()
    labels = torch.randint(0, 10, (N_IMAGES,), generator=generator)
    return (images if rank == 0 else -images), labels


def _state(layer: DropCluster2d) -> dict[str, torch.Tensor]:
    return {name: getattr(layer, name).clone() for name in DropCluster2d.STATE}


def _run_rank(rank: int, rule: tuple[str, str, str], broadcast_buffers: bool) -> dict:
    """One fit and one training step under DDP on this rank; what the rank then holds."""
    _, unstructured, neighbours = rule
    torch.manual_seed(0)  # the same model on every rank
    model = _Net(unstructured, neighbours)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
    images, labels = _rank_data(rank)
    fit = fit_clusters(ddp, images, N_IMAGES, batch_size=16)
    fitted = _state(model.drop)
    # What this rank alone would have fitted: proves the ranks' data disagree.
    with torch.no_grad():
        alone = DropCluster2d(
            0.5, 4, unstructured=unstructured, identical_neighbours=neighbours, max_rounds=200
        ).fit(torch.relu(model.stem(images)))
    torch.manual_seed(1000 + rank)  # per-rank global seed, as for dropout
    model.drop.record_mask = True
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ddp.train()
    output = ddp(images[:16])
    nn.functional.cross_entropy(output, labels[:16]).backward()
    optimizer.step()
    return {
        "fitted": fitted,
        "flag": model.drop.fitted,
        "structured": fit.structured,
        "alone": _state(alone),
        "after_step": _state(model.drop),
        "output_shape": tuple(output.shape),
        "mask": model.drop.last_mask.clone(),
        "parameters": [parameter.detach().clone() for parameter in model.parameters()],
    }


class _NdNet(nn.Module):
    """_Net's stem on (N, 1, L) sequences or (N, 1, D, H, W) volumes: Conv1d/Conv3d + ReLU,
    DropCluster1d/3d, pooling, linear; channels 0-1 alive on images >= 0, dead on images <= 0."""

    def __init__(self, grid_dims: int) -> None:
        super().__init__()
        conv = nn.Conv1d if grid_dims == 1 else nn.Conv3d
        pool = nn.AdaptiveAvgPool1d if grid_dims == 1 else nn.AdaptiveAvgPool3d
        self.stem = conv(1, 4, 3, padding=1)
        with torch.no_grad():
            self.stem.weight[:2] = 0.2
            self.stem.bias[:2] = -0.01
        layer = DropCluster1d if grid_dims == 1 else DropCluster3d
        self.drop = layer(0.5, 4, unstructured="dead", max_rounds=200)
        self.head = nn.Sequential(pool(1), nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.stem(x))))


def _run_nd_rank(rank: int, grid_dims: int) -> dict:
    """One DDP fit and training step of a 1-D or 3-D net on rank-specific data."""
    torch.manual_seed(0)
    model = _NdNet(grid_dims)
    ddp = nn.parallel.DistributedDataParallel(model)
    grid = (24,) if grid_dims == 1 else (4, 6, 6)
    generator = torch.Generator().manual_seed(200 + rank)
    noise = torch.randn(16, 1, *(size + 2 for size in grid), generator=generator)
    pool = nn.functional.avg_pool1d if grid_dims == 1 else nn.functional.avg_pool3d
    images = pool(noise, 3, 1).abs() * (1 if rank == 0 else -1)
    fit_clusters(ddp, images, 16, batch_size=8)
    fitted = _state(model.drop)
    with torch.no_grad():
        alone = type(model.drop)(0.5, 4, unstructured="dead", max_rounds=200)
        alone.fit(torch.relu(model.stem(images)))
    torch.manual_seed(1000 + rank)
    model.drop.record_mask = True
    ddp.train()
    output = ddp(images[:8])
    nn.functional.cross_entropy(output, torch.zeros(8, dtype=torch.long)).backward()
    return {
        "fitted": fitted,
        "alone": _state(alone),
        "mask": model.drop.last_mask.clone(),
        "after_step": _state(model.drop),
    }


def _failing_fit(rank: int) -> tuple[str, str]:
    """Rank 1 has a single image (an error): both ranks must raise, none may wait forever."""
    torch.manual_seed(0)
    model = _Net("dead", "merge")
    images, _ = _rank_data(rank)
    try:
        fit_clusters(model, images if rank == 0 else images[:1], N_IMAGES)
    except (ValueError, RuntimeError) as error:
        return type(error).__name__, str(error)
    return "", ""


def _worker(rank: int, rendezvous: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {
            (rule[0], broadcast): _run_rank(rank, rule, broadcast)
            for rule in RULES
            for broadcast in (True, False)
        }
        results["failure"] = _failing_fit(rank)
        results["nd"] = {grid_dims: _run_nd_rank(rank, grid_dims) for grid_dims in (1, 3)}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """Launch the two ranks once; each one's results, by (rule, broadcast_buffers)."""
    directory = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launches = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(directory / "rendezvous"), str(directory)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for launch in launches:
            logs.append(launch.communicate(timeout=LAUNCH_TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for launch in launches:
            launch.kill()
        pytest.fail(f"the {WORLD} ranks did not finish within {LAUNCH_TIMEOUT} s")
    for rank, (launch, log) in enumerate(zip(launches, logs, strict=True)):
        assert launch.returncode == 0, f"rank {rank} failed:\n{log}"
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD)]


def _equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(first[name], second[name]) for name in first)


def test_every_rank_holds_rank_0s_clusters_for_every_rule_and_buffer_setting(rank_results):
    zero, one = rank_results
    print(f"\n{'rule':<12} {'broadcast_buffers':<18} {'local fits differ':<18} identical")
    keys = [key for key in zero if key not in ("failure", "nd")]
    for key in keys:
        identical = _equal(zero[key]["fitted"], one[key]["fitted"])
        differ = not _equal(zero[key]["alone"], one[key]["alone"])
        print(f"{key[0]:<12} {key[1]!s:<18} {differ!s:<18} {identical}")
    for key in keys:
        assert not _equal(zero[key]["alone"], one[key]["alone"]), key  # the data disagree
        assert _equal(zero[key]["fitted"], one[key]["fitted"]), key
        assert _equal(zero[key]["fitted"], zero[key]["alone"]), key  # rank 0's own fit
        assert zero[key]["flag"] and one[key]["flag"], key
        assert zero[key]["structured"] == one[key]["structured"], key


def test_a_ddp_training_step_after_the_fit_keeps_the_clusters_and_shapes(rank_results):
    zero, one = rank_results
    for key in (key for key in zero if key not in ("failure", "nd")):
        assert zero[key]["output_shape"] == one[key]["output_shape"] == (16, 10), key
        assert _equal(zero[key]["after_step"], zero[key]["fitted"]), key
        assert _equal(one[key]["after_step"], one[key]["fitted"]), key
        # DDP averaged the gradients: the ranks took the same step on different data.
        for first, second in zip(zero[key]["parameters"], one[key]["parameters"], strict=True):
            torch.testing.assert_close(first, second)


def test_a_rank_that_fails_makes_every_rank_raise_instead_of_waiting(rank_results):
    zero, one = rank_results
    assert one["failure"] == (
        "ValueError",
        "fit_clusters needs at least 2 images, but the data gave 1",
    )
    assert zero["failure"][0] == "RuntimeError" and "failed on another rank" in zero["failure"][1]


def test_cluster_draws_stay_independent_across_ranks_like_dropout(rank_results):
    zero, one = rank_results
    for key in (key for key in zero if key not in ("failure", "nd")):
        assert zero[key]["mask"].shape == one[key]["mask"].shape == (16, 6, 10, 10), key
        assert zero[key]["fitted"]["structured"].any(), key  # some clusters are drawn
        assert not torch.equal(zero[key]["mask"], one[key]["mask"]), key


def test_1d_and_3d_layers_hold_rank_0s_clusters_and_draw_their_own_masks(rank_results):
    zero, one = rank_results
    for grid_dims, shape in ((1, (4, 24)), (3, (4, 4, 6, 6))):
        first, second = zero["nd"][grid_dims], one["nd"][grid_dims]
        assert first["fitted"]["labels"].shape == shape, grid_dims
        assert not _equal(first["alone"], second["alone"]), grid_dims  # the data disagree
        assert _equal(first["fitted"], second["fitted"]), grid_dims
        assert _equal(first["fitted"], first["alone"]), grid_dims  # rank 0's own fit
        assert _equal(first["after_step"], first["fitted"]), grid_dims
        assert bool(first["fitted"]["is_fitted"]) and first["fitted"]["structured"].any()
        assert not torch.equal(first["mask"], second["mask"]), grid_dims


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])

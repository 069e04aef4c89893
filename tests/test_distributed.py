"""Private training on several processes (``distributed``), on this CPU machine with gloo.

(a) The private step of a 2-process run equals the single-process step on the same Poisson sample
and the same noise draw. (b) A private run through Ultralytics' own DDP launcher and worker code
(``cpu_ddp/sitecustomize.py`` patches only what selects CUDA devices) ends with identical weights
on both ranks, samples disjoint shards at the global rate, and writes the accounting of a
single-process run with the same (sigma, q, steps)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ultralytics_dp.integration.checkpoint import read_dp_entry
from ultralytics_dp.integration.private_step import private_gradient
from ultralytics_dp.losses.batch import select
from ultralytics_dp.mechanism.sampling import PoissonLoader

from helpers import det_batch, ledger_steps, released_epsilon, trainer_model

HARNESS = Path(__file__).parent / "cpu_ddp"
NOISE_SEED, SIGMA, C, EXPECTED_BATCH = 7, 0.8, 0.05, 4.0


def _private_step(method: str, batch: dict, across_ranks: bool) -> dict:
    model = trainer_model("yolo26n.yaml").double()
    generator = torch.Generator().manual_seed(NOISE_SEED)  # only rank 0 draws from it
    return private_gradient(model, batch, method=method, max_grad_norm=C, noise_multiplier=SIGMA,
                            expected_batch_size=EXPECTED_BATCH, physical_batch=2, across_ranks=across_ranks,
                            generator=generator)


def _batch() -> dict:
    batch = det_batch([2, 0, 3, 1, 1, 2])
    return {**batch, "img": batch["img"].double()}


def _rank(rank: int, world: int, store: str, method: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        share = select(_batch(), list(range(rank, 6, world)))  # this rank's images of the Poisson batch
        torch.save(_private_step(method, share, across_ranks=True), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_the_step_of_two_processes_equals_the_single_process_step(tmp_path, method):
    """Each rank clips its own images; the sums are added and noised once (drawn on rank 0): the
    result equals one process's step over all images with the same draw, identical on both ranks."""
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), method, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _private_step(method, _batch(), across_ranks=False)
    for k in single:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the ranks step on the identical gradient
        assert torch.allclose(ranks[0][k], single[k], rtol=1e-6, atol=1e-9), k
    noise_only = _private_step(method, select(_batch(), []), across_ranks=False)
    assert any(not torch.allclose(single[k], noise_only[k]) for k in single)  # the images do count


def _compare(rank: int, world: int, store: str, out: str) -> None:
    from ultralytics_dp.mechanism.distributed import digest, gather

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        same = gather(digest({"w": torch.ones(3)}, "args"))
        differs = gather(digest({"w": torch.ones(3) * (1 + rank * 1e-7)}, "args"))  # a tiny difference on rank 1
        (Path(out) / f"rank{rank}.json").write_text(json.dumps([len(set(same)) == 1, len(set(differs)) == 1]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_learns_whether_the_replicas_agree(tmp_path):
    """The check that refuses diverging replicas: both ranks get the same answer, so all refuse together."""
    mp.spawn(_compare, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [[True, False], [True, False]]


def test_sharded_poisson_loaders_sample_each_record_from_one_rank_at_rate_q():
    """Two ranks' loaders: disjoint shards covering the set, each record included at rate q."""
    n, q, steps = 40, 0.3, 400
    dataset = [{"i": torch.tensor(i)} for i in range(n)]
    counts = torch.zeros(n)
    loaders = [PoissonLoader(dataset, q, steps, lambda: steps, lambda s: s, shard=range(r, n, 2)) for r in range(2)]
    for r, loader in enumerate(loaders):
        for batch in loader:
            assert all(int(i) % 2 == r for i in batch["i"])  # only its own shard
            counts[batch["i"]] += 1
    bound = 5 * math.sqrt(steps * q * (1 - q))  # every record, binomial(steps, q)
    assert (counts - steps * q).abs().max() < bound


def _harness(data: Path, out: Path, ledger: Path, mode: str) -> subprocess.CompletedProcess:
    """``cpu_ddp/train.py`` in ``mode``: through Ultralytics' launcher, or, for ``torchrun``, in two
    processes started by torch.distributed.run."""
    from ultralytics.utils.dist import find_free_network_port

    env = {**os.environ, "PYTHONPATH": str(HARNESS), "ULTRALYTICS_DP_TEST_CPU_DDP": "1"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(find_free_network_port())] if mode == "torchrun" else [sys.executable])
    return subprocess.run([*launch, str(HARNESS / "train.py"), str(data), str(out), str(ledger), mode],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["attach", "keys", "torchrun"])
def test_a_private_run_through_ultralytics_ddp_launcher(tiny_det, tmp_path, mode):
    """attach / keys: Ultralytics launches its workers; torchrun: every process runs the script (as a
    multi-node launch does) and Ultralytics' trainer joins the process group."""
    ledger = tmp_path / "ledger.sqlite"
    run = _harness(tiny_det, tmp_path, ledger, mode)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    entry = read_dp_entry(tmp_path / "run" / "weights" / "last.pt")

    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # every rank stepped on the same gradient
    assert [r["val_batch"] for r in ranks] == [4, 4]  # 2 x physical_batch / 2 ranks on every rank
    for r in ranks:  # nothing mixes images on any rank
        assert r["mosaic"] == 0
        mixing = [p for name, p in r["transforms"] if name in ("Mosaic", "MixUp", "CutMix", "CopyPaste")]
        assert mixing and all(p == 0 for p in mixing)

    n, q, steps = 32, 8 / 32, entry["steps"]
    assert steps == 8 and [len(r["files"]) for r in ranks] == [steps, steps]  # both stop at the same step
    files = ranks[0]["all_files"]
    for rank, r in enumerate(ranks):
        assert all(files.index(f) % 2 == rank for batch in r["files"] for f in batch)  # its own shard only
    total = sum(len(batch) for r in ranks for batch in r["files"])
    assert abs(total - steps * n * q) < 4 * math.sqrt(steps * n * q * (1 - q))  # a Binomial(steps * N, q) draw

    assert (entry["num_samples"], entry["sample_rate"]) == (n, q)
    single = released_epsilon(noise_multiplier=entry["noise_multiplier"], sample_rate=q, steps=steps, delta=1e-3)
    assert entry["epsilon"] == pytest.approx(single, rel=1e-9) and entry["epsilon"] <= 4.0
    assert ledger_steps(ledger) >= steps
    if mode == "attach":  # the launching process's object reports the run its workers trained
        assert json.loads((tmp_path / "launcher.json").read_text()) == {"epsilon": entry["epsilon"], "steps": steps}
    elif mode == "keys":
        args = (tmp_path / "run" / "args.yaml").read_text()
        assert "epsilon: 4.0" in args and str(ledger) not in args


def test_before_the_process_group_exists_the_launchers_rank_says_which_process_is_main(monkeypatch):
    """A refusal in a worker's constructor (before the process group) must not clean up rank 0's run dir."""
    from ultralytics_dp.mechanism.distributed import is_main

    monkeypatch.setenv("RANK", "1")
    assert not is_main()
    monkeypatch.setenv("RANK", "0")
    assert is_main()
    monkeypatch.delenv("RANK")
    assert is_main()


@pytest.mark.slow
def test_a_multi_device_run_that_crashed_resumes_with_its_accountant(tiny_det, tmp_path):
    """The run dies in its second epoch on both ranks; `resume` (the stock command's way, through
    Ultralytics' launcher again) continues from the checkpoint's step count and sigma to the plan."""
    ledger = tmp_path / "ledger.sqlite"
    crashed = _harness(tiny_det, tmp_path, ledger, "crash")
    assert crashed.returncode != 0 and "crash for the resume test" in crashed.stdout + crashed.stderr
    before = read_dp_entry(tmp_path / "run" / "weights" / "last.pt")
    assert before["steps"] == 4 and ledger_steps(ledger) >= 4

    resumed = _harness(tiny_det, tmp_path, ledger, "resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = read_dp_entry(tmp_path / "run" / "weights" / "last.pt")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r["files"]) for r in ranks] == [4, 4] and ranks[0]["weights"] == ranks[1]["weights"]
    assert after["steps"] == 8 and after["noise_multiplier"] == before["noise_multiplier"]
    assert after["run_id"] == before["run_id"] and ledger_steps(ledger) >= 8
    single = released_epsilon(noise_multiplier=after["noise_multiplier"], sample_rate=0.25, steps=8, delta=1e-3)
    assert after["epsilon"] == pytest.approx(single, rel=1e-9) and after["epsilon"] <= 4.0

"""Distributed training: 2 CPU processes (torchrun, gloo) against one process with the same
global batch.

The test launches ``torchrun --standalone --nproc_per_node=2 tests/test_distributed.py JOBS``;
run as a script, this file is the worker: it trains each job through ``dllab.cli.main`` (so the
real CLI -> train() -> Trainer.fit path runs under torchrun) and then gathers every rank's
in-memory weights on rank 0, which writes them, with each rank's exit code, to a file in a
folder that belongs to the test (never into the run folder).

What is checked:

- the classifier without BatchNorm (``--no-norm``), with augmentation: 2 ranks x batch 16 give
  the weights and logged losses of 1 process x batch 32, up to float summation order. That needs
  the loader to deal out one permutation *and* one set of crop draws to the ranks, DDP to average
  gradients, and the logged metrics to be averaged over ranks;
- the VAE: close to the single-process run, not equal, because each rank draws its own
  reparameterisation noise (rank 0 the single-process stream, rank 1 another);
- the DCGAN (its discriminator runs three times per step): trains, both ranks hold identical
  weights after every step DDP synchronised, and the folder name chosen by rank 0 (no ``--out``)
  is the only one written; stopped after one epoch and resumed, it ends where an uninterrupted
  2-rank run ends (each rank's random stream is saved and restored);
- a NaN loss on one rank only: both ranks skip that step together and stay identical;
- every run folder holds exactly the files of a single-process run (rank 1 writes nothing).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()

# fp32 pinned: the comparisons below assume float32 rounding, and --precision auto would pick
# bf16 for the classifier on CPUs with AVX512-BF16/AMX (its own job below runs bf16 on purpose)
COMMON = ["--dataset", "mnist5k", "--limit", "128", "--epochs", "2", "--seed", "5", "--device",
          "cpu", "--quiet", "--log-every", "1", "--precision", "fp32"]
CLASSIFIER = ["--width", "4", "--no-norm", "--lr", "0.02", "--schedule", "constant",
              "--warmup-epochs", "0", "--eval-batch-size", "128"]
VAE = ["--latent-dim", "4", "--tsne-points", "50"]
DCGAN = ["--g-width", "8", "--d-width", "8", "--nz", "16", "--epochs", "1", "--r1", "1", "--r1-every", "2"]  # R1: double backward under DDP
BF16 = ["--precision", "bf16"]


def _train_argv(kind, extra, batch, out=None):
    argv = ["train", kind, *COMMON, *extra, "--batch-size", str(batch)]
    return argv + (["--out", str(out)] if out is not None else [])


# ---- the worker (run by torchrun) --------------------------------------------------------------
def _skip_figures():
    """Figures and final analyses (t-SNE, k-NN, confusion matrix) of the classifier and the VAE
    cost seconds and test nothing here (the DCGAN keeps its own, rank 0 drawing them)."""
    from dllab.train import kind_module

    for kind in ("classifier", "vae"):
        kind_module(kind).TRAINER.finish = lambda self, metrics: {}
        kind_module(kind).TRAINER.epoch_end = lambda self, epoch, metrics: None


def _global_step_noise():
    """Make the VAE's training noise comparable across process counts (test only).

    Each training step draws the noise of the *global* batch from a generator seeded by the step
    and deals its rows out like the data loader deals out examples (rank r gets rows r, r+N, ...),
    so 2 ranks x B/2 see exactly the noise of 1 process x B. Returns a function that undoes it.
    """
    import torch.distributed as dist

    from dllab.models import vae as vae_model
    from dllab.train import vae as vae_train

    randn, train_step = vae_model.randn, vae_train.VAETrainer.train_step
    current = {"step": None}

    def global_randn(shape, generator, device, dtype):
        if current["step"] is None or generator is not None:
            return randn(shape, generator, device, dtype)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        g = torch.Generator().manual_seed(10_000 + current["step"])
        full = torch.randn((shape[0] * world, *shape[1:]), generator=g, dtype=dtype)
        return full[rank::world].to(device)

    def step_with_global_noise(self, x, y):
        current["step"] = self.step
        try:
            return train_step(self, x, y)
        finally:
            current["step"] = None

    vae_model.randn, vae_train.VAETrainer.train_step = global_randn, step_with_global_noise

    def undo():
        vae_model.randn, vae_train.VAETrainer.train_step = randn, train_step

    return undo


def _worker(jobs_file: str) -> None:
    import torch.distributed as dist

    from dllab import engine
    from dllab.cli import main

    _skip_figures()
    _global_step_noise()
    trainers = []
    fit = engine.Trainer.fit

    def recording_fit(self, resume=False):
        trainers.append(self)
        return fit(self, resume)

    engine.Trainer.fit = recording_fit
    spec = json.loads(Path(jobs_file).read_text())
    report = []
    from dllab.train.classifier import ClassifierTrainer
    from dllab.train.dcgan import DCGANTrainer

    figures = DCGANTrainer.epoch_end, DCGANTrainer.finish
    classifier_step = ClassifierTrainer.train_step
    # D's weight gradients computed in G's update (wasted: D's next update zeroes them)
    in_g = {"on": False, "d_grads": 0}
    d_loss_of, g_loss_of = DCGANTrainer.d_loss, DCGANTrainer.g_loss

    def count(grad):
        in_g["d_grads"] += in_g["on"]

    def d_loss(self, batch):
        in_g["on"] = False
        if not getattr(self, "_counted", False):
            self._counted = [p.register_hook(count) for p in self.disc.parameters()]
        return d_loss_of(self, batch)

    def g_loss(self, batch):
        in_g["on"] = True  # until the next d_loss: G's backward runs after g_loss returns
        return g_loss_of(self, batch)

    DCGANTrainer.d_loss, DCGANTrainer.g_loss = d_loss, g_loss

    def nan_on_rank1_at_step1(self, x, y):
        if self.rank == 1 and self.step == 1:
            x = torch.full_like(x, float("nan"))
        return classifier_step(self, x, y)

    for i, argv in enumerate(spec["jobs"]):
        if i >= 3:  # the resume jobs: no GAN figures either
            DCGANTrainer.epoch_end = lambda self, epoch, metrics: None
            DCGANTrainer.finish = lambda self, metrics: {}
        if i == 6:
            ClassifierTrainer.train_step = nan_on_rank1_at_step1
        in_g.update(on=False, d_grads=0)
        code = main(argv)
        DCGANTrainer.epoch_end, DCGANTrainer.finish = figures
        ClassifierTrainer.train_step = classifier_step
        trainer = trainers[-1]
        # every rank's weights, gathered on rank 0; BatchNorm running statistics are each rank's own
        params = torch.cat([v.detach().double().flatten() for m in trainer.modules().values()
                            for k, v in engine.unwrap(m).state_dict().items()
                            if v.is_floating_point() and "running_" not in k])
        gathered = [torch.empty_like(params) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, params)
        after = torch.randn(4)  # each rank's own random stream, after training
        streams = [torch.empty_like(after) for _ in range(dist.get_world_size())]
        dist.all_gather(streams, after)
        codes = [None] * dist.get_world_size()
        dist.all_gather_object(codes, [code, str(trainer.run.path)])
        if dist.get_rank() == 0:
            torch.save(params, Path(spec["report"]).with_name(f"weights_{i}.pt"))
            report.append({"codes": [c for c, _ in codes], "outs": [o for _, o in codes],
                           "d_grads_in_g_update": in_g["d_grads"],
                           "max_rank_difference": max(float((g - params).abs().max()) for g in gathered),
                           "same_stream": all(torch.equal(s, after) for s in streams)})
    if dist.get_rank() == 0:
        Path(spec["report"]).write_text(json.dumps(report))
    # Leave together, with no DDP model alive: the trainers above hold DDP reducers, which hold the
    # gloo process group; freed during interpreter shutdown instead, their gloo threads can abort
    # the process ("terminate called without an active exception", exit -6, seen once in three runs)
    trainers.clear()
    trainer = None  # noqa: F841 - the last one, too
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


# ---- the test ----------------------------------------------------------------------------------
def _files(run_dir: Path) -> list[str]:
    names = []
    for p in sorted(run_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(run_dir)
            names.append("tb/events" if rel.parts[0] == "tb" else str(rel))
    return names


def _weights_of(run_dir: Path) -> torch.Tensor:
    """The saved weights, flattened in the worker's order (no BatchNorm running statistics)."""
    from dllab.checkpoint import load_checkpoint

    models = load_checkpoint(run_dir / "checkpoints" / "last.pt")["models"]
    return torch.cat([v.double().flatten() for sd in models.values() for k, v in sd.items()
                      if v.is_floating_point() and "running_" not in k])


def _train_log(run_dir: Path, key: str) -> list[float]:
    from dllab.runs import read_metrics

    return [r[key] for r in read_metrics(run_dir) if r["split"] == "train"]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """One torchrun launch (2 processes x batch 16) training the three kinds."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = [_train_argv("classifier", CLASSIFIER, 16, root / "classifier"),
            _train_argv("vae", VAE, 16, root / "vae"),
            _train_argv("dcgan", DCGAN, 16),  # no --out: rank 0 names the folder for both
            # resume: 1 epoch, then on to 2, against 2 straight (each rank's noise stream must resume)
            _train_argv("dcgan", [*DCGAN, "--epochs", "2"], 16, root / "gan_straight"),
            _train_argv("dcgan", DCGAN, 16, root / "gan_split"),
            [*_train_argv("dcgan", [*DCGAN, "--epochs", "2"], 16, root / "gan_split"), "--resume"],
            # a NaN batch on rank 1 only (step 2): both ranks must skip that step together
            _train_argv("classifier", [*CLASSIFIER, "--epochs", "1"], 16, root / "nan"),
            # bf16 autocast (explicit, so it runs on every CPU kind: emulated where not native)
            _train_argv("classifier", [*CLASSIFIER, *BF16], 16, root / "classifier-bf16")]
    spec = root / "jobs.json"
    spec.write_text(json.dumps({"jobs": jobs, "report": str(root / "report.json")}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", DLLAB_QUIET="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(HERE), str(spec)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"torchrun exited with {proc.returncode}\n--- stdout (tail) ---\n"
                                  f"{proc.stdout[-2000:]}\n--- stderr (tail) ---\n{proc.stderr[-4000:]}")
    report = json.loads((root / "report.json").read_text())
    weights = [torch.load(root / f"weights_{i}.pt", weights_only=True) for i in range(len(jobs))]
    return root, report, weights


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same jobs in this process, with the global batch (32) on one process."""
    from dllab.cli import main
    from dllab.train import kind_module

    root = tmp_path_factory.mktemp("single")
    saved = {k: (kind_module(k).TRAINER.finish, kind_module(k).TRAINER.epoch_end)
             for k in ("classifier", "vae")}
    _skip_figures()
    undo = _global_step_noise()
    try:
        for name, kind, extra in (("classifier", "classifier", CLASSIFIER), ("vae", "vae", VAE),
                                  ("dcgan", "dcgan", DCGAN),
                                  ("classifier-bf16", "classifier", [*CLASSIFIER, *BF16])):
            assert main(_train_argv(kind, extra, 32, root / name)) == 0
    finally:
        undo()
        for k, (finish, epoch_end) in saved.items():
            kind_module(k).TRAINER.finish, kind_module(k).TRAINER.epoch_end = finish, epoch_end
    return root


def test_all_ranks_agree(ddp):
    """Both ranks finish, share rank 0's folder and hold identical weights (DDP keeps them in
    sync); each rank has its own random stream (different GAN noise per rank)."""
    _, report, weights = ddp
    for job, w in zip(report, weights):
        assert job["codes"] == [0, 0]
        assert job["outs"][0] == job["outs"][1]
        assert job["max_rank_difference"] == 0.0
        assert torch.isfinite(w).all()
        assert not job["same_stream"]


@pytest.mark.parametrize("run, job, keys, weights_tol, log_tol", [
    ("classifier", 0, ("loss", "acc"), 1e-5, 1e-4),
    ("vae", 1, ("loss", "recon", "kl"), 1e-5, 1e-4),
    # bf16 GEMM inputs: each rank's half-batch rounds like the whole batch's rows, but the gradient
    # sums over a different split (measured 8.5e-5 relative on the weights after 8 steps)
    ("classifier-bf16", 7, ("loss", "acc"), 1e-3, 1e-2)])
def test_two_ranks_match_one_process_with_the_global_batch(ddp, single, run, job, keys, weights_tol,
                                                           log_tol):
    """2 ranks x 16 == 1 process x 32 up to float rounding: final weights and every logged step.

    The classifier has no BatchNorm (per-rank batch statistics would differ from the global
    batch's); the VAE's noise is dealt out like the data (see ``_global_step_noise``).
    """
    root, _, weights = ddp
    ddp_w, one_w = weights[job], _weights_of(single / run)
    assert torch.equal(_weights_of(root / run), ddp_w)  # what rank 0 saved is what it held
    assert (ddp_w - one_w).norm() <= weights_tol * one_w.norm(), float((ddp_w - one_w).norm() / one_w.norm())
    for key in keys:  # logged per-step means over both ranks = the global batch's means
        a, b = _train_log(root / run, key), _train_log(single / run, key)
        assert len(a) == len(b) == 8  # 2 epochs x 128 / 32
        assert a == pytest.approx(b, rel=log_tol, abs=1e-6)
    assert len(set(_train_log(single / run, "loss"))) > 1  # it trained
    summary = json.loads((root / run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["precision"] == ("bfloat16" if run.endswith("bf16") else "fp32")


def test_g_update_computes_no_d_gradients_under_ddp(ddp):
    """Under DDP too, G's update runs D by its plain module and differentiates G's parameters only:
    no D weight gradient is computed there (nor averaged over the ranks), as in one process."""
    _, report, _ = ddp
    gan_jobs = report[2:6]
    assert all(job["codes"] == [0, 0] for job in gan_jobs)
    assert [job["d_grads_in_g_update"] for job in gan_jobs] == [0, 0, 0, 0]
    assert report[0]["d_grads_in_g_update"] == 0  # (no DCGAN: nothing counted)


def test_a_resumed_distributed_run_continues_exactly(ddp):
    """Stopped after epoch 1 and resumed, 2 ranks end on the weights of an uninterrupted run: the
    checkpoint holds every rank's random state, not only rank 0's."""
    root, report, weights = ddp
    assert report[3]["codes"] == report[5]["codes"] == [0, 0]
    assert torch.equal(weights[3], weights[5])
    assert torch.equal(_weights_of(root / "gan_straight"), _weights_of(root / "gan_split"))
    assert not torch.equal(weights[4], weights[5])  # the second epoch did train


def test_a_nan_on_one_rank_is_skipped_by_all(ddp):
    """Rank 1 alone sees a NaN loss: both ranks skip the step (no deadlock), stay identical, and
    rank 0's summary counts the skip."""
    root, report, weights = ddp
    assert report[6]["codes"] == [0, 0] and report[6]["max_rank_difference"] == 0.0
    assert torch.isfinite(weights[6]).all()
    summary = json.loads((root / "nan" / "summary.json").read_text())
    assert summary["nonfinite_steps_skipped"] == 1 and summary["steps"] == 4
    logged = [r for r in _train_records(root / "nan")]
    assert [r["step"] for r in logged if "loss" not in r] == [2]


def _train_records(run_dir: Path) -> list[dict]:
    from dllab.runs import read_metrics

    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


def test_only_rank_zero_writes(ddp, single):
    """One folder (named by rank 0) holding exactly the files of a single-process run."""
    root, report, _ = ddp
    runs = list((root / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("dcgan-mnist5k-")
    assert report[2]["outs"][0] == str(runs[0].relative_to(root))
    for kind, ddp_dir in (("classifier", root / "classifier"), ("vae", root / "vae"),
                          ("dcgan", runs[0])):
        assert _files(ddp_dir) == _files(single / kind), kind
        steps = _train_log(ddp_dir, "step")
        assert steps == sorted(set(steps))  # logged once, not once per rank


def test_sync_bn_is_refused_where_it_cannot_work(monkeypatch):
    """Under torchrun, --sync-bn on CPUs (torch's SyncBatchNorm is GPU-only) or with the scratch
    BatchNorm2d (never converted) is refused before any run folder is written."""
    import dataclasses

    from dllab.data import load
    from dllab.engine import validate_config
    from dllab.train.classifier import ClassifierTrainConfig, validate

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = ClassifierTrainConfig(precision="fp32", sync_bn=True, layers="torch")
    data = load("mnist5k", limit=64)
    with pytest.raises(ValueError, match="--sync-bn needs GPUs"):
        validate_config(config, torch.device("cpu"))
    with pytest.raises(ValueError, match="scratch"):  # the classifier's own check, on any device
        validate(dataclasses.replace(config, layers="scratch"), data)
    validate_config(dataclasses.replace(config, sync_bn=False), torch.device("cpu"))
    validate(config, data)
    monkeypatch.setenv("WORLD_SIZE", "1")
    validate_config(config, torch.device("cpu"))  # one process: nothing to synchronise
    validate(dataclasses.replace(config, layers="scratch"), data)



def test_stop_and_skip_agreements_never_wait_for_a_gpu(monkeypatch, tmp_path):
    """The per-step "stop now?" agreement (and the host-side skip check) all-reduce a CPU flag over
    ``control_group()``: the default group under gloo, a gloo group beside nccl. With nccl the flag
    used to be a CUDA tensor, and reading it made every step wait for the GPU."""
    import torch.distributed as dist

    from dllab import engine

    # which group: a real one-process gloo group, and a default backend that is not gloo
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert engine.control_group() is None
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        made = []
        monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or "gloo-group")
        assert engine.control_group() == "gloo-group" and made == [{"backend": "gloo"}]
    finally:
        dist.destroy_process_group()

    # what is reduced: a CPU flag on that group, whatever the training device
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append((t.device.type, group)))
    trainer = engine.Trainer.__new__(engine.Trainer)
    trainer.distributed, trainer.device, trainer._control = True, torch.device("meta"), "gloo-group"
    trainer._stop_signal = None
    trainer._check_stop()
    assert trainer._any_rank(False) is False
    assert seen == [("cpu", "gloo-group")] * 2


if __name__ == "__main__":
    _worker(sys.argv[1])

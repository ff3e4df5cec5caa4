"""scripts/slurm/rsb.sbatch on a real two-node Slurm cluster started by the test (tests/slurm_cluster.py): the
2-node run equals a 1-node torchrun run; a job whose rank froze or whose node died ends, is requeued and resumes
into the uninterrupted run's weights (issue 26); and a 2 x 2-process job signalled before its time limit saves,
is requeued and resumes into the same weights and W&B run (issue 18). gloo on the CPU, the demo betons, a few
steps."""
import os
import subprocess
import sys
import time

import pytest
import slurm_cluster
from conftest import (
    ROOT,
    ddp4_args,
    ddp_args,
    digests,
    final_weights,
    metrics,
    same_weights,
    step_losses,
    step_lrs,
    wandb_run_ids,
)

from rsb_ffcv import stops

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "scripts" / "slurm" / "rsb.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """slurmctld + slurmd n1 + slurmd n2. slurm-wlm comes from the project's install step (make test-deps); if it
    cannot be installed, or the tests cannot run the daemons (root), the tests fail in CI and are skipped
    elsewhere, with the reason."""
    why = None
    if slurm_cluster.missing():
        p = subprocess.run(["make", "-C", str(ROOT), "test-deps"], capture_output=True, text=True)
        if slurm_cluster.missing():
            why = (f"Slurm ({', '.join(slurm_cluster.missing())}) is missing and `make test-deps` could not install "
                   f"slurm-wlm: {(p.stderr or p.stdout).strip()[-300:]}")
    if why is None and os.geteuid() != 0:
        why = "the Slurm daemons of the test cluster run as root"
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(cluster, demo, run_dir, *extra, nodes=2, procs=1, args=ddp_args, env_extra=None):
    """sbatch rsb.sbatch on `nodes` nodes (`procs` CPU processes each) from the repository, as a user would; one
    compute thread per process, as the 1-node references have (float sums depend on the thread count)."""
    out = run_dir.parent / f"{run_dir.name}-%j.out"
    job = cluster.sbatch(f"--nodes={nodes}", f"--output={out}", str(SCRIPT), str(ROOT / "rsb_configs" / "demo.yaml"),
                         *args(demo, run_dir, "--training.cpu_threads=1", *extra)[2:], cwd=ROOT,
                         env_extra={"RSB_RUN_DIR": str(run_dir), "RSB_PYTHON": sys.executable,
                                    "RSB_PROCS_PER_NODE": str(procs), **(env_extra or {})})
    return job, run_dir.parent / f"{run_dir.name}-{job}.out"



def test_two_nodes_train_like_one_node_with_two_processes(cluster, ddp_reference, demo_betons, tmp_path):
    """2 nodes x 1 process: the job completes; only global rank 0 writes (one metrics record per step, one W&B
    run); each process decodes with its node's cores (node-local world 1: all cores, where the 1-node run gives
    each of its 2 processes half); the learning rates, data orders and final weights equal a 1-node 2-process
    torchrun run."""
    run_dir = tmp_path / "two_nodes"
    job, out = submit(cluster, demo_betons, run_dir, "--logging.wandb_mode=offline", "--data.num_workers=0")
    info = cluster.wait(job)
    log = out.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "2 node(s) x 1 process(es)" in log
    cores = len(os.sched_getaffinity(0))
    for rank in (0, 1):
        assert f"rank {rank}/2 (node-local 0/1) on " in log, log[-3000:]
    assert log.count(f"cpu, 1 compute threads, {cores} decode threads") == 2 and cores >= 2
    steps = [m["step"] for m in metrics(run_dir) if "train/lr" in m]
    assert steps == list(range(1, 13))  # 4 epochs x 3 steps, each logged once
    assert len(wandb_run_ids(run_dir)) == 1 and log.count("epoch 3 done") == 1
    assert step_lrs(run_dir) == step_lrs(ddp_reference) and digests(run_dir) == digests(ddp_reference)
    assert same_weights(final_weights(run_dir), final_weights(ddp_reference))


def test_a_signalled_job_saves_is_requeued_and_resumes_exactly(cluster, ddp4_reference, demo_betons, tmp_path):
    """2 nodes x 2 processes. SIGTERM to the batch script mid-run (what --signal=B:TERM@120 sends before the time
    limit, or scancel --batch --signal=TERM): the processes stop together and save, the script requeues the job,
    the second start resumes from last.pt in the same W&B run, and the run ends bit-identical to the uninterrupted
    1-node 4-process run (at 4 ranks the all-reduce's sums depend on DDP's buckets, which a resume settles)."""
    run_dir = tmp_path / "requeued"
    job, out = submit(cluster, demo_betons, run_dir, "--logging.wandb_mode=offline", procs=2, args=ddp4_args)
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or not metrics(run_dir):  # the first step is done
        assert time.monotonic() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            out.read_text()[-3000:] if out.exists() else cluster.job(job)
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=TERM", str(job))
    cluster.start_requeued_now(job)
    info = cluster.wait(job)
    log = out.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert "stopped by signal at step" in log and "requeueing job" in log and "(start 2)" in log
    assert "resumed from" in log.split("(start 2)")[1]
    assert [m["step"] for m in metrics(run_dir) if "train/lr" in m] == list(range(1, 13))
    assert "2 node(s) x 2 process(es)" in log
    assert step_losses(run_dir) == step_losses(ddp4_reference)
    ids = wandb_run_ids(run_dir)
    assert len(ids) == 2 and len(set(ids)) == 1  # two starts, one W&B run
    assert step_lrs(run_dir) == step_lrs(ddp4_reference) and digests(run_dir) == digests(ddp4_reference)
    assert same_weights(final_weights(run_dir), final_weights(ddp4_reference))


def test_a_frozen_rank_ends_the_job_which_is_requeued_and_completes(cluster, ddp_reference, demo_betons, tmp_path):
    """Rank 1 (node n2) freezes after step 5 with no signal to anyone: rank 0 fails after
    training.dist_timeout_min, srun ends the step (--kill-on-bad-exit, so the frozen rank does not hold the job
    until its time limit), the script requeues the job because the step failed after writing a checkpoint, and
    the second start resumes and ends as the uninterrupted run."""
    run_dir = tmp_path / "frozen"
    job, out = submit(cluster, demo_betons, run_dir, "--training.checkpoint_every_min=1e-9",
                      "--training.dist_timeout_min=0.2", env_extra={stops.SIGNAL_HOOK: "1:5:STOP"})
    cluster.start_requeued_now(job)
    info = cluster.wait(job)
    log = out.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    first, second = log.split("(start 2)")
    assert "error: a collective got no answer within training.dist_timeout_min=0.2: rank(s) 1" in first, first[-3000:]
    assert "after writing a checkpoint" in first and "resumed from" in second
    assert [m["step"] for m in metrics(run_dir) if "train/lr" in m] == list(range(1, 13))
    assert step_lrs(run_dir) == step_lrs(ddp_reference) and digests(run_dir) == digests(ddp_reference)
    assert same_weights(final_weights(run_dir), final_weights(ddp_reference))


def test_a_node_that_dies_costs_the_steps_since_the_last_checkpoint(cluster, ddp_reference, demo_betons, tmp_path):
    """Node n2 loses power mid-run: its slurmd, the job step's slurmstepd, torchrun and rank 1 are SIGKILLed at
    once, found by pid. Rank 0 on n1 fails instead of waiting (its connection broke, or after
    training.dist_timeout_min), the job is requeued, and once n2's slurmd is back (a rebooted node) the job
    resumes from the last timed checkpoint: one W&B run, every step logged once, the uninterrupted run's
    weights."""
    run_dir = tmp_path / "dead_node"
    job, out = submit(cluster, demo_betons, run_dir, "--training.checkpoint_every_min=1e-9",
                      "--training.dist_timeout_min=0.2", "--logging.wandb_mode=offline")
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or max([m["step"] for m in metrics(run_dir)], default=0) < 5:
        assert time.monotonic() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            out.read_text()[-3000:] if out.exists() else cluster.job(job)
        time.sleep(0.1)
    killed_at, done = time.time(), max(m["step"] for m in metrics(run_dir))
    cluster.kill_node("n2", job)
    while "n2" not in cluster.down_nodes():  # Slurm notices (SlurmdTimeout=10 in the test cluster)
        assert time.time() - killed_at < 120, cluster.run("sinfo", "-N").stdout + cluster.logs()
        time.sleep(0.5)
    cluster.restart_node("n2")
    cluster.start_requeued_now(job)
    info = cluster.wait(job)
    log = out.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:] + cluster.logs()
    assert "resumed from" in log.split("(start 2)")[1]
    rows = metrics(run_dir)
    assert [m["step"] for m in rows if "train/lr" in m] == list(range(1, 13))
    assert len(set(wandb_run_ids(run_dir))) == 1
    assert same_weights(final_weights(run_dir), final_weights(ddp_reference))
    resumed = log.split("(start 2)")[1].split("resumed from")[1].split("step ")[1].split()[0]
    first_step = next(m["time"] for m in rows if m["step"] == int(resumed) + 1)
    print(f"dead node: killed after step {done} (or during the next), resumed from step {resumed}, "
          f"{first_step - killed_at:.0f} s from the kill to the resumed first step")


def test_the_script_refuses_a_missing_config_in_one_line(cluster, tmp_path):
    job = cluster.sbatch("--nodes=1", f"--output={tmp_path}/bad-%j.out", str(SCRIPT), "no/such.yaml", cwd=ROOT)
    info = cluster.wait(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert (tmp_path / f"bad-{job}.out").read_text() == \
        f"error: config file 'no/such.yaml' not found (relative to {ROOT}, where the job was submitted)\n"

"""scripts/slurm/rsb.sbatch on a real two-node Slurm cluster started by the test (tests/slurm_cluster.py): a 2 x
2-process job signalled before its time limit saves, is requeued and resumes into the weights of a 1-node
4-process run (issue 18), and a 2-node job whose rank froze and then whose node died ends each time, is requeued,
resumes and ends with the weights of a 1-node 2-process run (issue 26). gloo on the CPU, the demo betons, a few
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


def test_a_frozen_rank_then_a_dead_node_cost_only_the_steps_since_the_last_checkpoint(cluster, ddp_reference,
                                                                                      demo_betons, tmp_path):
    """2 nodes x 1 process, no warning of either fault. Start 1: rank 1 freezes (SIGSTOP) after step 4: rank 0 fails
    after training.dist_timeout_min with one line naming rank 1, srun ends the step (--kill-on-bad-exit: the frozen
    process does not hold the job until its time limit) and the script requeues the job, whose step failed after
    writing a checkpoint. Start 2: node n2 loses power after step 8 (its slurmd, the step's slurmstepd, torchrun and
    rank SIGKILLed by pid): the rank on n1 fails instead of waiting, Slurm sets n2 down and requeues the job, and
    n2's slurmd comes back as a rebooted node. Start 3 completes. Throughout: only rank 0 writes (every step logged
    once, one W&B run), each process decodes with its node's cores (node-local world 1), and the run ends with the
    learning rates, orders and bit-identical weights of the uninterrupted 1-node 2-process run."""
    run_dir = tmp_path / "faults"
    job, out = submit(cluster, demo_betons, run_dir, "--training.checkpoint_every_min=1e-9",
                      "--training.dist_timeout_min=0.2", "--logging.wandb_mode=offline", "--data.num_workers=0",
                      env_extra={stops.SIGNAL_HOOK: "1:4:STOP"})
    cluster.start_requeued_now(job)
    deadline = time.monotonic() + 300
    while cluster.job(job)["Restarts"] != "1" or max([m["step"] for m in metrics(run_dir)], default=0) < 8:
        assert time.monotonic() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            out.read_text()[-3000:]
        time.sleep(0.1)
    killed_at, done = time.time(), max(m["step"] for m in metrics(run_dir))
    cluster.kill_node("n2", job)
    cluster.wait_down("n2")  # Slurm notices (SlurmdTimeout=10 in the test cluster)
    cluster.restart_node("n2")
    cluster.start_requeued_now(job)
    info = cluster.wait(job)
    log = out.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), log[-4000:]
    first, second, third = log.split("(start 2)")[0], *log.split("(start 2)")[1].split("(start 3)")
    assert "error: a collective got no answer within training.dist_timeout_min=0.2: rank(s) 1" in first, first[-3000:]
    assert "after writing a checkpoint" in first and "resumed from" in second and "resumed from" in third
    assert log.count("2 node(s) x 1 process(es)") == 3
    cores = len(os.sched_getaffinity(0))
    for rank in (0, 1):
        assert log.count(f"rank {rank}/2 (node-local 0/1) on ") == 3, log[-3000:]
    assert log.count(f"cpu, 1 compute threads, {cores} decode threads") == 6 and cores >= 2
    rows = metrics(run_dir)
    assert [m["step"] for m in rows if "train/lr" in m] == list(range(1, 13))
    assert len(wandb_run_ids(run_dir)) == 3 and len(set(wandb_run_ids(run_dir))) == 1
    assert step_lrs(run_dir) == step_lrs(ddp_reference) and digests(run_dir) == digests(ddp_reference)
    assert same_weights(final_weights(run_dir), final_weights(ddp_reference))
    resumed = int(third.split("resumed from")[1].split("step ")[1].split()[0])
    first_step = next(m["time"] for m in rows if m["step"] == resumed + 1)
    print(f"dead node: killed after step {done} (or during the next), resumed from step {resumed}, "
          f"{first_step - killed_at:.0f} s from the kill to the resumed first step")


def test_the_script_refuses_a_missing_config_in_one_line(cluster, tmp_path):
    job = cluster.sbatch("--nodes=1", f"--output={tmp_path}/bad-%j.out", str(SCRIPT), "no/such.yaml", cwd=ROOT)
    info = cluster.wait(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert (tmp_path / f"bad-{job}.out").read_text() == \
        f"error: config file 'no/such.yaml' not found (relative to {ROOT}, where the job was submitted)\n"

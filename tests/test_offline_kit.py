"""The offline kit for GPU machines without internet: a lean bundle fits the machines' 64 MiB limit (with the
repository), and scripts/gpu_check.sh with it passes its CPU rehearsal in an environment that lacks exactly
what those machines lack (ffcv, fastargs, wandb, terminaltables, assertpy, pytorch-pfn-extras, the OpenCV
and libjpeg-turbo headers and libraries: as root, the system's copies of the bundle's libraries are hidden)."""
import importlib.metadata as md
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

LACKING = ("ffcv", "fastargs", "wandb", "terminaltables", "assertpy", "pytorch-pfn-extras", "rsb_ffcv")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("apt-get") and shutil.which("dpkg")),
                                 reason="the bundle takes OpenCV and libjpeg-turbo from Debian packages")]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def target_site(root: Path) -> Path:
    """This venv's packages minus what the GPU machines lack, as a directory for PYTHONPATH."""
    site = Path(sysconfig.get_paths()["purelib"])
    skip = set()
    for name in LACKING:
        try:
            skip |= {f.parts[0] for f in md.distribution(name).files or []}
        except md.PackageNotFoundError:
            pass
    out = root / "site"
    out.mkdir()
    for entry in site.iterdir():
        if entry.name in skip or entry.name.startswith("__editable__") or entry.suffix == ".pth":
            continue
        (out / entry.name).symlink_to(entry)
    return out


# Libraries the bundle ships because the GPU machines lack them (seen on an H200 node, 2026-12-04: libGLX.so.0,
# which Debian's OpenCV needs, was missing there).
SYSTEM_LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
HIDDEN = ("libGLX.so.0", "libGLdispatch.so.0", "libopencv_core.so.406", "libopencv_imgproc.so.406",
          "libturbojpeg.so.0", "libjpeg.so.62", "libtbb.so.12")


def without_system_copies(cmd: list[str]) -> list[str]:
    """cmd in a private mount namespace where the system's copies of the bundle's libraries read as empty files,
    so that anything loading them from the system fails as it would on the GPU machines (root and unshare
    needed; otherwise cmd as it is)."""
    present = sorted({str((SYSTEM_LIBDIR / n).resolve()) for n in HIDDEN if (SYSTEM_LIBDIR / n).exists()})
    if os.geteuid() != 0 or not shutil.which("unshare") or not present or subprocess.run(
            ["unshare", "--mount", "true"], capture_output=True).returncode != 0:  # e.g. a container without it
        return cmd
    binds = " && ".join(f"mount --bind /dev/null {shlex.quote(p)}" for p in present)
    return ["unshare", "--mount", "--propagation", "private", "bash", "-c", f'{binds} && exec "$@"', "bash", *cmd]


def lean_bundle(bundle: Path, *options: str) -> list[str]:
    """make_offline_bundle.sh --lean [options] into `bundle`, for Python 3.12; the names of its wheels."""
    p = subprocess.run(["bash", str(ROOT / "scripts" / "make_offline_bundle.sh"), "--lean", *options, str(bundle),
                        "3.12"], capture_output=True, text=True, env={**os.environ, "PIP": f"{sys.executable} -m pip"},
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return sorted(w.name.split("-")[0] for w in (bundle / "wheels").glob("*.whl"))


def test_lean_bundle_fits_and_gpu_check_sh_passes_its_cpu_rehearsal(tmp_path):
    bundle = tmp_path / "bundle"
    wheels = lean_bundle(bundle)
    size = _size(bundle)
    assert size < 48 * 2**20, f"lean bundle {size / 2**20:.1f} MiB"
    assert wheels == ["assertpy", "fastargs", "pytorch_pfn_extras", "terminaltables", "timm"]  # no W&B

    repo = tmp_path / "repo"  # gpu_check.sh builds rsb_ffcv/_jpeg in place: not in this checkout
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "data", "runs", "bench_out", "build",
                                                              "*.so", "__pycache__", "gpu_check_out", "wandb"))
    site = target_site(tmp_path)
    base = getattr(sys, "_base_executable", sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.update(PYTHON=base, PYTHONPATH=str(site), OUT_DIR=str(tmp_path / "out"), TMPDIR=str(tmp_path))
    probe = subprocess.run([base, "-c", "import torch, numba, cv2\ntry:\n import ffcv\nexcept ImportError:\n print('no ffcv')"],
                           capture_output=True, text=True, env=env)
    assert probe.stdout.strip() == "no ffcv", probe.stderr[-2000:]  # the stand-in lacks what the GPU machines lack
    p = subprocess.run(without_system_copies(["bash", "scripts/gpu_check.sh", str(bundle), "--gpu_check.device=cpu",
                                              "--gpu_check.quick=true", "--gpu_check.compile=false"]),
                       cwd=repo, capture_output=True, text=True, env=env, timeout=1500)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert p.stdout.strip().splitlines()[-1] == "PASSED"
    r = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    # every stage of the check, rehearsed on the CPU as it will run on the GPU node (once, here, for the suite)
    assert r["passed"] and r["machine"]["gpu"] is None and r["skipped"] == [] and r["failed"] == []
    assert r["loader_gpu_equals_cpu"]["equal"]
    assert [r["randaugment_gpu_equals_cpu"][b]["max_abs_diff"] for b in ("grouped", "masked")] == [0, 0]
    losses = r["train_steps_eager"]["losses"]
    assert losses[-1] < losses[0] and r["train_steps_eager"]["soft_targets"]
    assert r["bench_augment"]["rows"][0]["ours_images_per_s"] > 0
    for name in ("bench_train_a3", "bench_train_a3_masked", "bench_train_a1"):
        assert r[name]["real_images_per_s"] > 0 and 0 <= r[name]["data_stall_fraction"] < 1
        assert r[name]["model_step_images_per_s"] > 0  # the step alone, on a batch augmented beforehand
        assert 0 <= r[name]["data_wait_fraction"] < 1
    a1 = r["bench_train_a1"]["settings"]  # one process: repeated augmentation over 4 virtual ranks
    assert (a1["accumulation"], a1["repeated_aug"]) == (4, 3)
    assert len(list((tmp_path / "out").glob("*.beton"))) == 1  # one corpus beton, shared by every stage
    assert r["randaugment_host_syncs"]["torch_calls_that_sync"] == 1 and r["randaugment_host_syncs"]["passed"]
    assert r["randaugment_host_syncs_masked"]["torch_calls_that_sync"] == 0
    assert [r[name]["settings"]["rand_augment_batching"] for name in ("bench_train_a3", "bench_train_a3_masked")] == \
        ["grouped", "masked"]
    assert r["bench_augment"]["rows"][0]["masked_equals_grouped"]
    assert r["timm_pipeline_a3"]["images_per_s"] > 0 and r["derived"]["ours_vs_timm_pipeline"] > 0
    assert [row["threads"] for row in r["loader_scaling"]["rows"]][0] == 1 and r["profile_a3_step"]["top"]
    so = next((repo / "rsb_ffcv").glob("_jpeg*.so"))
    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
    assert str(bundle / "sysroot" / "lib" / "libjpeg.so.62") in ldd  # built against the bundle's libjpeg


def test_have_drops_what_the_target_has_except_a_timm_older_than_needed(tmp_path):
    """--have FREEZE leaves out the wheels of packages the target has; not timm when the target's is older than
    rsb_ffcv needs (the H200 nodes have 1.0.29, whose Lamb updates tensor by tensor): pip there upgrades it."""
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# the target's pip freeze\ntimm==1.0.29\nfastargs==1.2.0\n")
    wheels = lean_bundle(tmp_path / "bundle", "--have", str(freeze))
    assert wheels == ["assertpy", "pytorch_pfn_extras", "terminaltables", "timm"]

"""Device-call extras (H200, 2026-12-04): the model step's ceiling (ResNet-50 forward + backward in bf16 autocast
with cross-entropy on one resident random batch, then + timm's Lamb foreach / per tensor), and the A3 bench with
the foreach Lamb, with it forced off, again with it (alternating against drift), then under torch.compile.
Results in $OUT/lamb_and_model_step.json after every item. Run from the repository root:
    OUT=DIR python results/gpu/2026-12-04-h200/lamb_and_model_step.py [cuda|cpu] [BETON (gpu_check's corpus)]"""
import json, os, sys, time
import torch, timm, timm.optim, timm.optim.lamb as lamb
from rsb_ffcv import distributed
from rsb_ffcv.bench import train as bt

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
beton = sys.argv[2] if len(sys.argv) > 2 else "/tmp/gc/corpus_12800_proportion.beton"
cpu = dev == "cpu"
out = os.environ.get("OUT", "/tmp")
r = {"timm": timm.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
save = lambda: json.dump(r, open(f"{out}/lamb_and_model_step.json", "w"), indent=1, default=str)

def sync():
    if not cpu:
        torch.cuda.synchronize()

# 1. ResNet-50 step on one resident batch, no data, no augmentation: fwd+bwd, then + Lamb (foreach / per tensor)
batch, res = (8, 64) if cpu else (256, 160)
m = timm.create_model("resnet50").to(dev).to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, res, res, device=dev).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (batch,), device=dev)
for name, opt_kw in (("fwd_bwd", None), ("fwd_bwd_lamb_foreach", {"foreach": True}),
                     ("fwd_bwd_lamb_per_tensor", {"foreach": False})):
    opt = timm.optim.create_optimizer_v2(m, "lamb", lr=1e-3, weight_decay=0.02, **(opt_kw or {}))
    def step():
        with torch.autocast(dev, torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        if opt_kw is not None:
            opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(2 if cpu else 5):
        step()
    sync(); t = time.perf_counter(); n = 2 if cpu else 20
    for _ in range(n):
        step()
    sync(); ms = 1e3 * (time.perf_counter() - t) / n
    r[f"step_{name}"] = {"ms_per_step": ms, "images_per_s": batch / ms * 1e3, "batch": batch, "res": res}
    print(name, r[f"step_{name}"], flush=True); save()
del m, opt

# 2. the A3 bench from betons: foreach, per tensor, foreach (alternating against drift), then compiled
distributed.init(dev, key="extras")
orig = lamb._resolve_foreach
a3 = ("rsb_configs/a3.yaml", beton, dev, 16 if cpu else 256, 2 if cpu else 40)
small = ["--model.arch=resnet10t", "--resolution.train=64"] if cpu else ["--resolution.train=160"]
for name, per_tensor, extra in (("a3_lamb_foreach", False, []), ("a3_lamb_per_tensor", True, []),
                                ("a3_lamb_foreach_again", False, []), ("a3_compiled", False, ["--model.compile=true"])):
    lamb._resolve_foreach = (lambda *a, **k: False) if per_tensor else (lambda *a, **k: not cpu)
    t = time.perf_counter()
    try:
        r[name] = bt.run(*a3, [*small, *extra])
    except Exception as e:  # keep the others
        r[name] = {"error": repr(e)}
    r[name]["stage_seconds"] = time.perf_counter() - t
    print(name, {k: v for k, v in r[name].items() if k != "settings"}, flush=True); save()
lamb._resolve_foreach = orig

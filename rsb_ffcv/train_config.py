"""Every trainer parameter, with help text. Keys read like the RSB paper's table (training.epochs,
lr.lr, augment.rand_augment, augment.mixup_alpha ...): one name per idea in YAML, CLI, W&B and docs."""
from fastargs import Param, Section

from .config import BoolStr, Choice

SECTIONS = ("data", "resolution", "model", "training", "lr", "optim", "augment", "logging")

Section("data", "FFCV datasets and loading").params(
    train_dataset=Param(str, "train .beton (its .json sidecar gives the classes)", required=True),
    val_dataset=Param(str, "val .beton", required=True),
    num_workers=Param(int, "FFCV decode threads per process (0 = the node's cores / its processes); any count gives "
                           "the same crops", default=0),
    in_memory=Param(Choice(["auto", "true", "false"]),
                    "how the train beton is read (always memory-mapped: the processes of a node share one copy in "
                    "the page cache). true: exact random order (the beton should fit in RAM); false: page-local "
                    "order, windows of pages read in turn, each page about once per epoch per node (betons larger "
                    "than RAM); auto: true when the beton fits in the node's available memory (cgroup limits "
                    "included) less what its processes will allocate (batch buffers + 512 MiB each), decided once by "
                    "all ranks and printed", default="auto"),
    shuffle_window_mib=Param(int, "page-local order: MiB of beton pages shuffled together (0 = an eighth of the "
                                  "available memory); larger mixes classes better", default=0),
    batches_ahead=Param(int, "batches FFCV prepares ahead of the training step", default=3),
    decoder=Param(Choice(["fast", "ffcv"]), "fast: our crop decoder (torchvision-exact crops, DCT-scaled decode, "
                                         "antialiased resize); ffcv: FFCV's stock decoders", default="fast"),
    train_interpolation=Param(Choice(["bicubic", "bilinear", "random"]),
                              "RandomResizedCrop resize filter (random: per image, timm's train.py default; "
                              "fast decoder only)", default="bicubic"),
    test_interpolation=Param(Choice(["bicubic", "bilinear"]), "eval resize filter (fast decoder only)",
                             default="bicubic"),
)
Section("resolution", "image sizes").params(
    train=Param(int, "RandomResizedCrop output size for training", default=224),
    test=Param(int, "center-crop output size for evaluation", default=224),
    test_crop_ratio=Param(float, "center crop side / shorter image side at evaluation", default=0.95),
    progressive_start=Param(int, "progressive resizing: start resolution (0 = off)", default=0),
    progressive_end=Param(int, "progressive resizing: end resolution", default=0),
    progressive_start_epoch=Param(int, "progressive resizing: first epoch of the ramp", default=0),
    progressive_end_epoch=Param(int, "progressive resizing: last epoch of the ramp", default=0),
)
Section("model", "network").params(
    arch=Param(str, "timm model name", default="resnet50"),
    drop_path=Param(float, "stochastic depth rate (timm drop_path_rate)", default=0.0),
    channels_last=Param(BoolStr(), "channels-last memory format", default=True),
    compile=Param(BoolStr(), "torch.compile the training model (GPU and CPU; evaluation runs uncompiled)",
                  default=False),
)
Section("training", "the run").params(
    epochs=Param(int, "training epochs", default=100),
    batch_size=Param(int, "GLOBAL batch size: per-device = batch_size / (world size x accum_steps)", default=2048),
    max_device_batch=Param(int, "largest per-device micro-batch; more is reached by gradient accumulation "
                                "(0 = no limit)", default=0),
    precision=Param(Choice(["auto", "bf16", "fp16", "fp32"]),
                    "auto: bf16 autocast on GPUs that support it (else fp16 + GradScaler), fp32 on CPU", default="auto"),
    loss=Param(Choice(["bce", "ce"]), "bce (timm BinaryCrossEntropy) or soft-target cross-entropy", default="bce"),
    bce_target_thresh=Param(float, "BCE target threshold (binarise targets > thresh); 0 = off", default=0.2),
    label_smoothing=Param(float, "label smoothing", default=0.0),
    repeated_aug=Param(int, "repeated augmentation count (timm RepeatAugSampler over processes x accumulation "
                            "micro-batches); 0 or 1 = off", default=0),
    dist_bn=Param(Choice(["reduce", "broadcast", "none"]), "BatchNorm running statistics across processes before "
                  "each evaluation and checkpoint (timm --dist-bn): reduce = average, broadcast = rank 0's",
                  default="reduce"),
    ema=Param(BoolStr(), "keep a timm ModelEmaV3 of the weights and evaluate it too", default=False),
    ema_decay=Param(float, "EMA decay", default=0.9998),
    seed=Param(int, "seed for weights, data order and augmentation", default=0),
    device=Param(Choice(["auto", "cuda", "cpu"]), "auto: cuda when available", default="auto"),
    cpu_threads=Param(int, "torch CPU threads per process (0 = the node's cores / its processes); results are "
                           "bit-identical only between runs with the same count", default=0),
    resume=Param(str, "'' (fresh), auto (run_dir/last.pt if present), a checkpoint PATH, or "
                      "wandb:ENTITY/PROJECT/NAME:ALIAS", default=""),
    trust_pickles=Param(BoolStr(), "load a resume checkpoint even if it holds Python objects beyond tensors "
                                    "(only for files you trust: unpickling can run code)", default=False),
    checkpoint_every_min=Param(float, "also checkpoint (last.pt) mid-epoch when this many minutes have passed since "
                                      "the last checkpoint, all ranks at one step: a killed node loses at most that "
                                      "much (0 = at epoch ends only)", default=10.0),
    dist_timeout_min=Param(float, "how long a process waits in a collective (gradients, the stop agreement, "
                                  "gathers) for the others: a rank that froze or died ends the run after this, for "
                                  "torchrun --max-restarts or the batch script to resume it from last.pt "
                                  "(PyTorch's defaults: 10 min NCCL, 30 min gloo)", default=5.0),
    eval_every=Param(int, "evaluate every N epochs (and always after the last)", default=1),
    steps_per_epoch=Param(int, "cap on steps per epoch (0 = the whole epoch; for smoke tests)", default=0),
)
Section("lr", "learning-rate schedule (timm cosine with linear warmup)").params(
    lr=Param(float, "peak learning rate (not scaled by batch size)", default=8e-3),
    warmup_epochs=Param(float, "linear warmup epochs", default=5),
    warmup_lr=Param(float, "learning rate at the start of warmup", default=1e-4),
    min_lr=Param(float, "cosine floor", default=1e-6),
    cooldown_epochs=Param(int, "extra epochs at min_lr after the cosine (timm's 2021 default was 10)", default=0),
    step_unit=Param(Choice(["epoch", "update"]), "epoch: the rate changes once per epoch (timm's train.py in 2021); "
                    "update: after every optimizer update (timm's --sched-on-updates, 2022 on)", default="epoch"),
)
Section("optim", "optimizer (timm create_optimizer_v2)").params(
    opt=Param(Choice(["lamb", "sgd", "adamw"]), "optimizer", default="lamb"),
    weight_decay=Param(float, "weight decay (none on biases and norm layers)", default=0.02),
    momentum=Param(float, "SGD momentum", default=0.9),
    clip_grad=Param(float, "extra global grad-norm clip (0 = none; LAMB clips to 1.0 itself)", default=0.0),
)
Section("augment", "augmentation, batched on the device").params(
    rand_augment=Param(str, "timm RandAugment string, e.g. rand-m6-mstd0.5-inc1 ('' = off)", default=""),
    interpolation=Param(Choice(["bilinear", "bicubic", "random"]), "RandAugment geometric interpolation (random: "
                        "bilinear or bicubic per image and op, timm's train.py default)", default="bicubic"),
    rand_augment_batching=Param(Choice(["grouped", "masked"]), "how RandAugment batches its per-image ops, equal "
                                "to the bit: grouped (sorted by op: least arithmetic, one host sync per batch) or "
                                "masked (every op over the whole batch: no host sync, the same launches every "
                                "batch)", default="grouped"),
    rand_augment_compile=Param(BoolStr(), "torch.compile RandAugment's per-image work as one graph (needs "
                               "rand_augment_batching=masked; the draw stays eager: the same images on the CPU, on "
                               "a GPU a value may round one level apart)", default=False),
    mixup_alpha=Param(float, "Mixup alpha (0 = off)", default=0.0),
    cutmix_alpha=Param(float, "CutMix alpha (0 = off)", default=0.0),
    mixup_prob=Param(float, "probability of mixing a batch", default=1.0),
    mixup_switch_prob=Param(float, "probability of CutMix instead of Mixup when both are on", default=0.5),
    mixup_mode=Param(Choice(["batch", "pair", "elem"]), "timm Mixup mode", default="batch"),
)
Section("logging", "tracking and checkpoints").params(
    run_dir=Param(str, "run directory (config, metrics.jsonl, checkpoints)", default="runs/default"),
    wandb_mode=Param(Choice(["auto", "online", "offline", "disabled"]),
                     "auto: online when W&B credentials are configured, else offline", default="auto"),
    wandb_project=Param(str, "W&B project", default="rsb_ffcv"),
    wandb_entity=Param(str, "W&B entity ('' = default)", default=""),
    run_name=Param(str, "W&B run name ('' = run_dir's name)", default=""),
    log_every=Param(int, "log step metrics every N steps", default=50),
    artifact_every=Param(int, "log the checkpoint as a W&B model artifact every N epochs (0 = only the last)",
                         default=10),
)

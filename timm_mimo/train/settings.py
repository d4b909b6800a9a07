"""A training run's settings as typed, frozen objects: what the library below train.py reads.

train.py turns its parsed command line into one :class:`RunSettings` (``timm_mimo.train.args.run_settings``)
once; the tasks, the batch builder and the run state take these objects, never a command line, so each can be
built and tested on its own. Each group holds one concern of the recipe, named as the flags name it.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class MixingSettings:
    """How a batch is mixed: MixMo's member masks and the per-member MSDA (``timm_mimo.batch``)."""
    batch_repeat: int = 1
    mix_mode: Optional[str] = None      # None: the model's default_mix_mode ('cut' for the CNNs)
    mix_prob: float = 0.5
    mix_alpha: float = 2.0
    weight_root: float = 3.0
    msda: Optional[str] = None          # None, 'cutmix', 'mixup', 'box' or 'automix'
    msda_prob: float = 0.5
    msda_alpha: float = 1.0
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class AugmentSettings:
    """The batched augmentation of every member view (``timm_mimo.augment.batch_augment``)."""
    crop: str = 'crop-flip'             # 'crop-flip', 'crop', 'reflect-crop-flip' or 'none'
    erase_prob: float = 0.0
    erase_mode: str = 'pixel'


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer and the schedule (timm's factories), and the gradient clipping."""
    opt: str = 'sgd'
    lr: float = 0.05
    weight_decay: float = 5e-4
    decay_all: bool = False             # also decay BatchNorm and biases
    momentum: float = 0.9
    fused: Optional[bool] = None        # None: where available on CUDA
    clip_grad: Optional[float] = None
    sched: str = 'cosine'
    warmup_epochs: float = 1
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    decay_milestones: Tuple[int, ...] = (90, 180, 270)
    decay_rate: float = 0.1
    # timm's create_optimizer_v2 arguments beyond the above (timm's train.py flags of the same names)
    layer_decay: Optional[float] = None     # lr scale decay per layer group from the head (ViT fine-tuning)
    betas: Optional[Tuple[float, ...]] = None   # None: the optimizer's own
    eps: Optional[float] = None
    opt_kwargs: Dict[str, Any] = field(default_factory=dict)   # any other optimizer argument

    def optimizer_kwargs(self) -> dict:
        """The optimizer's own arguments that are set (betas, eps, --opt-kwargs), for create_optimizer_v2."""
        own = dict(betas=self.betas, eps=self.eps)
        return {**{k: v for k, v in own.items() if v is not None}, **self.opt_kwargs}


@dataclass(frozen=True)
class AutoMixSettings:
    """AutoMix's Mix Block and momentum encoder (``timm_mimo.automix``; used with --msda / --mix-mode automix)."""
    stage: int = -2
    alpha: float = 2.0
    mask_loss_weight: float = 0.1
    margin: float = 0.1
    lam_margin: float = 0.08
    lam_concat: bool = False
    momentum: float = 0.999
    momentum_end: float = 0.999999
    momentum_start: float = 0.1
    mixblock_lr: float = 0.05           # the model's learning rate unless set apart


@dataclass(frozen=True)
class RunSettings:
    """The whole recipe of a run: its length, batch, seed, logging and checkpoints, and the groups above."""
    model: str
    epochs: int
    seed: int = 42
    batch_size: int = 64                # global mixed samples per optimizer step
    grad_accum_steps: int = 1
    eval_metric: str = 'top1'
    checkpoint_hist: int = 1
    log_interval: int = 50
    log_interval_s: float = 30.0
    mix_vis_interval: int = 0
    trackers: Tuple[str, ...] = ()      # Accelerate's tracker names (--log-with)
    sync_bn: bool = False               # SyncBatchNorm across processes (more than one only)
    channels_last: bool = False
    torchcompile: Optional[str] = None  # the backend; None: eager
    torchcompile_mode: Optional[str] = None
    ema_decay: Optional[float] = None   # None: no EMA copy of the weights
    mixing: MixingSettings = MixingSettings()
    augment: AugmentSettings = AugmentSettings()
    optim: OptimSettings = OptimSettings()
    automix: AutoMixSettings = AutoMixSettings()

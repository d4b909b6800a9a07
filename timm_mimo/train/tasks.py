"""Training methods, chosen once per run (as timm's ``timm.task`` does): what a step's loss is, what follows an
optimizer step, which models are evaluated and deployed, and what a checkpoint must hold beside the model.

- :class:`MimoTask`: MixMo / MIMO training for M >= 1 (any plain timm model is the M = 1 case), with an
  optional ``--model-ema`` copy.
- :class:`AutoMixTask`: AutoMix (``--msda automix``, M = 1; ``--mix-mode automix``, M = 2): its Mix Block, its
  momentum encoder with the cosine momentum schedule, their parameter groups and their files.

Both keep their extra models as tensors (:meth:`state_dict`), which train.py saves with safetensors: nothing
of a checkpoint is ever unpickled to resume it.
"""
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn

from ..augment import batch_augment
from ..batch import MimoBatch, MimoBatchBuilder
from ..loss import MemberSoftTargetCrossEntropy
from ..mimo import MemberOutputs
from ..rundir import EMA_DIR
from .settings import AugmentSettings, AutoMixSettings, MixingSettings, RunSettings

EMA = EMA_DIR  # the EMA model's name: its folder in the run, its prefix in results.json


class StepOutput(NamedTuple):
    loss: torch.Tensor                            # to backpropagate
    parts: Dict[str, torch.Tensor]                # detached scalars, summed over the epoch for the summary
    samples: Optional[Dict[str, torch.Tensor]]    # mixed samples for a picture (when asked), else None
    what: str                                     # what the samples show


def build_builder(model, num_classes: int, img: int, mix_mode: str, mixing: MixingSettings,
                  augment: AugmentSettings) -> MimoBatchBuilder:
    """The MIMO batch builder. AutoMix mixes the batch itself: the builder then draws no MixMo masks (M = 2:
    'mimo', member weights 1) and no MSDA (M = 1); it still repeats, augments, pairs and makes the targets."""
    grid = model.mix_grid_size((img, img)) if hasattr(model, 'mix_grid_size') else (img, img)
    return MimoBatchBuilder(
        getattr(model, 'num_members', 1), num_classes, grid, batch_repeat=mixing.batch_repeat,
        mix_mode='mimo' if mix_mode == 'automix' else mix_mode, mix_prob=mixing.mix_prob, mix_alpha=mixing.mix_alpha,
        weight_root=mixing.weight_root, msda=None if mixing.msda == 'automix' else mixing.msda,
        msda_prob=mixing.msda_prob, msda_alpha=mixing.msda_alpha, label_smoothing=mixing.label_smoothing,
        augment=batch_augment(augment.crop, augment.erase_prob, augment.erase_mode))


class MimoTask:
    """MixMo / MIMO training: the batch builder mixes, the members predict their own inputs' labels."""

    def __init__(self, model: nn.Module, builder, ema_decay: Optional[float] = None, device=None):
        from timm.utils import ModelEmaV3
        self.outputs = MemberOutputs(model)
        self.builder = builder
        self.criterion = MemberSoftTargetCrossEntropy()
        self.ema = ModelEmaV3(model, decay=ema_decay, device=device) if ema_decay is not None else None

    # --- set-up ---------------------------------------------------------------------------------------

    def param_groups(self, lr: float, weight_decay: float, decay_all: bool) -> List[dict]:
        """Optimizer groups beside the model's."""
        return []

    def prepare(self, accelerator, total_updates: int):
        """Hand the task's own trained modules to Accelerate (they then follow the model's device and DDP)."""

    @property
    def trained_modules(self) -> List[nn.Module]:
        """Modules trained beside the model: accumulated and clipped with it."""
        return []

    def set_epoch(self, epoch: int, epochs: int):
        self.builder.set_epoch(epoch, epochs)

    # --- the step -------------------------------------------------------------------------------------

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
             pictures: bool = False) -> StepOutput:
        batch = self.builder(images, labels, generator=generator)
        logits = self.outputs.members(model, batch.inputs, batch.masks)
        loss = self.criterion(logits.float(), batch.targets)
        return StepOutput(loss, {}, *(self._pictures(batch, images, generator) if pictures else (None, '')))

    def after_step(self, model: nn.Module, num_updates: int):
        """After each optimizer step (``model``: the bare model)."""
        if self.ema is not None:
            self.ema.update(model, step=num_updates)

    def _pictures(self, batch: MimoBatch, images: torch.Tensor, generator: torch.Generator):
        from ..eval.plots import mimo_samples, msda_samples
        if batch.inputs.shape[1] >= 2:
            return mimo_samples(batch.inputs, batch.masks), \
                f'MixMo {self.builder.mix_mode} masks (members 0 and 1; mixed = pixel illustration)' + \
                self._patch_note(batch)
        if self.builder.msda is not None:
            # fresh draws of the same MSDA on this step's images (the builder keeps its partners to itself)
            alpha = self.builder.msda_alpha
            first_copies = images[:, 0] if images.ndim == 5 else images  # timm's per-copy views: one per image
            return msda_samples(first_copies.float(), self.builder.msda, alpha, generator), \
                f'{self.builder.msda} (alpha {alpha}, drawn for the picture)'
        return None, 'nothing is mixed in this run (M = 1, no MSDA)'

    def _patch_note(self, batch: MimoBatch) -> str:
        """Cut-MixMo mixes a batch with patches or linearly (plain grey masks): say which, and the epoch's
        patch probability, which decays to 0 over the last 1/12 of training (a short run's last epoch)."""
        from ..mixing import patch_mix_prob
        if self.builder.mix_mode != 'cut':
            return ''
        p = patch_mix_prob(self.builder.progress, self.builder.mix_prob)
        patches = bool(((batch.masks == 0) | (batch.masks == 1)).all())
        return f'; this batch {"patches" if patches else "linear"}, patch probability {p:.2f} this epoch' + \
            (' (decayed to 0 over the last 1/12 of training: linear mixing only)' if p == 0 else '')

    # --- evaluation and what is kept ------------------------------------------------------------------

    @property
    def eval_models(self) -> Dict[str, nn.Module]:
        """Models evaluated every epoch beside the trained one."""
        return {EMA: self.ema.module} if self.ema is not None else {}

    deployed = 'model'  # the model that best/ holds and --eval-metric selects: the trained one

    def epoch_columns(self, metrics: Dict[str, dict], sums: Dict[str, float]) -> dict:
        """Summary columns of the extra models and loss parts (``metrics``: name -> validation metrics)."""
        if EMA not in metrics:
            return {}
        m = metrics[EMA]
        return dict(ema_top1=m['top1'], ema_nll=m['nll'], ema_ece=m['ece'])

    def results(self, accelerator) -> dict:
        """Entries of results.json beside the evaluations."""
        return {}

    def files(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Files of the run folder beside the model folders: name -> tensors (written with safetensors)."""
        return {}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {f'{EMA}.{k}': v for k, v in self.ema.state_dict().items()} if self.ema is not None else {}

    def load_state_dict(self, tensors: Dict[str, torch.Tensor]):
        if self.ema is not None:
            prefix = f'{EMA}.'
            self.ema.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def start_copies_from(self, model: nn.Module):
        """A resume from a checkpoint that holds no copies (the run was trained without ``--model-ema``): start
        them from the resumed weights, as timm's train.py builds its EMA after loading a checkpoint. They were
        built from the weights before the load."""
        if self.ema is not None:
            self.ema.set(model)


class AutoMixTask(MimoTask):
    """AutoMix: the Mix Block learns masks through a frozen momentum encoder (an EMA of the model with a
    cosine momentum schedule), which is also the deployed model (docs/methods/automix.md §6, §8)."""

    deployed = EMA

    def __init__(self, model: nn.Module, builder, settings: AutoMixSettings, mixing: MixingSettings, img_size,
                 device=None):
        from timm.utils import ModelEmaV3
        from ..automix import build_automix, check_features, freeze
        super().__init__(model, builder)
        num_members = getattr(model, 'num_members', 1)
        self.automix = build_automix(
            model, settings.stage, num_members=num_members, lam_concat=settings.lam_concat, alpha=settings.alpha,
            mask_loss_weight=settings.mask_loss_weight, margin=settings.margin, lam_margin=settings.lam_margin,
            weight_root=mixing.weight_root, mix_prob=mixing.mix_prob if num_members == 2 else 1.0)
        # the model is not on the training device yet (Accelerate moves it): probe it where it is
        check_features(self.automix, model, img_size, getattr(model, 'in_chans', 3), next(model.parameters()).device)
        self.momentum = (settings.momentum, settings.momentum_end, settings.momentum_start)
        self.mixblock_lr = settings.mixblock_lr
        # the momentum encoder runs AutoMix's passes in train mode, so its BatchNorm statistics mostly follow
        # its own activations (timm_mimo.automix); it learns nothing by gradient
        self.ema = ModelEmaV3(model, decay=settings.momentum, device=device)
        freeze(self.ema.module)
        self.mixblock = self.automix.mixblock.to(device)
        self.total_updates = 0

    def param_groups(self, lr: float, weight_decay: float, decay_all: bool) -> List[dict]:
        from ..automix import mixblock_param_groups
        return mixblock_param_groups(self.mixblock, self.mixblock_lr, weight_decay, decay_all=decay_all)

    def prepare(self, accelerator, total_updates: int):
        self.automix.mixblock = accelerator.prepare(self.mixblock)  # DDP with several processes, saved in state
        self.total_updates = total_updates

    @property
    def trained_modules(self) -> List[nn.Module]:
        return [self.automix.mixblock]

    def set_epoch(self, epoch: int, epochs: int):
        super().set_epoch(epoch, epochs)
        self.automix.progress = self.builder.progress  # M = 2: learned vs linear masks, decaying like Cut-MixMo's

    def step(self, model, images, labels, generator, pictures: bool = False) -> StepOutput:
        # one iteration of AutoMix: both branches, one loss, one backward, one optimizer step
        batch = self.builder(images, labels, generator=generator)
        out = self.automix(model, self.ema.module, batch, generator, self.outputs, vis=pictures)
        what = 'AutoMix (learned mask, backbone branch)' if batch.inputs.shape[1] == 1 else \
            'AutoMix-MixMo (learned mask on the mixing grid; mixed = pixel illustration)'
        return StepOutput(out.loss, out.parts, out.vis, what)

    def after_step(self, model: nn.Module, num_updates: int):
        from ..automix import momentum_at
        # the momentum for the update after iteration t = num_updates - 1 (docs/methods/automix.md §6), then the
        # EMA update
        self.ema.decay = momentum_at(num_updates - 1, self.total_updates, *self.momentum)
        self.ema.update(model)

    def epoch_columns(self, metrics: Dict[str, dict], sums: Dict[str, float]) -> dict:
        m = metrics[EMA]
        columns = dict(ema_top1=m['top1'], ema_nll=m['nll'], ema_ece=m['ece'], ema_top5=m['top5'], ema_loss=m['nll'],
                       automix_momentum=self.ema.decay)
        columns.update({f'ema_member{k}_top1': acc for k, acc in enumerate(m['member_top1'])})
        columns.update({f'train_{k}' if k == 'mask_mean' else f'train_loss_{k}': v for k, v in sums.items()})
        return columns

    def results(self, accelerator) -> dict:
        mixblock = self.mixblock  # the bare Mix Block (the prepared one may be a DDP wrapper)
        return dict(automix=dict(
            mode='--msda automix' if self.automix.num_members == 1 else '--mix-mode automix',
            feature_level=self.automix.tap.index, feature_module=self.automix.tap.info.get('module'),
            mixblock_params=sum(p.numel() for p in mixblock.parameters()), final_momentum=self.ema.decay))

    def files(self) -> Dict[str, Dict[str, torch.Tensor]]:
        from ..rundir import MIXBLOCK_FILE
        mixblock = self.mixblock
        return {MIXBLOCK_FILE: {k: v.detach().contiguous() for k, v in mixblock.state_dict().items()}}

    def describe(self) -> str:
        m0, m_end, start = self.momentum
        return (f'Mix Block on feature level {self.automix.tap.index} ({self.automix.tap.info.get("module", "?")}, '
                f'{self.mixblock.in_chans} ch), {sum(p.numel() for p in self.mixblock.parameters())} params, lr '
                f'{self.mixblock_lr}; momentum encoder {m0} -> {m_end} (cosine from {start:.0%} of training)')


def check_automix_settings(settings: RunSettings, model: nn.Module, mix_mode: str):
    """The combinations AutoMix supports, refused with one line otherwise (naming the flags)."""
    from ..mixing import BINARY_MIX_MODES
    num_members, automix = getattr(model, 'num_members', 1), settings.automix
    if settings.mixing.msda == 'automix' and mix_mode == 'automix':
        raise ValueError('use --msda automix (M = 1) or --mix-mode automix (M = 2), not both')
    if settings.mixing.msda == 'automix' and num_members != 1:
        raise ValueError(f'--msda automix is AutoMix for single networks (M = 1) but {settings.model} has '
                         f'M = {num_members}: use --mix-mode automix for M = 2')
    if mix_mode == 'automix':
        if num_members != 2:
            raise ValueError(f'--mix-mode automix learns MixMo masks for M = 2 but {settings.model} has '
                             f'M = {num_members}')
        if getattr(model, 'default_mix_mode', 'cut') in BINARY_MIX_MODES:
            raise ValueError(f'--mix-mode automix draws soft masks; {settings.model} mixes tokens with binary masks')
    if settings.ema_decay is not None:
        raise ValueError('AutoMix keeps its own momentum encoder, evaluated and saved as the EMA model: '
                         'drop --model-ema')
    if automix.mixblock_lr < 0:
        raise ValueError(f'--mixblock-lr must be >= 0, got {automix.mixblock_lr}')
    if not 0 <= automix.momentum <= 1 or not 0 <= automix.momentum_end <= 1:
        raise ValueError('--automix-momentum and --automix-momentum-end must be in [0, 1]')


def create_task(settings: RunSettings, model: nn.Module, builder, mix_mode: str, img_size, device=None) -> MimoTask:
    """The run's training method, chosen once from its settings."""
    if 'automix' in (settings.mixing.msda, mix_mode):
        check_automix_settings(settings, model, mix_mode)
        return AutoMixTask(model, builder, settings.automix, settings.mixing, img_size, device)
    return MimoTask(model, builder, ema_decay=settings.ema_decay, device=device)

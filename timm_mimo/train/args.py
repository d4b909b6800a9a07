"""train.py's command line: the flags (timm's names where they overlap), YAML configs and their checks.

Precedence: the flags' defaults, then the run's own ``args.yaml`` (``--resume``), then a ``-c`` config, then
the command line. Every value is checked as the command line checks it (type, choices, range), so a config
cannot bring in what a flag would refuse. A resumed run starts from its own arguments; what the command line
changes in its recipe (all but :data:`LOCAL_KEYS`) is warned about and recorded (train.py).
"""
import argparse
import math
import re
from pathlib import Path
from typing import List, Tuple

import yaml

from ..cli import refuse_below_one
from ..data.splits import DATA_BACKEND_KEYS  # noqa: F401  (train.py's, with the flags below)
from ..data.transforms import TIMM_AUG, ImageTransforms
from .settings import AugmentSettings, AutoMixSettings, MixingSettings, OptimSettings, RunSettings

LOWER_IS_BETTER = ('nll', 'ece', 'brier', 'loss')
EVAL_METRICS = ('top1', 'top5', 'nll', 'ece', 'brier', 'auc', 'member_mean_top1')
# where a run's files go and how it is watched: these may change on --resume, everything else is the recipe
LOCAL_KEYS = {'config', 'resume', 'output', 'experiment', 'debug', 'workers', 'device_data', 'data_cache_dir',
              'data_dir', 'dataset_download', 'pretrained_path', 'initial_checkpoint', 'log_tensorboard',
              'checkpoint_hist', 'log_interval', 'log_interval_s', 'torchcompile', 'torchcompile_mode',
              'channels_last', 'fused_opt', 'mix_vis_interval', 'log_with', 'log_wandb', 'log_project'}
# local keys a resumed run takes from its args.yaml when the command line does not give them: where the data is
# (a run resumes on its own data without naming it again; a new --data-dir still wins, e.g. the data moved) and
# its trackers (it keeps logging to them; --log-with none turns them off)
RECORDED_LOCAL_KEYS = ('data_dir', 'log_with', 'log_project')
# what train.py records in args.yaml beside the flags (a hf-hub: / local-dir: model's Hub commit or folder):
# a run's args.yaml stays a valid -c config, these keys being skipped
RECORD_KEYS = ('model_source',)
_BOOL_WORDS = {'true': True, 'yes': True, 'on': True, '1': True, 'false': False, 'no': False, 'off': False, '0': False}
_BOOL_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``-h`` shows every default, and the description as written."""


def build_parser(description: str = '') -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument('-c', '--config', default='', help='YAML file of argument defaults (keys = long flag names, e.g. batch_size)')
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', default=None, help='dataset root, image folder, tar or CIFAR-10 zip')
    g.add_argument('--dataset', default='', help="'' = embedded digits; cifar10-zip, torch/cifar10, ...")
    g.add_argument('--dataset-download', action='store_true',
                   help="timm's flag, passed to its reader: download the set where the library can (torch/, hfids/, "
                        "tfds/); offline the library refuses it (one error line)")
    g.add_argument('--val-per-class', type=int, default=None, help='validation images per class carved from train')
    g.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s)')
    g.add_argument('-j', '--workers', type=int, default=0, help='data loader worker processes')
    g.add_argument('--device-data', default='auto', choices=['auto', 'on', 'off'],
                   help="keep the decoded splits on the device and batch them there (small-image sets: the CIFAR "
                        "zip, torch/cifar10/100, digits); 'auto': whenever the data allows it (no per-image --aa); "
                        "'off': a DataLoader with timm's per-image transforms")
    g.add_argument('--data-cache-dir', default=None,
                   help='where decoded uint8 splits are cached (default $TIMM_MIMO_CACHE_DIR or ~/.cache/timm_mimo)')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='wrn16_2_mixmo2',
                   help="any registered timm model, or one by its source as timm names it: 'hf-hub:org/name[@rev]' "
                        "(a Hub repository or the local Hugging Face cache) or 'local-dir:PATH' (a folder of "
                        "config.json + model.safetensors); the Hub commit or folder is recorded (args.yaml, "
                        "best/config.json: model_source)")
    g.add_argument('--num-classes', type=int, default=None,
                   help="the data set's class count (checked; default: the data set's); a --pretrained model of "
                        "another count is fine-tuned: its heads (all M of a MIMO model) are rebuilt, its core kept")
    g.add_argument('--num-members', type=int, default=None, help='M (MIMO models only); default the model\'s')
    g.add_argument('--ensemble', default=None, choices=['logits', 'probs'], help='ensembling rule (MIMO)')
    g.add_argument('--drop', type=float, default=None, help='dropout before the heads')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate (timm models that have it)')
    g.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V', help='extra create_model kwargs')
    g.add_argument('--pretrained', action='store_true',
                   help='start from the pretrained weights: the registered ones, or those of the hf-hub: / local-dir: '
                        'model')
    g.add_argument('--initial-checkpoint', default='', help='start from these weights (safetensors / .pth)')
    g.add_argument('--pretrained-path', default=None,
                   help="load these local weights as the pretrained ones (timm's flag; for mimo_backbone: the "
                        "backbone's), adapted like pretrained=True weights (classifier, input channels)")
    g = p.add_argument_group('batch and MIMO mixing')
    g.add_argument('-b', '--batch-size', type=int, default=64, help='global mixed samples per optimizer step')
    g.add_argument('--batch-repeat', type=int, default=1, help='copies of each unique image per batch (b)')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='micro-steps summed per optimizer step')
    g.add_argument('--mix-mode', default=None, choices=['mimo', 'linear', 'cut', 'box', 'token', 'automix'],
                   help="MIMO masks; default the model's ('cut' for MixMo CNNs, binary 'box' for MixViT); "
                        "'automix' (M = 2, experimental): Cut-MixMo with a learned Mix Block mask in place of "
                        "the box (--mix-prob of the batches)")
    g.add_argument('--mix-prob', type=float, default=0.5,
                   help='probability of patch mixing (cut mode) or of the learned mask (automix mode)')
    g.add_argument('--mix-alpha', type=float, default=2.0, help='Dirichlet concentration of the ratios')
    g.add_argument('--weight-root', type=float, default=3.0, help='root r of the member loss weights')
    g.add_argument('--msda', default='none', choices=['none', 'cutmix', 'mixup', 'box', 'automix'],
                   help="per-member pixel MSDA; 'box': CutMix with whole cells of the model's mixing grid (a "
                        "ViT's tokens), MixViT's augmentation-only control at M = 1; 'automix' (M = 1): "
                        "AutoMix's learned Mix Block")
    g.add_argument('--msda-prob', type=float, default=0.5, help='probability of --msda per batch')
    g.add_argument('--msda-alpha', type=float, default=1.0, help='MSDA ratio ~ Beta(alpha, alpha)')
    g.add_argument('--mixup', type=float, default=0.0, help='timm alias: --msda mixup --msda-alpha A')
    g.add_argument('--cutmix', type=float, default=0.0, help='timm alias: --msda cutmix --msda-alpha A')
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    g.add_argument('--aug', default=None, choices=['crop-flip', 'crop', 'reflect-crop-flip', 'none', 'timm'],
                   help="batched pad-4 crop + flip per member view (CIFAR / Tiny ImageNet recipe), crop only, the "
                        "same with reflect padding (AutoMix's recipe), none, or 'timm': timm's create_transform "
                        "training pipeline drawn for each of the M x b copies of an image (ImageNet recipe: the "
                        "'timm transforms' flags); default: 'timm' for a folder / tar / hfds set whose images are "
                        "larger than the model's input, else the batched crop-flip (crop only where a flip changes "
                        "the label, e.g. digits)")
    g.add_argument('--aa', default=None, help="timm auto-augment policy per image, e.g. 'rand-m9-mstd0.5-inc1' "
                                              "(with --aug timm: in timm's pipeline, per member copy)")
    g.add_argument('--reprob', type=float, default=0.0,
                   help="random erasing probability per batch copy (timm's semantics, batched on the device; with "
                        "--aug timm: timm's RandomErasing per member copy in the loader)")
    g.add_argument('--remode', default='pixel', choices=['pixel', 'rand', 'const'], help='random erasing fill')
    g = p.add_argument_group('AutoMix (--msda automix for M = 1, --mix-mode automix for M = 2; docs/automix.md)')
    g.add_argument('--automix-stage', type=int, default=-2,
                   help="feature level (model.feature_info index; negative from the end) read by the Mix Block")
    g.add_argument('--automix-alpha', type=float, default=2.0, help='lambda ~ Beta(alpha, alpha), two per batch')
    g.add_argument('--automix-mask-loss', type=float, default=0.1, help='weight of the L1 mask loss')
    g.add_argument('--automix-margin', type=float, default=0.1, help='margin of the mask loss')
    g.add_argument('--automix-lam-margin', type=float, default=0.08,
                   help='backbone branch falls back to Mixup when lambda is this close to 0 or 1')
    g.add_argument('--automix-momentum', type=float, default=0.999, help='momentum encoder: initial EMA momentum')
    g.add_argument('--automix-momentum-end', type=float, default=0.999999, help='final EMA momentum (cosine)')
    g.add_argument('--automix-momentum-start', type=float, default=0.1,
                   help='fraction of training before the cosine momentum schedule starts')
    g.add_argument('--automix-lam-concat', action='store_true', help='feed lambda to the Mix Block (ImageNet / ViT)')
    g.add_argument('--mixblock-lr', type=float, default=None, help='Mix Block learning rate (default: --lr)')
    g.add_argument('--mix-vis-interval', type=int, default=0,
                   help='write a PNG grid of mixed samples every N epochs (0 = off)')
    g = p.add_argument_group('optimizer and schedule (timm factories)')
    g.add_argument('--opt', default='sgd', help="timm optimizer name ('sgd' is Nesterov SGD)")
    g.add_argument('--lr', type=float, default=0.05, help='peak learning rate for the global batch -b')
    g.add_argument('--weight-decay', type=float, default=5e-4,
                   help="weight decay, applied by the optimizer's own rule (decoupled for AdamW); BN and biases "
                        "excluded unless --wd-all")
    g.add_argument('--wd-all', action='store_true',
                   help='decay every parameter incl. BN and biases (MixMo\'s L2 on all parameters)')
    g.add_argument('--momentum', type=float, default=0.9,
                   help='momentum of SGD / RMSprop-type optimizers (Adam-type ones use their betas)')
    g.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this (None: no clipping)')
    g.add_argument('--sched', default='cosine', help='timm scheduler: cosine, multistep, step, ...')
    g.add_argument('--epochs', type=int, default=10, help='epochs to train')
    g.add_argument('--warmup-epochs', type=float, default=1, help='linear warmup, per optimizer step')
    g.add_argument('--warmup-lr', type=float, default=1e-5, help='learning rate at the first warmup step')
    g.add_argument('--min-lr', type=float, default=0.0, help='lowest learning rate of the cosine / step schedules')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270],
                   help='multistep: epochs (0-based) at which the lr is multiplied by --decay-rate')
    g.add_argument('--decay-rate', type=float, default=0.1, help='step / multistep: lr factor at each milestone')
    g = p.add_argument_group('speed and precision')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                   help='mixed precision through Accelerate (--no-amp overrides a config)')
    g.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'], help='autocast type with --amp')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False,
                   help='channels-last memory format (--no-channels-last overrides a config)')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help="torch.compile the model (backend default inductor; 'none' = off, overriding a config); "
                        "falls back to eager if compiling fails")
    g.add_argument('--torchcompile-mode', default=None, help="torch.compile mode, e.g. 'max-autotune'")
    g.add_argument('--fused-opt', action=argparse.BooleanOptionalAction, default=None,
                   help="PyTorch's fused optimizer step (SGD, Adam, AdamW); default: on for CUDA where available")
    g.add_argument('--grad-checkpointing', action='store_true', help='recompute activations in backward (less memory)')
    g.add_argument('--limit-train-batches', type=int, default=None, help='at most this many steps per epoch')
    g.add_argument('--log-interval', type=int, default=50,
                   help='optimizer steps between host syncs: loss check, progress bar, and a log line when stderr '
                        'is not a terminal (at least 4 per epoch)')
    g.add_argument('--log-interval-s', type=float, default=30.0,
                   help='seconds between these log lines at most, whatever the steps take')
    g = p.add_argument_group('EMA')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights, evaluated each epoch')
    g.add_argument('--model-ema-decay', type=float, default=0.999, help='EMA decay per optimizer step')
    g = p.add_argument_group('output')
    g.add_argument('--seed', type=int, default=42, help='seeds the weights, the data order and every mixing draw')
    g.add_argument('--output', default='output/train', help='parent folder of the experiment folders')
    g.add_argument('--experiment', default='', help='experiment folder name (default: date-model)')
    g.add_argument('--resume', default='',
                   help='experiment folder (or checkpoint) to continue from, with its own arguments (args.yaml), its '
                        'data location included unless --data-dir gives a new one')
    g.add_argument('--checkpoint-hist', type=int, default=1, help='complete checkpoints to keep')
    g.add_argument('--eval-metric', default='top1', help='validation metric that selects the best epoch')
    g.add_argument('--debug', action='store_true', help='show tracebacks instead of one-line errors')
    add_data_backend_args(p)
    add_image_transform_args(p)
    add_tracker_args(p)
    add_timm_optimizer_args(p)
    return p


def add_tracker_args(p: argparse.ArgumentParser):
    """Experiment trackers through Accelerate (timm_mimo.train.trackers; README "Trackers")."""
    g = p.add_argument_group('experiment trackers (Accelerate\'s)')
    g.add_argument('--log-with', default='', metavar='NAME[,NAME]',
                   help="Accelerate trackers: tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, "
                        "trackio, 'all' (every installed one) or 'none'; the run's arguments as their config, loss / "
                        "lr / samples per second every --log-interval steps, the summary row at each epoch, the "
                        "optimizer step as the step; files under <run>/trackers/; a resumed run keeps its trackers "
                        "and continues their run (TensorBoard, wandb)")
    g.add_argument('--log-wandb', action='store_true', help="timm's flag: --log-with wandb")
    g.add_argument('--log-tensorboard', action='store_true', help='--log-with tensorboard')
    g.add_argument('--log-project', default='timm_mimo',
                   help="the trackers' project (wandb's project; TensorBoard's folder <run>/trackers/<project>)")


def resolve_trackers(args: argparse.Namespace):
    """--log-with with its aliases folded in, as the checked, comma-joined tracker names (what args.yaml keeps)."""
    from .trackers import tracker_names
    names = [n for n in args.log_with.split(',') if n.strip() not in ('', 'none')]
    names += ['wandb'] * args.log_wandb + ['tensorboard'] * args.log_tensorboard
    args.log_with = ','.join(tracker_names(','.join(names)))


def add_timm_optimizer_args(p: argparse.ArgumentParser):
    """timm's optimizer and distributed flags, passed to timm.optim.create_optimizer_v2 and
    timm.layers.convert_sync_batchnorm."""
    g = p.add_argument_group("timm's optimizer and distributed flags")
    g.add_argument('--layer-decay', type=float, default=None,
                   help="layer-wise lr decay in (0, 1]: each layer group's lr scaled by decay^(depth from the head) "
                        "(timm models with group_matcher; ViT fine-tuning)")
    g.add_argument('--opt-betas', type=float, nargs='+', default=None, metavar='BETA',
                   help="the optimizer's betas (Adam-type: two), each in [0, 1); default: the optimizer's")
    g.add_argument('--opt-eps', type=float, default=None, help="the optimizer's epsilon (> 0); default: its own")
    g.add_argument('--opt-kwargs', nargs='*', default=[], metavar='K=V',
                   help='other optimizer arguments, values as YAML (timm\'s flag), e.g. --opt-kwargs foreach=false')
    g.add_argument('--sync-bn', action='store_true',
                   help='synchronise BatchNorm statistics across processes (timm\'s convert_sync_batchnorm, before '
                        'Accelerate wraps the model; GPUs only, as PyTorch\'s SyncBatchNorm; no effect in one process)')


def check_timm_optimizer_args(args: argparse.Namespace):
    from ..cli import parse_model_kwargs
    if args.layer_decay is not None and not (math.isfinite(args.layer_decay) and 0 < args.layer_decay <= 1):
        raise ValueError(f'--layer-decay must be in (0, 1], got {args.layer_decay}')
    if args.opt_betas is not None and not (len(args.opt_betas) <= 3 and all(0 <= b < 1 for b in args.opt_betas)):
        raise ValueError(f'--opt-betas takes one to three values in [0, 1), got {" ".join(map(str, args.opt_betas))}')
    if args.opt_eps is not None and not (math.isfinite(args.opt_eps) and args.opt_eps > 0):
        raise ValueError(f'--opt-eps must be a finite number > 0, got {args.opt_eps}')
    parse_model_kwargs(args.opt_kwargs, '--opt-kwargs')


def add_data_backend_args(p: argparse.ArgumentParser, from_run: bool = False):
    """timm's data-set flags for its readers (folder, tar, torch/, hfds/, hfids/, wds/, tfds/; README "Data"),
    passed to ``build_splits`` by name (:data:`DATA_BACKEND_KEYS`). ``from_run`` (validate.py): every default is
    None, read as the evaluated run's recorded value, so that its splits and class map are those it trained on."""
    def default(value):
        return None if from_run else value
    run_default = " (default: the run's)" if from_run else ''
    g = p.add_argument_group('data sets through timm\'s readers (hfds/, hfids/, wds/, tfds/, tars)')
    g.add_argument('--train-split', default=default('train'),
                   help="training split: a folder under --data-dir, a library split name (hfds/, hfids/), or for "
                        "wds/ a split of the shard folder's _info.json or a shard pattern 'train-{0000..0009}.tar|N'; "
                        "its classes number every split" + run_default)
    g.add_argument('--val-split', default=None,
                   help="map-style sets (folder, tar, torch/, hfds/): the split reported at the end (a folder, a "
                        "tar beside the training tar, a library split; default: the set's test / validation split), "
                        "the selection split being carved from training; streams (wds/, hfids/, tfds/): the "
                        "model-selection split, or with --select-last-epoch the reported one" + run_default)
    g.add_argument('--train-num-samples', type=int, default=None,
                   help='samples in the training stream, where the library does not know it (hfids/, wds/ patterns '
                        'without |N)' + run_default)
    g.add_argument('--val-num-samples', type=int, default=None,
                   help='the same for the --val-split stream' + run_default)
    g.add_argument('--class-map', default=default(''),
                   help="file of class names, one a line, in index order (timm's format): the classes read and "
                        "their indices, for every split" + run_default)
    g.add_argument('--select-last-epoch', action='store_true', default=default(False),
                   help='streams without a selection split: keep the last epoch\'s weights as best/ (said in the '
                        'log and results.json); --val-split is then the reported split' +
                        (" (default: the run's; without a run and without --val-split: on, evaluation selects "
                         "nothing)" if from_run else ''))


# timm's interpolation names (--interpolation, --train-interpolation; 'random' for training only)
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'lanczos', 'hamming', 'box')
# the flags of timm's per-copy pipeline that the batched augmentation has no use for (refused there if changed)
TIMM_ONLY_KEYS = ('scale', 'ratio', 'hflip', 'vflip', 'color_jitter', 'recount', 'train_interpolation', 'crop_pct',
                  'interpolation')


def add_image_transform_args(p: argparse.ArgumentParser):
    """timm's training-transform flags (its train.py's names), for --aug timm; with the eval ones beside them.
    --aa, --reprob and --remode (in 'batch and MIMO mixing') serve both augmentations."""
    g = p.add_argument_group("timm transforms (--aug timm: timm's create_transform, drawn for each of the M x b "
                             "copies of an image; README 'ImageNet-style training')")
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                   help='random-resized crop: range of the crop\'s share of the image area')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='random-resized crop: range of the crop\'s aspect ratio')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability per copy')
    g.add_argument('--vflip', type=float, default=0.0, help='vertical flip probability per copy')
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                   help='colour jitter strength (brightness, contrast, saturation); off with --aa')
    g.add_argument('--recount', type=int, default=1, help='random erasing: boxes per copy (with --reprob)')
    g.add_argument('--train-interpolation', default='random',
                   help=f"interpolation of the random-resized crop: 'random' or one of {', '.join(INTERPOLATIONS)}")
    add_eval_transform_args(p.add_argument_group(
        "evaluation transform (timm's eval pipeline: resize to img_size / crop_pct, center crop; defaults: the "
        "model's pretrained_cfg)"))


def add_eval_transform_args(g):
    """timm's evaluation-transform flags, shared by train.py and validate.py (--img-size is beside them)."""
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help='input dimensions, e.g. 3 224 224 (square; sets --img-size)')
    g.add_argument('--crop-pct', type=float, default=None,
                   help='center crop share of the resized image at evaluation (timm transforms)')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                   help='normalisation mean per channel (default: the model\'s, else the data set\'s)')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                   help='normalisation std per channel (default: the model\'s, else the data set\'s)')
    g.add_argument('--interpolation', default='',
                   help=f"resize interpolation at evaluation (timm transforms): one of {', '.join(INTERPOLATIONS)}; "
                        f"'' = the model's")


def check_transform_values(values: dict):
    """The ranges of the transform flags (``values``: flag dest -> value), and --input-size folded into
    --img-size (one side: the models take square inputs). Shared by train.py and validate.py."""
    for key, low in (('scale', 0.0), ('ratio', 0.0)):
        pair = values.get(key)
        if pair is not None and (len(pair) != 2 or not all(math.isfinite(v) and v > low for v in pair)
                                 or pair[0] > pair[1]):
            raise ValueError(f'--{key} takes two numbers > 0, low then high, got {" ".join(map(str, pair))}')
    if values.get('scale') is not None and values['scale'][1] > 1:
        raise ValueError(f'--scale is a share of the image area: at most 1, got {values["scale"][1]}')
    for key in ('hflip', 'vflip'):
        if key in values and not 0.0 <= values[key] <= 1.0:
            raise ValueError(f'--{key} must be in [0, 1], got {values[key]}')
    if 'color_jitter' in values and not (math.isfinite(values['color_jitter']) and values['color_jitter'] >= 0):
        raise ValueError(f'--color-jitter must be a finite number >= 0, got {values["color_jitter"]}')
    if 'recount' in values and values['recount'] < 1:
        raise ValueError(f'--recount must be >= 1, got {values["recount"]}')
    if values.get('train_interpolation') not in (None, 'random', *INTERPOLATIONS):
        raise ValueError(f'unknown --train-interpolation {values["train_interpolation"]!r}: random, '
                         f'{", ".join(INTERPOLATIONS)}')
    if values.get('interpolation') not in (None, '', *INTERPOLATIONS):
        raise ValueError(f'unknown --interpolation {values["interpolation"]!r}: {", ".join(INTERPOLATIONS)}')
    crop_pct = values.get('crop_pct')
    if crop_pct is not None and not (math.isfinite(crop_pct) and 0 < crop_pct <= 1):
        raise ValueError(f'--crop-pct must be in (0, 1], got {crop_pct}')
    for key in ('mean', 'std'):
        value = values.get(key)
        if value is not None and (len(value) not in (1, 3) or not all(math.isfinite(v) for v in value)
                                  or (key == 'std' and min(value) <= 0)):
            raise ValueError(f'--{key} takes 1 or 3 finite numbers{" > 0" if key == "std" else ""}, got '
                             f'{" ".join(map(str, value))}')
        if value is not None and len(value) == 1:
            values[key] = value * 3
    size = values.get('input_size')
    if size is not None:
        channels, height, width = size
        if channels != 3 or height != width or height < 1:
            raise ValueError(f'--input-size takes 3 channels and a square side (3 N N), got {" ".join(map(str, size))}')
        if values.get('img_size') not in (None, width):
            raise ValueError(f'--input-size {" ".join(map(str, size))} contradicts --img-size {values["img_size"]}')
        values['img_size'] = width


def check_transform_flags(args: argparse.Namespace):
    """Once --aug is resolved: the batched augmentations refuse the flags of timm's pipeline they would not
    honour (a value other than the default), naming the flag."""
    if args.aug == TIMM_AUG:
        return
    defaults = build_parser()
    changed = [key for key in TIMM_ONLY_KEYS if getattr(args, key) != defaults.get_default(key)]
    if changed:
        raise ValueError(f'--{changed[0].replace("_", "-")} is a flag of timm\'s per-copy transforms, which this run '
                         f'does not use (--aug {args.aug}): add --aug timm, or leave it out')


def image_transforms(args: argparse.Namespace) -> ImageTransforms:
    """timm's transform flags of a run, typed."""
    return ImageTransforms(
        scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, aa=args.aa, reprob=args.reprob, remode=args.remode, recount=args.recount,
        train_interpolation=args.train_interpolation, crop_pct=args.crop_pct, interpolation=args.interpolation or None)


def _config_value(action: argparse.Action, key: str, value, where: str):
    """``value`` of config key ``key`` checked and converted as the command line would; else a ValueError."""
    def convert(v):
        if v is None:
            return None
        if action.type is not None:
            if action.type in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float, str))):
                raise ValueError(f'{where}: {key} must be a number, got {v!r}')
            if action.type is int and isinstance(v, float):
                raise ValueError(f'{where}: {key} must be an integer, got {v!r}')
            try:
                v = action.type(v)
            except (TypeError, ValueError):
                raise ValueError(f'{where}: {key} must be {action.type.__name__}, got {v!r}') from None
        elif not isinstance(v, str):
            raise ValueError(f'{where}: {key} must be a string, got {v!r}')
        if action.choices is not None and v not in action.choices:
            raise ValueError(f'{where}: {key} must be one of {", ".join(map(str, action.choices))}, got {v!r}')
        return v

    if isinstance(action, _BOOL_ACTIONS):
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            value = _BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise ValueError(f'{where}: {key} must be true or false, got {value!r}')
        return value
    if action.nargs in ('*', '+') or isinstance(action.nargs, int):
        values = [convert(v) for v in (value if isinstance(value, list) else [value])]
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise ValueError(f'{where}: {key} takes {action.nargs} values, got {value!r}')
        return values
    if isinstance(value, (list, dict)):
        raise ValueError(f'{where}: {key} takes one value, got {value!r}')
    return convert(value)


def read_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    """A YAML mapping of flag names to values, every value checked; one-line errors for anything else."""
    if not path.is_file():
        raise FileNotFoundError(f'config file not found: {path}')
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not valid YAML: {" ".join(str(e).split())[:200]}') from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f'{path} must be a mapping of flag names to values, not a {type(config).__name__}')
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    config = {k: v for k, v in config.items() if k not in RECORD_KEYS}
    unknown = sorted(str(k) for k in config if k not in actions)
    if unknown:
        raise ValueError(f'unknown config key(s) in {path}: {", ".join(unknown)}')
    return {k: _config_value(actions[k], k, v, str(path)) for k, v in config.items()}


# the first line of a config that runs a row of a paper: "# MixMo paper row: ..." (configs/README.md)
_PAPER_ROW = re.compile(r'# \w+ paper (row|baseline):')


def recipes_for(model: str, configs_dir: Path) -> Tuple[List[Path], List[Path]]:
    """(configs that run a paper's row, the other configs) in ``configs_dir`` that train ``model``'s
    architecture (its tag aside), each list sorted. A file is a paper row when its first line says so."""
    arch = model.partition('.')[0]
    rows, others = [], []
    for path in sorted(configs_dir.rglob('*.yaml')):
        try:
            text = path.read_text()
            config = yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # not ours to judge here: -c reports a broken config when it is used
        if isinstance(config, dict) and str(config.get('model', '')).partition('.')[0] == arch:
            (rows if _PAPER_ROW.match(text) else others).append(path)
    return rows, others


def check_values(args: argparse.Namespace):
    """Ranges the types alone do not catch, refused before anything is built."""
    for key in ('epochs', 'batch_size', 'batch_repeat', 'grad_accum_steps', 'checkpoint_hist', 'log_interval'):
        if getattr(args, key) < 1:
            raise ValueError(f'--{key.replace("_", "-")} must be >= 1, got {getattr(args, key)}')
    refuse_below_one(vars(args), ('num_members', 'limit_train_batches', 'num_classes', 'val_per_class', 'img_size'))
    for key in ('lr', 'weight_decay', 'momentum', 'warmup_lr', 'min_lr', 'warmup_epochs', 'mix_alpha', 'msda_alpha',
                'weight_root', 'model_ema_decay', 'decay_rate'):
        value = getattr(args, key)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f'--{key.replace("_", "-")} must be a finite number >= 0, got {value}')
    for key in ('mix_prob', 'msda_prob', 'smoothing', 'reprob'):
        if not 0.0 <= getattr(args, key) <= 1.0:
            raise ValueError(f'--{key.replace("_", "-")} must be in [0, 1], got {getattr(args, key)}')
    if args.clip_grad is not None and not (math.isfinite(args.clip_grad) and args.clip_grad > 0):
        raise ValueError(f'--clip-grad must be a finite number > 0, got {args.clip_grad}')
    if args.eval_metric not in EVAL_METRICS:
        raise ValueError(f'unknown --eval-metric {args.eval_metric!r}: one of {", ".join(EVAL_METRICS)}')
    if not (math.isfinite(args.log_interval_s) and args.log_interval_s > 0):
        raise ValueError(f'--log-interval-s must be a finite number > 0, got {args.log_interval_s}')
    if args.mix_vis_interval < 0:
        raise ValueError(f'--mix-vis-interval must be >= 0, got {args.mix_vis_interval}')
    values = vars(args)
    check_transform_values(values)  # folds --input-size into --img-size


def recipe_changes(saved: dict, arguments: dict) -> list:
    """The recipe arguments of ``arguments`` (args.yaml's form) that differ from a run's saved ones:
    ``['--lr 0.1 (was 0.05)', ...]``."""
    changes = []
    for key, value in arguments.items():
        if key in LOCAL_KEYS or key not in saved:
            continue
        old = saved[key]
        if isinstance(old, list) and isinstance(value, tuple):
            value = list(value)
        if old != value:
            changes.append(f'--{key.replace("_", "-")} {value} (was {old})')
    return changes


def run_settings(args: argparse.Namespace) -> RunSettings:
    """The typed settings of a run, from its parsed (and checked) arguments: what the library reads."""
    from ..cli import parse_model_kwargs
    mixing = MixingSettings(
        batch_repeat=args.batch_repeat, mix_mode=args.mix_mode, mix_prob=args.mix_prob, mix_alpha=args.mix_alpha,
        weight_root=args.weight_root, msda=None if args.msda == 'none' else args.msda, msda_prob=args.msda_prob,
        msda_alpha=args.msda_alpha, label_smoothing=args.smoothing)
    optim = OptimSettings(
        opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, decay_all=args.wd_all, momentum=args.momentum,
        fused=args.fused_opt, clip_grad=args.clip_grad, sched=args.sched, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, decay_milestones=tuple(args.decay_milestones),
        decay_rate=args.decay_rate, layer_decay=args.layer_decay,
        betas=tuple(args.opt_betas) if args.opt_betas is not None else None, eps=args.opt_eps,
        opt_kwargs=parse_model_kwargs(args.opt_kwargs, '--opt-kwargs'))
    automix = AutoMixSettings(
        stage=args.automix_stage, alpha=args.automix_alpha, mask_loss_weight=args.automix_mask_loss,
        margin=args.automix_margin, lam_margin=args.automix_lam_margin, lam_concat=args.automix_lam_concat,
        momentum=args.automix_momentum, momentum_end=args.automix_momentum_end,
        momentum_start=args.automix_momentum_start,
        mixblock_lr=args.mixblock_lr if args.mixblock_lr is not None else args.lr)
    return RunSettings(
        model=args.model, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum_steps, eval_metric=args.eval_metric, checkpoint_hist=args.checkpoint_hist,
        log_interval=args.log_interval, log_interval_s=args.log_interval_s, mix_vis_interval=args.mix_vis_interval,
        trackers=tuple(filter(None, args.log_with.split(','))), sync_bn=args.sync_bn, channels_last=args.channels_last, torchcompile=args.torchcompile,
        torchcompile_mode=args.torchcompile_mode, ema_decay=args.model_ema_decay if args.model_ema else None,
        mixing=mixing, augment=AugmentSettings(crop=args.aug, erase_prob=args.reprob, erase_mode=args.remode),
        optim=optim, automix=automix)


def debug_requested(argv) -> bool:
    """Whether ``argv`` asks for tracebacks: ``--debug`` on the command line or ``debug: true`` in its ``-c``
    config. For the error trap, which runs when parsing itself may have failed: a config that cannot be read
    asks for nothing."""
    parser = build_parser()
    try:
        pre, _ = parser.parse_known_args(argv)
        return bool(pre.debug or (pre.config and read_config(Path(pre.config), parser).get('debug')))
    except (ValueError, OSError, SystemExit):
        return '--debug' in argv


def parse_args(argv=None, description: str = '') -> argparse.Namespace:
    parser = build_parser(description)
    pre, _ = parser.parse_known_args(argv)
    saved = {}
    if pre.resume:
        from ..rundir import read_args, resolve_resume
        run_dir, _ = resolve_resume(Path(pre.resume))
        saved = read_args(run_dir)
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in saved.items()
                               if k in known and (k not in LOCAL_KEYS or k in RECORDED_LOCAL_KEYS)})
    if pre.config:
        parser.set_defaults(**read_config(Path(pre.config), parser))
    args = parser.parse_args(argv)
    if args.torchcompile in ('none', 'off'):
        args.torchcompile = None
    if args.mixup > 0:
        args.msda, args.msda_alpha = 'mixup', args.mixup
    if args.cutmix > 0:
        args.msda, args.msda_alpha = 'cutmix', args.cutmix
    check_values(args)
    check_timm_optimizer_args(args)
    resolve_trackers(args)
    return args

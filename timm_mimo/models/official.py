"""The checkpoints released with the official MixMo code, and how their weights map onto our models.

Official code: https://github.com/alexrame/mixmo-pytorch (Apache-2.0), paper arXiv:2103.06132 (ICCV 2021).
Its README links one trained checkpoint per row of its result tables (Google Drive); :data:`OFFICIAL_ROWS`
lists those rows with the top-1 accuracy the README reports for them, and gives each a pretrained tag of
ours, ``official_<method>_<dataset>``. ``hub/convert_official.py`` turns such a checkpoint into a folder
in timm's Hub format.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

OFFICIAL_REPO = 'https://github.com/alexrame/mixmo-pytorch'
OFFICIAL_LICENSE = 'apache-2.0'
PAPER = 'MixMo: Mixing Multiple Inputs for Multiple Outputs via Deep Subnetworks (Ramé, Sun, Cord, ICCV 2021)'
PAPER_URL = 'https://arxiv.org/abs/2103.06132'
DATASETS = {'cifar10': (10, 'CIFAR-10'), 'cifar100': (100, 'CIFAR-100'), 'tiny_imagenet': (200, 'Tiny ImageNet')}


@dataclass(frozen=True)
class OfficialRow:
    """One row of the official README's result tables: the checkpoint it links, as our ``arch.tag``."""
    arch: str
    tag: str
    dataset: str  # a key of DATASETS
    method: str  # as the README names it
    top1: Tuple[float, ...]  # the README's top-1 (%), one value per released seed
    drive_ids: Tuple[str, ...]  # the Google Drive file of each seed, as the README links it
    config: str  # the official config file that trained it (as the README names it)

    @property
    def name(self) -> str:
        return f'{self.arch}.{self.tag}'

    @property
    def best(self) -> int:
        """The seed to publish under the tag: the one with the highest reported top-1."""
        return max(range(len(self.top1)), key=lambda i: self.top1[i])

    def url(self, seed: Optional[int] = None) -> str:
        return f'https://drive.google.com/file/d/{self.drive_ids[self.best if seed is None else seed]}/view'


# (README method, our tag prefix, official config suffix) of the eight CIFAR rows, M = 1 rows first
_CIFAR_METHODS = (
    ('Vanilla', '', '_1net_standard_bar1'), ('Vanilla + Mixup', 'mixup_', '_1net_msdamixup_bar1'),
    ('Vanilla + CutMix', 'cutmix_', '_1net_msdacutmix_bar1'), ('MIMO', 'mimo_', '-2_mimo_standard_bar4'),
    ('Linear-MixMo', 'linear_mixmo_', '-2_linearmixmo_standard_bar4'),
    ('Cut-MixMo', 'cut_mixmo_', '-2_cutmixmo-p5_standard_bar4'),
    ('Linear-MixMo + CutMix', 'linear_mixmo_cutmix_', '-2_linearmixmo_msdacutmix_bar4'),
    ('Cut-MixMo + CutMix', 'cut_mixmo_cutmix_', '-2_cutmixmo-p5_msdacutmix_bar4'),
)
_TINY_METHODS = (('Vanilla', '', '_1net_standard_bar1'), ('Linear-MixMo', 'linear_mixmo_', '-2_linearmixmo_standard_bar4'),
                 ('Cut-MixMo', 'cut_mixmo_', '-2_cutmixmo-p5_standard_bar4'))


def _table(arch: str, dataset: str, config: str, methods, results) -> List[OfficialRow]:
    """The rows of one README table: ``results`` holds (top-1 per seed, Drive file per seed) per method."""
    return [OfficialRow(arch if suffix.startswith('_1net') else f'{arch}_mixmo2', f'official_{prefix}{dataset}',
                        dataset, method, top1, ids, f'{config}{suffix}.yaml')
            for (method, prefix, suffix), (top1, ids) in zip(methods, results)]


# the official README's tables ("Results and available checkpoints"), docs/methods/mixmo.md §6.4. Its link for the
# Tiny ImageNet w = 3 Cut-MixMo row is the file of the w = 2 Linear-MixMo row (a w = 2 network: converting
# it as preactresnet18_w3_mixmo2 fails on every shape), so that row has no usable checkpoint.
OFFICIAL_ROWS: Tuple[OfficialRow, ...] = tuple(
    _table('wrn28_10', 'cifar100', 'config/cifar100/exp_cifar100_wrn2810', _CIFAR_METHODS, (
        ((81.79,), ('12pATFGjsDN1Tq4p-S0-rO59sX-F_O2ol',)),
        ((83.43,), ('1tqsHgqDwx3p562NtYHb5Im-tRB6CnJ8M',)),
        ((83.95,), ('11ZiDgZoaEVEhhyJMlDA61P9QB7HZuXFL',)),
        ((82.92,), ('1SBAjGJVfC_QHCoXy5y_Ci49J-E18ait3',)),
        ((82.96,), ('1eAA6O6_v-L3aFzQtsHY2pEAGxUpXu15c',)),
        ((85.52, 85.59), ('1Buql47NcSe-qm8LqPYEa02g319T1yakK', '1vxJFKuO5RSH9XcA2aSYUMHCrtD6pDyMA')),
        ((85.36, 85.57), ('1Ma_Rjf1Z8j0CK5jLenk8UFLwZgbrDaqP', '1ouGQjho-cmJUkrDpDehvs1zwK7BUJWoN')),
        ((85.77, 85.92), ('1Y9BDgqWFdYK5hqPQl-AgApCTIewTGbFo', '1fwCfO2wO6VXziUp9HHE32MpCWak9AlOc')),
    ))
    + _table('wrn28_10', 'cifar10', 'config/cifar10/exp_cifar10_wrn2810', _CIFAR_METHODS, (
        ((96.37,), ('1o6aGKfHAN8PQrsXAoyAJHak-lqAOfwm8',)),
        ((97.07,), ('1yI5cLHPfUDI00Eiy3dNRm2bgiv2orwxE',)),
        ((97.28,), ('1hXjTCTYYy99StxAP0Y3hNqjQ9ezhqsXh',)),
        ((96.71,), ('1NRAlxIILIUIUNWhXFHgHrSyx5T4oCmdZ',)),
        ((96.88,), ('1BUoaNLDMuhqXl3UKC2QoVT23Z1544i_v',)),
        ((97.52,), ('1eA_H9ePj_OgjTqDV0v2F5biI4mt_J98c',)),
        ((97.73,), ('1cLP7EVYJ_YY7w2rOaaRWMxjZkOBWZ4Ti',)),
        ((97.83,), ('1dGB0Rz64Wr5nv4vQqLi19Kt3vzKH0blC',)),
    ))
    + _table('preactresnet18', 'tiny_imagenet', 'config/tiny/exp_tinyimagenet_res18', _TINY_METHODS, (
        ((62.75,), ('14N-ixnF31zjbGh6IzS3-pHj1KOJ_e5uF',)),
        ((62.91,), ('1MDYuE21zFphdnp83h-LOIBnXu4b5qhD-',)),
        ((64.32,), ('19jB-yk2s1LeuQDXzjNQmo_eil8btsxa4',)),
    ))
    + _table('preactresnet18_w2', 'tiny_imagenet', 'config/tiny/exp_tinyimagenet_res182', _TINY_METHODS, (
        ((64.91,), ('1SdBW7wie9HT5OqW15r6A6ixhY87aC7Ct',)),
        ((67.03,), ('1Q-U5u9ZN3h-cLBOEvbu_hOp0M7vMYjgc',)),
        ((69.12,), ('16LME8LGCwmwUWmrzGiCzdTaFOURwolQR',)),
    ))
    + _table('preactresnet18_w3', 'tiny_imagenet', 'config/tiny/exp_tinyimagenet_res183', _TINY_METHODS, (
        ((65.84,), ('1lvX6fIKIxbVDa9VC-8GTpHbJG2avHB9F',)),
        ((68.36,), ('1W0QoVQYw4ftCBemralG6KtZSgICxO7ih',)),
        ((70.23,), ('1Q-U5u9ZN3h-cLBOEvbu_hOp0M7vMYjgc',)),
    ))
)


# where `hub/convert_official.py --rows` expects each data set: train.py's dataset names and data folders
_DATA = {'cifar10': ('torch/cifar10', 'data/cifar10'), 'cifar100': ('torch/cifar100', 'data/cifar100'),
         'tiny_imagenet': ('tiny-imagenet', 'data/tiny-imagenet-200')}


def publish_commands(row: OfficialRow) -> str:
    """The shell lines that download, convert and verify, and publish the checkpoint of ``row``."""
    from ..constants import hub_id
    dataset, data_dir = _DATA[row.dataset]
    name, folder = row.name, f'exports/{row.name}'
    return '\n'.join([
        f'# {row.method}, {DATASETS[row.dataset][1]}: README top-1 {" / ".join(map(str, row.top1))} %',
        f'gdown {row.drive_ids[row.best]} -O official/{name}.ckpt',
        f'python hub/convert_official.py official/{name}.ckpt {folder} --model {row.arch} '
        f'--num-classes {DATASETS[row.dataset][0]} --tag {row.tag} --dataset {dataset} --data-dir {data_dir} '
        f'{"--dataset-download " if dataset.startswith("torch/") else ""}--verify',
        f'hf upload {hub_id(row.arch, row.tag)} {folder} . --repo-type model '
        f'--commit-message "Official MixMo checkpoint, converted"',
        f'# then add \'{name}\' to timm_mimo/models/published.py',
    ])


def official_row(arch: str, tag: Optional[str]) -> Optional[OfficialRow]:
    return next((row for row in OFFICIAL_ROWS if row.arch == arch and row.tag == tag), None)

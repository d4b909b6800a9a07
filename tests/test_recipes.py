"""The recipes for the large settings (issue 24, item 7) parse and train: each file of configs/imagenet/ and
configs/tiny_imagenet/w1_cut_mixmo_hfds.yaml runs two optimizer steps on generated 224 px data.

The model is the one the file names, at the file's image size, with its optimizer, schedule, mixing and
augmentation; only what a CPU test cannot afford is overridden on the command line: the data (a generated
image folder or Hugging Face parquet set of 3 classes in place of ImageNet-1k / zh-plus/tiny-imagenet), the
number of classes and held-out images per class, the global batch (2 to 8 instead of 100 to 1024), one epoch of
two steps, no data workers and no bf16 autocast (slow on CPUs). tests/test_configs.py checks the files' values.
"""
import io
import json
import sys

import pytest
from PIL import Image

from test_configs import IMAGENET_FILES, TINY_HFDS, load
from test_train import REPO

from timm_mimo import rundir

sys.path.insert(0, str(REPO))
import train  # noqa: E402

CLASSES = ('n01440764', 'n01443537', 'n01484850')
SIDE = 224


def _png(index: int) -> bytes:
    """A 224 px image: two colour halves that depend on its index (so crops and flips change it)."""
    image = Image.new('RGB', (SIDE, SIDE), (index * 37 % 256, 90, 200))
    image.paste((20, index * 53 % 256, 60), (0, 0, SIDE // 2, SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


@pytest.fixture(scope='module')
def imagenet_folder(tmp_path_factory):
    """ImageNet's layout: train/<wnid>/ and val/<wnid>/ (3 training and 1 validation image per class)."""
    root = tmp_path_factory.mktemp('imagenet')
    for split, per_class in (('train', 3), ('val', 1)):
        for k, wnid in enumerate(CLASSES):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                (root / split / wnid / f'{i}.png').write_bytes(_png(10 * k + i + (100 if split == 'val' else 0)))
    return root


@pytest.fixture(scope='module')
def tiny_imagenet_hub_set(tmp_path_factory):
    """zh-plus/tiny-imagenet's layout on the Hub: data/train-*.parquet and data/valid-*.parquet, the split
    names declared in the README's configs (without them the datasets library would call 'valid' 'validation')."""
    datasets = pytest.importorskip('datasets')
    root = tmp_path_factory.mktemp('tiny-imagenet')
    (root / 'data').mkdir()
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=list(CLASSES)))
    for split, per_class in (('train', 3), ('valid', 1)):
        rows = [(_png(10 * k + i), k) for k in range(len(CLASSES)) for i in range(per_class)]
        table = dict(image=[{'bytes': png, 'path': None} for png, _ in rows], label=[k for _, k in rows])
        datasets.Dataset.from_dict(table, features=features).to_parquet(
            str(root / 'data' / f'{split}-00000-of-00001.parquet'))
    (root / 'README.md').write_text('---\nconfigs:\n- config_name: default\n  data_files:\n'
                                    '  - split: train\n    path: data/train-*\n'
                                    '  - split: valid\n    path: data/valid-*\n---\n')
    return root


def _two_steps(path, tmp_path, batch_size: int, *data):
    assert train.cli(['-c', str(path), *map(str, data), '--num-classes', '3',
                      '--val-per-class', '1', '-b', str(batch_size), '--epochs', '1', '--limit-train-batches', '2',
                      '--workers', '0', '--no-amp', '--output', str(tmp_path), '--experiment', 'run']) == 0
    folder = tmp_path / 'run'
    state = json.loads((folder / 'checkpoint-0001' / rundir.STATE_FILE).read_text())
    assert state['num_updates'] == 2
    config = json.loads((folder / rundir.BEST_DIR / 'config.json').read_text())
    assert config['architecture'] == load(path)['model']
    return json.loads((folder / rundir.RESULTS_FILE).read_text()), config


# automix_r18_300ep.yaml is automix_r18_100ep.yaml but for its epochs (tests/test_configs.py), overridden here
@pytest.mark.parametrize('path', IMAGENET_FILES[:2], ids=lambda path: path.stem)
def test_an_imagenet_recipe_runs_two_steps_at_224_px(path, imagenet_folder, tmp_path, one_thread):
    results, config = _two_steps(path, tmp_path, 2, '--data-dir', imagenet_folder)
    assert config['pretrained_cfg']['input_size'] == [3, SIDE, SIDE]
    assert results['test_split'].endswith('val')


def test_the_tiny_imagenet_hub_recipe_runs_two_steps(tiny_imagenet_hub_set, tmp_path, one_thread):
    (results, config), = [_two_steps(TINY_HFDS, tmp_path, 8, '--dataset', f'hfds/{tiny_imagenet_hub_set}', '--data-dir',
                         tmp_path / 'cache')]
    assert results['num_members'] == 2 and config['pretrained_cfg']['input_size'] == [3, 64, 64]
    assert results['test_split'] == f'hfds/{tiny_imagenet_hub_set} valid split'

"""Data sets and command-line values tried as a careless or hostile user would (issue 22): no test score from the
training images, one class numbering for every split, nothing in an image folder that can stall training,
and one `error:` line (exit 2) for every bad value. docs/reliability.md lists each case."""
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from test_reliability import _image_folder, one_line_error
from test_train import REPO, run

from timm_mimo.cli import run_cli
from timm_mimo.data.splits import build_splits

sys.path.insert(0, str(REPO))
import train  # noqa: E402
import validate  # noqa: E402

# a command that would leave a trace if anything read from the command line ran it
EVIL_YAML = 'x=!!python/object/apply:os.system ["touch {marker}"]'


# ------------------------------------------------------------------------------------------------------
# a test split only where the data set has a folder meant for it

def _targets(dataset):
    return [target for _, target in dataset.reader.samples]


def test_a_train_folder_alone_has_no_test_split_and_the_root_never_is_one(tmp_path):
    _image_folder(tmp_path / 'only' / 'train', classes=('a', 'b', 'c'), per_class=4)
    splits = build_splits('', str(tmp_path / 'only'), img_size=8, val_per_class=1)
    assert (len(splits.train), len(splits.validation)) == (9, 3)
    assert splits.test is None and splits.test_source is None and splits.description.endswith('no test split')

    _image_folder(tmp_path / 'linked' / 'train', per_class=3)
    (tmp_path / 'linked' / 'test').symlink_to(tmp_path / 'linked' / 'train')  # the training images again
    assert build_splits('', str(tmp_path / 'linked'), img_size=8, val_per_class=1).test is None

    for name in ('test', 'val', 'validation'):
        root = tmp_path / name
        _image_folder(root / 'train', per_class=3)
        _image_folder(root / name, per_class=2)
        splits = build_splits('', str(root), img_size=8, val_per_class=1)
        assert len(splits.test) == 4 and splits.test_source == str((root / name).resolve()), name


# ------------------------------------------------------------------------------------------------------
# one class numbering: the training split's

def test_every_split_is_numbered_with_the_training_classes_and_a_missing_class_is_said(tmp_path, caplog):
    _image_folder(tmp_path / 'train', classes=('a', 'b', 'c'), per_class=3)
    _image_folder(tmp_path / 'validation', classes=('a', 'c'), per_class=2)
    with caplog.at_level(logging.WARNING):
        splits = build_splits('', str(tmp_path), img_size=8, val_per_class=1)
    assert splits.num_classes == 3
    assert _targets(splits.test) == [0, 0, 2, 2]  # 'c' is class 2, as in training (alone it would be 1)
    assert any('no images of 1 of the 3 classes: b' in r.getMessage() for r in caplog.records), caplog.text


def test_a_split_with_a_class_the_training_split_lacks_is_one_line(tmp_path, capsys):
    _image_folder(tmp_path / 'data' / 'train', classes=('a', 'b'), per_class=3)
    _image_folder(tmp_path / 'data' / 'test', classes=('a', 'zebra'), per_class=2)
    out = tmp_path / 'out'
    code = train.cli(['--data-dir', str(tmp_path / 'data'), '--img-size', '8', '--val-per-class', '1', '-b', '4',
                      '--epochs', '1', '--output', str(out), '--experiment', 'x'])
    one_line_error(code, capsys.readouterr().err, 'class(es) the training split lacks: zebra')
    assert not (out / 'x').exists()


# ------------------------------------------------------------------------------------------------------
# nothing listed from an image folder can stall training

def test_named_pipes_and_broken_links_in_an_image_folder_are_skipped_with_a_warning(tmp_path, caplog):
    _image_folder(tmp_path / 'train', per_class=3)
    _image_folder(tmp_path / 'test', per_class=2)
    os.mkfifo(tmp_path / 'train' / 'a' / 'pipe.png')  # opening it would wait for a writer, for ever
    os.mkfifo(tmp_path / 'test' / 'b' / 'pipe.jpg')
    (tmp_path / 'train' / 'b' / 'gone.png').symlink_to(tmp_path / 'nowhere.png')
    (tmp_path / 'train' / 'b' / 'link.png').symlink_to(tmp_path / 'train' / 'b' / '0.png')  # a real image: kept
    with caplog.at_level(logging.WARNING):
        splits = build_splits('', str(tmp_path), img_size=8, val_per_class=1)
    assert (len(splits.train) + len(splits.validation), len(splits.test)) == (7, 4)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Skipped sample')]
    assert len(skipped) == 3 and all('not a regular file' in m for m in skipped), skipped
    listed = {Path(path).name for path, _ in splits.train.dataset.reader.samples}
    assert 'link.png' in listed and not {'pipe.png', 'gone.png'} & listed


def test_training_on_a_train_folder_with_a_named_pipe_ends_and_reports_no_test_split(tmp_path):
    """The run as a user starts it: it finishes (the pipe is skipped), and its results say there is no test split
    (before, the pipe blocked the run for good and the data root was scored as the "test" split)."""
    _image_folder(tmp_path / 'data' / 'train', per_class=5)
    os.mkfifo(tmp_path / 'data' / 'train' / 'a' / 'pipe.png')
    proc = run('train.py', '--data-dir', tmp_path / 'data', '--img-size', 8, '--val-per-class', 1, '-b', 4,
               '--epochs', 1, '--output', tmp_path / 'out', '--experiment', 'x', timeout=150)
    assert 'Skipped sample' in proc.stderr and 'pipe.png' in proc.stderr
    results = json.loads((tmp_path / 'out' / 'x' / 'results.json').read_text())
    assert results['test_split'] is None and 'no test split' in results['dataset']
    assert 'test' not in results['best'] and 'validation' in results['best']
    assert 'validation (this data set has no test split)' in proc.stdout


# ------------------------------------------------------------------------------------------------------
# bad values: one line, exit 2, nothing run, no folder left

def _crafted_checkpoints(folder: Path) -> dict:
    import pickle

    class RunsCode:
        def __reduce__(self):
            return os.system, (f'touch {folder / "ran"}',)

    folder.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'extra': RunsCode()}, folder / 'crafted.pth',
               pickle_protocol=2)
    torch.save({'conv.weight': torch.zeros(64)}, folder / 'whole.pth')
    whole = (folder / 'whole.pth').read_bytes()
    (folder / 'truncated.pth').write_bytes(whole[:len(whole) // 2])
    (folder / 'empty.pth').write_bytes(b'')
    return {name: folder / f'{name}.pth' for name in ('crafted', 'truncated', 'empty')}


@pytest.mark.parametrize('make_args,needle', [
    (lambda p: ['--val-per-class', '-1'], '--val-per-class must be >= 1, got -1'),
    (lambda p: ['--img-size', '0'], '--img-size must be >= 1'),
    (lambda p: ['--img-size', '5000'], '--img-size must be in [1, 4096], got 5000'),
    (lambda p: ['--img-size', '4000'], 'the embedded digits (8 x 8 images, upscaled in memory) take --img-size up to'),
    (lambda p: ['--model-kwargs', EVIL_YAML.format(marker=p / 'ran')], '--model-kwargs x: not a plain YAML value'),
    (lambda p: ['--pretrained-path', str(_crafted_checkpoints(p)['crafted'])], 'not a plain tensor checkpoint'),
    (lambda p: ['--pretrained-path', str(_crafted_checkpoints(p)['truncated'])], 'cannot read checkpoint'),
    (lambda p: ['--pretrained-path', str(_crafted_checkpoints(p)['empty'])], 'truncated or not a weights file'),
], ids=['val-per-class', 'img-size-0', 'img-size-5000', 'digits-img-size', 'yaml-tag', 'crafted-pth',
        'truncated-pth', 'empty-pth'])
def test_bad_train_values_are_one_line_and_run_nothing(make_args, needle, tmp_path, capsys, one_thread):
    out = tmp_path / 'out'
    code = train.cli([*make_args(tmp_path), '--epochs', '1', '--output', str(out), '--experiment', 'x'])
    one_line_error(code, capsys.readouterr().err, needle)
    assert not (out / 'x').exists() and not (tmp_path / 'ran').exists()


@pytest.mark.parametrize('make_args,needle', [
    (lambda p: ['--val-per-class', '-1'], '--val-per-class must be >= 1, got -1'),
    (lambda p: ['--ood-val-per-class', '-2'], '--ood-val-per-class must be >= 1, got -2'),
    (lambda p: ['--img-size', '-4'], '--img-size must be >= 1, got -4'),
    (lambda p: ['--img-size', '5000'], '--img-size must be in [1, 4096], got 5000'),
    (lambda p: ['--device', 'nonsense'], '--device nonsense is not usable here'),
    pytest.param(lambda p: ['--device', 'cuda'], '--device cuda is not usable here',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')),
    (lambda p: ['--model-kwargs', EVIL_YAML.format(marker=p / 'ran')], '--model-kwargs x: not a plain YAML value'),
], ids=['val-per-class', 'ood-val-per-class', 'img-size-negative', 'img-size-5000', 'device-nonsense',
        'device-cuda-absent', 'yaml-tag'])
def test_bad_validate_values_are_one_line_and_run_nothing(make_args, needle, tmp_path, capsys, one_thread):
    results = tmp_path / 'r.json'
    code = run_cli(validate.main, ['--model', 'wrn16_2_mixmo2', *make_args(tmp_path), '--results-file', str(results)])
    one_line_error(code, capsys.readouterr().err, needle)
    assert not results.exists() and not (tmp_path / 'ran').exists()

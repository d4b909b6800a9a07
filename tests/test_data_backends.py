"""Every timm data set backend through timm's own readers (issue 24, item 1): a tar of images, hfds/ (map-style,
local parquet files), wds/ shards and hfids/ streams (iterable). Model selection never uses the reported split:
map-style sets carve it from training, streams take --val-split or --select-last-epoch. The data sets are
generated here, offline; each image's colour encodes its index, so what a loader yields can be counted."""
import importlib.util
import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_reliability import one_line_error
from test_train import REPO

from timm_mimo.data.loaders import StreamTrainLoader
from timm_mimo.data.splits import LAST_EPOCH, build_splits, tensor_transform
from timm_mimo.data.streams import check_stream_coverage, create_stream

sys.path.insert(0, str(REPO))
import train  # noqa: E402
import validate  # noqa: E402

CLASSES = ('cat', 'dog', 'emu')
TINY_RUN = ['--img-size', '8', '-b', '4', '--epochs', '1', '--limit-train-batches', '2', '--val-per-class', '1']


def _png(index: int) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', (8, 8), (index % 256, index // 256, 0)).save(buf, format='PNG')
    return buf.getvalue()


def _index_of(images: torch.Tensor) -> list:
    """The indices encoded by _png, read back from images normalised with mean 0 and std 1."""
    pixels = (images[:, :2, 0, 0] * 255).round().long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def _tar(path: Path, classes, per_class: int, start: int = 0) -> Path:
    """A tar of PNGs in ``<class>/<index>.png`` folders (timm's tar reader labels by folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, 'w') as tar:
        for k, name in enumerate(classes):
            for i in range(per_class):
                data = _png(start + k * per_class + i)
                info = tarfile.TarInfo(f'{name}/{i:03d}.png')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _parquet_set(folder: Path, sizes=(('train', 12), ('validation', 6), ('test', 6))) -> Path:
    """A Hugging Face image set as local parquet files, one per split (what `datasets` and the Hub read)."""
    datasets = pytest.importorskip('datasets')
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=list(CLASSES)))
    start = 0
    for split, n in sizes:
        rows = dict(image=[{'bytes': _png(start + i), 'path': None} for i in range(n)], label=[i % 3 for i in range(n)])
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f'{split}-00000-of-00001.parquet'))
        start += n
    return folder


def _wds_shards(folder: Path, prefix: str, shards: int, per_shard: int, start: int = 0) -> Path:
    wds = pytest.importorskip('webdataset')
    folder.mkdir(parents=True, exist_ok=True)
    index = start
    for s in range(shards):
        with wds.TarWriter(str(folder / f'{prefix}-{s:04d}.tar')) as writer:
            for _ in range(per_shard):
                writer.write({'__key__': f'{index:06d}', 'png': _png(index), 'cls': str(index % 3).encode()})
                index += 1
    return folder


def _run(tmp_path, *args):
    return train.cli([*TINY_RUN, '--output', str(tmp_path / 'out'), '--experiment', 'x', *map(str, args)])


def _results(tmp_path) -> dict:
    return json.loads((tmp_path / 'out' / 'x' / 'results.json').read_text())


def _validate(tmp_path, *args) -> dict:
    """validate.py on the run of _run (its best/ weights) in this process: the results it writes."""
    out = tmp_path / f'eval-{len(list(tmp_path.glob("eval-*.json")))}.json'
    from timm_mimo.cli import run_cli
    assert run_cli(validate.main, [str(tmp_path / 'out' / 'x'), '--device', 'cpu', '-j', '0', '--results-file',
                                   str(out), *map(str, args)]) == 0
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------------
# map-style: a tar, hfds/

def test_a_tar_of_images_is_carved_per_class_and_its_test_tar_numbered_with_the_training_classes(tmp_path):
    _tar(tmp_path / 'train.tar', CLASSES, per_class=4)
    _tar(tmp_path / 'val.tar', ('cat', 'emu'), per_class=2, start=100)  # no dog: emu must stay class 2
    splits = build_splits('', str(tmp_path / 'train.tar'), img_size=8, val_per_class=1)
    assert splits.num_classes == 3  # before: "Cannot determine the number of classes"
    assert Counter(splits.validation[i][1] for i in range(len(splits.validation))) == {0: 1, 1: 1, 2: 1}
    assert len(splits.train) == 9 and splits.test_source == str(tmp_path / 'val.tar')
    assert sorted(splits.test[i][1] for i in range(len(splits.test))) == [0, 0, 2, 2]


def test_a_tar_trains_and_reports_the_tar_named_by_val_split(tmp_path, one_thread):
    _tar(tmp_path / 'data' / 'imgs.tar', CLASSES, per_class=4)
    _tar(tmp_path / 'data' / 'holdout.tar', CLASSES, per_class=1, start=100)
    assert _run(tmp_path, '--data-dir', tmp_path / 'data' / 'imgs.tar', '--val-split', 'holdout') == 0
    results = _results(tmp_path)
    assert results['test_split'].endswith('holdout.tar') and '3 test' in results['dataset']
    assert results['selection'] == 'validation split carved from train'


def test_hfds_local_parquet_is_carved_and_reports_the_named_split(tmp_path, one_thread):
    pytest.importorskip('datasets')
    data = _parquet_set(tmp_path / 'pq')
    splits = build_splits(f'hfds/{data}', str(tmp_path / 'cache'), img_size=8, val_per_class=1)
    assert splits.num_classes == 3 and len(splits.train) == 9 and len(splits.validation) == 3
    assert splits.test_source == f'hfds/{data} validation split' and len(splits.test) == 6
    assert _run(tmp_path, '--dataset', f'hfds/{data}', '--data-dir', tmp_path / 'cache', '--val-split', 'test') == 0
    results = _results(tmp_path)
    assert results['test_split'] == f'hfds/{data} test split' and '6 test' in results['dataset']


def test_validate_reads_a_tar_run_with_its_recorded_splits_and_training_class_numbers(tmp_path, one_thread):
    _tar(tmp_path / 'data' / 'imgs.tar', CLASSES, per_class=4)
    _tar(tmp_path / 'data' / 'holdout.tar', ('cat', 'emu'), per_class=2, start=100)  # no dog: emu stays class 2
    assert _run(tmp_path, '--data-dir', tmp_path / 'data' / 'imgs.tar', '--val-split', 'holdout') == 0
    results = _validate(tmp_path)  # the run's --data-dir and --val-split, as it recorded them
    assert results['split'] == 'test' and results['num_samples'] == 4 and 'holdout.tar' in results['dataset']
    assert results['test']['top1'] == _results(tmp_path)['best']['test']['top1']  # the same images, the same labels
    carved = _validate(tmp_path, '--split', 'validation')
    assert carved['num_samples'] == 3  # the last image of each class of imgs.tar, as in training


def test_validate_reads_an_hfds_run_on_another_split_named_by_val_split(tmp_path, one_thread):
    pytest.importorskip('datasets')
    data = _parquet_set(tmp_path / 'pq')
    assert _run(tmp_path, '--dataset', f'hfds/{data}', '--data-dir', tmp_path / 'cache') == 0
    assert _validate(tmp_path)['dataset'].endswith(f'6 test (hfds/{data} validation split)')
    results = _validate(tmp_path, '--val-split', 'test')
    assert results['num_samples'] == 6 and results['dataset'].endswith(f'(hfds/{data} test split)')


def test_validate_counts_the_samples_a_wds_stream_yields_and_labels_them_with_the_training_classes(
        tmp_path, one_thread):
    pytest.importorskip('webdataset')
    _wds_shards(tmp_path / 'wds', 'train', shards=2, per_shard=8)
    _wds_shards(tmp_path / 'wds', 'val', shards=1, per_shard=3, start=100)
    _wds_shards(tmp_path / 'wds', 'test', shards=3, per_shard=5, start=200)
    assert _run(tmp_path, '--dataset', 'wds/tiny', '--data-dir', tmp_path / 'wds', '--num-classes', 3,
                '--train-split', 'train-{0000..0001}.tar|16', '--val-split', 'val-0000.tar') == 0
    results = _validate(tmp_path, '--split', 'validation')  # the run's selection split
    assert results['num_samples'] == 3 and results['validation']['top1'] == _results(tmp_path)['best'][
        'validation']['top1']
    # a stream named with a wrong length (|99): what is read is counted, across 2 workers sharing 3 shards
    reported = _validate(tmp_path, '--val-split', 'test-{0000..0002}.tar|99', '--select-last-epoch', '-j', '2')
    assert reported['split'] == 'test' and reported['num_samples'] == 15
    predictions = tmp_path / 'p.safetensors'
    _validate(tmp_path, '--val-split', 'test-{0000..0002}.tar|99', '--select-last-epoch', '--save-predictions',
              predictions)
    from safetensors.torch import load_file
    assert sorted(load_file(str(predictions))['labels'].tolist()) == sorted(i % 3 for i in range(200, 215))


def test_a_class_map_numbers_the_training_and_test_splits_alike(tmp_path):
    _tar(tmp_path / 'train.tar', CLASSES, per_class=3)
    _tar(tmp_path / 'test.tar', CLASSES, per_class=1, start=100)
    (tmp_path / 'classes.txt').write_text('emu\ndog\ncat\n')
    splits = build_splits('', str(tmp_path / 'train.tar'), img_size=8, val_per_class=1,
                          class_map=str(tmp_path / 'classes.txt'), mean=(0, 0, 0), std=(1, 1, 1))
    labels = {_index_of(image[None])[0]: label for image, label in (splits.test[i] for i in range(3))}
    assert labels == {100: 2, 101: 1, 102: 0}  # cat, dog, emu under the map's order
    first_cat = splits.train[0]  # train keeps the tar's order: cat's images first, now class 2
    assert first_cat[1] == 2 and _index_of(first_cat[0][None]) == [0]


# ------------------------------------------------------------------------------------------------------
# streams: wds/, hfids/

def _wds_train(tmp_path, workers=0, rank=0, replicas=1, batch=4, seed=3):
    """The training loader of 4 shards x 6 samples, as process ``rank`` of ``replicas`` would build it."""
    _wds_shards(tmp_path / 'wds', 'train', shards=4, per_shard=6)
    stream = create_stream('wds/tiny', str(tmp_path / 'wds'), 'train-{0000..0003}.tar|24', '--train-split',
                           is_training=True, batch_size=batch, seed=seed,
                           transform=tensor_transform(8, (0, 0, 0), (1, 1, 1)))
    stream.reader.dist_rank, stream.reader.dist_num_replicas = rank, replicas  # what torch.distributed would set
    stream.set_loader_cfg(num_workers=workers)
    return StreamTrainLoader(stream, batch, workers, torch.device('cpu'), seed)


def _epoch(loader, epoch, start=0):
    loader.set_epoch(epoch)
    return [i for images, _ in loader.batches(start) for i in _index_of(images)]


@pytest.mark.parametrize('workers', [0, 2])
def test_a_wds_epoch_sees_every_sample_once_across_workers_and_processes(tmp_path, workers):
    pytest.importorskip('webdataset')
    seen = []
    for rank in (0, 1):  # two processes, each with `workers` DataLoader workers
        loader = _wds_train(tmp_path / str(rank), workers=workers, rank=rank, replicas=2, batch=3)
        assert len(loader) == 4  # 24 samples / 2 processes / 3 per batch
        seen += _epoch(loader, 0)
    assert sorted(seen) == list(range(24))


def test_a_stream_that_cannot_divide_evenly_is_warned_about(tmp_path, caplog):
    pytest.importorskip('webdataset')
    loader = _wds_train(tmp_path, workers=2, rank=0, replicas=2, batch=4)  # 6 samples a reader, batches of 4
    with caplog.at_level('WARNING'):
        check_stream_coverage(loader.stream, 2)
    assert 'an epoch takes 32 samples of the 24 in the stream' in caplog.text
    caplog.clear()
    with caplog.at_level('WARNING'):
        check_stream_coverage(_wds_train(tmp_path / 'b', workers=0, rank=0, replicas=3, batch=4).stream, 0)
    assert '4 shards do not divide among 3 readers' in caplog.text


def test_a_wds_epoch_order_depends_on_seed_and_epoch_alone_so_a_resumed_epoch_replays_it(tmp_path):
    pytest.importorskip('webdataset')
    loader = _wds_train(tmp_path / 'a')
    first, second = _epoch(loader, 0), _epoch(loader, 1)
    assert sorted(first) == sorted(second) == list(range(24)) and first != second
    fresh = _wds_train(tmp_path / 'b')  # a resumed run: a new process, at epoch 1, batch 2
    assert _epoch(fresh, 1, start=2) == second[8:]


def test_wds_trains_with_a_named_selection_split_and_says_so(tmp_path, one_thread):
    pytest.importorskip('webdataset')
    _wds_shards(tmp_path / 'wds', 'train', shards=2, per_shard=8)
    _wds_shards(tmp_path / 'wds', 'val', shards=1, per_shard=6, start=100)
    assert _run(tmp_path, '--dataset', 'wds/tiny', '--data-dir', tmp_path / 'wds', '--num-classes', 3,
                '--train-split', 'train-{0000..0001}.tar|16', '--val-split', 'val-0000.tar') == 0
    results = _results(tmp_path)
    assert results['selection'] == 'the val-0000.tar split (--val-split)' and results['test_split'] is None
    assert 'validation' in results['best'] and 'test' not in results['best']


def test_a_wds_run_resumed_at_an_epoch_boundary_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, one_thread):
    pytest.importorskip('webdataset')
    from safetensors.torch import load_file
    _wds_shards(tmp_path / 'wds', 'train', shards=2, per_shard=8)
    _wds_shards(tmp_path / 'wds', 'val', shards=1, per_shard=3, start=100)
    # a constant learning rate and linear MixMo (Cut-MixMo's patch probability follows epoch / epochs): the 1-epoch
    # run's first epoch is then the first epoch of the 2-epoch one
    common = ['--dataset', 'wds/tiny', '--data-dir', str(tmp_path / 'wds'), '--num-classes', '3', '--train-split',
              'train-{0000..0001}.tar|16', '--val-split', 'val-0000.tar', '--select-last-epoch', '--sched',
              'multistep', '--warmup-epochs', '0', '--mix-mode', 'linear', '--output', str(tmp_path)]
    assert train.cli([*TINY_RUN, *common, '--epochs', '2', '--experiment', 'whole']) == 0
    assert train.cli([*TINY_RUN, *common, '--epochs', '1', '--experiment', 'cut']) == 0
    first = load_file(str(tmp_path / 'cut' / 'best' / 'model.safetensors'))
    assert train.cli(['--resume', str(tmp_path / 'cut'), '--epochs', '2', '--data-dir', str(tmp_path / 'wds')]) == 0
    whole, resumed = (load_file(str(tmp_path / name / 'best' / 'model.safetensors')) for name in ('whole', 'cut'))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not all(torch.equal(first[k], whole[k]) for k in whole)  # the second epoch did train


def test_a_resumed_run_reads_its_recorded_data_unless_a_new_data_dir_is_given(tmp_path, one_thread):
    """--resume without --data-dir: the data location of args.yaml; with it: the new one (the data moved)."""
    _tar(tmp_path / 'data' / 'train.tar', CLASSES, per_class=4)
    assert _run(tmp_path, '--data-dir', tmp_path / 'data' / 'train.tar') == 0
    run = tmp_path / 'out' / 'x'
    assert train.cli(['--resume', str(run), '--epochs', '2']) == 0  # before: the embedded digits, a class mismatch
    assert _results(tmp_path)['best']['epoch'] in (0, 1) and 'train.tar' in _results(tmp_path)['dataset']
    (tmp_path / 'data').rename(tmp_path / 'moved')
    assert train.cli(['--resume', str(run), '--epochs', '3', '--data-dir', str(tmp_path / 'moved' / 'train.tar')]) == 0
    assert str(tmp_path / 'moved' / 'train.tar') in _results(tmp_path)['dataset']


def test_hfids_trains_with_last_epoch_selection_said_in_the_log_and_results_and_validates(tmp_path, one_thread, caplog):
    pytest.importorskip('datasets')
    data = _parquet_set(tmp_path / 'pq')
    with caplog.at_level('INFO'):
        code = _run(tmp_path, '--dataset', f'hfids/{data}', '--data-dir', tmp_path / 'cache', '--num-classes', 3,
                    '--train-num-samples', 12, '--val-num-samples', 6, '--select-last-epoch', '--val-split', 'test',
                    '--epochs', 2)
    assert code == 0
    results = _results(tmp_path)
    assert results['selection'] == LAST_EPOCH and results['best']['epoch'] == 1
    assert results['test_split'] == f'hfids/{data} test split' and 'test' in results['best']
    assert 'model selection: the last epoch' in caplog.text
    scored = _validate(tmp_path)  # the run's stream flags: its test split, counted as it streams
    assert scored['split'] == 'test' and scored['num_samples'] == 6
    assert scored['test']['top1'] == results['best']['test']['top1']


# ------------------------------------------------------------------------------------------------------
# bad input: one error line, exit 2, no run folder

@pytest.fixture
def offline(monkeypatch):
    """The Hub unreachable as on an offline machine (no retries over the network)."""
    datasets = pytest.importorskip('datasets')
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)


def _no_shard(p):
    _wds_shards(p / 'wds', 'train', shards=1, per_shard=4)
    return ['--dataset', 'wds/x', '--data-dir', p / 'wds', '--train-split', 'nope-{0000..0003}.tar|16', '--val-split',
            'train-0000.tar']


def _stream_without_selection(p):
    _wds_shards(p / 'wds', 'train', shards=1, per_shard=4)
    return ['--dataset', 'wds/x', '--data-dir', p / 'wds', '--train-split', 'train-0000.tar|4']


def _missing_hfds_split(p):
    return ['--dataset', f'hfds/{_parquet_set(p / "pq")}', '--data-dir', p / 'cache', '--val-split', 'holdout']


def _tfds_absent(p):
    if importlib.util.find_spec('tensorflow_datasets') is not None:
        pytest.skip('tensorflow-datasets is installed: tfds/ is an optional, untested extra')
    return ['--dataset', 'tfds/mnist', '--data-dir', p / 'tfds', '--val-split', 'test', '--num-classes', 10]


def _download_offline(p):
    """--dataset-download reaches timm's reader: offline, the library refuses (no network here to test more)."""
    return ['--dataset', 'hfids/org/absent', '--data-dir', p / 'cache', '--dataset-download', '--num-classes', 3,
            '--train-num-samples', 4, '--select-last-epoch', '--val-split', 'test']


def _missing_folder_split(p):
    from test_reliability import _image_folder
    _image_folder(p / 'data' / 'train', per_class=3)
    return ['--data-dir', p / 'data', '--val-split', 'holdout']


# bad data input, each with the words its one error line must hold: train.py takes them all, validate.py those
# that are not about training (selection of a stream, downloading)
BAD_DATA_INPUT = {
    'wds-no-shard': (_no_shard, 'no shard of the pattern exists in'),
    'hfds-absent': (lambda p: ['--dataset', 'hfds/org/absent', '--data-dir', p / 'cache'],
                    'cannot read hfds/org/absent'),
    'stream-without-selection': (_stream_without_selection,
                                 'name one with --val-split, or keep the last epoch with --select-last-epoch'),
    'hfds-missing-split': (_missing_hfds_split, '--val-split holdout: hfds/'),
    'folder-missing-split': (_missing_folder_split, '--val-split holdout: no folder'),
    'tfds-absent': (_tfds_absent, 'tfds/ data sets need TensorFlow Datasets, an optional extra not installed here'),
    'download-offline': (_download_offline, 'downloading hfids/org/absent into'),
}
BAD_VALIDATE_INPUT = [case for case in BAD_DATA_INPUT if case not in ('stream-without-selection', 'download-offline')]


@pytest.mark.parametrize('make_args,needle', list(BAD_DATA_INPUT.values()), ids=list(BAD_DATA_INPUT))
def test_bad_data_input_is_one_line_and_leaves_no_run_folder(make_args, needle, tmp_path, capsys, offline,
                                                             one_thread):
    args = make_args(tmp_path)
    capsys.readouterr()
    code = _run(tmp_path, *args)
    one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / 'out' / 'x').exists()


@pytest.mark.parametrize('make_args,needle', [BAD_DATA_INPUT[case] for case in BAD_VALIDATE_INPUT],
                         ids=BAD_VALIDATE_INPUT)
def test_bad_data_input_to_validate_is_one_line_and_writes_nothing(make_args, needle, tmp_path, capsys, offline,
                                                                   one_thread):
    from timm_mimo.cli import run_cli
    args = make_args(tmp_path)
    capsys.readouterr()
    results = tmp_path / 'results.json'
    code = run_cli(validate.main, ['--model', 'wrn16_2_mixmo2', '--num-classes', '3', '--img-size', '8',
                                   '--val-per-class', '1', '--device', 'cpu', '--results-file', str(results),
                                   *map(str, args)])
    one_line_error(code, capsys.readouterr().err, needle)
    assert not results.exists()

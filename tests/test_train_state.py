"""The run's typed parts on their own, without a command line: the step generator's seeds, the run state
saved as the trainer state, the settings a task is built from, and ``debug: true`` from a config."""
import json
import sys
from pathlib import Path

import pytest
import torch

import timm_mimo  # noqa: F401  (registers the models)
from timm_mimo import rundir
from timm_mimo.train.run import RunState, step_seed
from timm_mimo.train.settings import MixingSettings, RunSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

# the keys of the trainer state as every earlier version wrote them: checkpoints of those versions resume
EARLIER_KEYS = ['epoch', 'step', 'num_updates', 'best_metric', 'best_epoch', 'elapsed_s', 'loss_sum', 'loss_count',
                'part_sums', 'epoch_seen', 'epoch_time_s']


def test_every_micro_step_of_every_process_gets_its_own_seed_even_in_the_32_bits_a_cpu_generator_reads():
    shape = dict(processes=4, steps_per_epoch=30, accum_steps=3)
    draws = [(p, e, s, m) for p in range(4) for e in range(6) for s in range(30) for m in range(3)]
    for seed in (0, 42, 2 ** 40 + 7):
        seeds = [step_seed(seed, *draw, **shape) for draw in draws]
        assert all(0 <= x < 2 ** 64 for x in seeds)
        assert len(set(seeds)) == len(draws)
        assert len({x % 2 ** 32 for x in seeds}) == len(draws)  # mt19937 is seeded from the low 32 bits only
    # another run seed draws other batches at every step; the same numbers give the same seed (exact replay)
    assert all(step_seed(42, *d, **shape) != step_seed(43, *d, **shape) for d in draws[:200])
    assert step_seed(42, 1, 2, 3, 1, **shape) == step_seed(42, 1, 2, 3, 1, **shape)
    first, second = (torch.rand(4, generator=torch.Generator().manual_seed(step_seed(42, 0, 0, s, 0, **shape)))
                     for s in (0, 1))
    assert not torch.equal(first, second)


def checkpoint_folder(tmp_path: Path, epoch: int = 1, step: int = 2) -> Path:
    """A folder that passes for a complete checkpoint (what read_trainer_state asks of one)."""
    folder = tmp_path / rundir.checkpoint_name(epoch, step)
    (folder / rundir.TRAINING_STATE_DIR).mkdir(parents=True)
    (folder / rundir.WEIGHTS_FILE).write_bytes(b'')
    return folder


def test_the_run_state_saves_and_loads_itself_under_the_trainer_states_earlier_keys(tmp_path):
    state = RunState(epoch=1, step=2, num_updates=12, best_metric=61.5, best_epoch=0, elapsed_s=9.5, loss_sum=3.25,
                     loss_count=4, part_sums={'mask': 0.5}, epoch_seen=64, epoch_time_s=1.5)
    folder = checkpoint_folder(tmp_path)
    state.save(folder)
    assert list(json.loads((folder / rundir.STATE_FILE).read_text())) == EARLIER_KEYS
    assert RunState.load(folder, steps_per_epoch=5) == state
    with pytest.raises(ValueError, match=r'step must be an integer >= 0 and < 2 \(the steps per epoch'):
        RunState.load(folder, steps_per_epoch=2)  # a step this run's epochs never reach


def test_a_trainer_state_without_the_epoch_sums_resumes_with_them_at_zero(tmp_path):
    folder = checkpoint_folder(tmp_path)
    (folder / rundir.STATE_FILE).write_text(json.dumps(dict(epoch=1, step=2, num_updates=7, best_metric=None,
                                                            best_epoch=None, elapsed_s=3.0)))
    assert RunState.load(folder, steps_per_epoch=5) == RunState(epoch=1, step=2, num_updates=7, elapsed_s=3.0)


def test_a_new_epoch_keeps_the_runs_count_and_best_and_zeroes_the_epochs_sums():
    state = RunState(epoch=1, step=5, num_updates=12, best_metric=61.5, best_epoch=0, elapsed_s=9.5, loss_sum=3.0,
                     loss_count=4, part_sums={'mask': 0.5}, epoch_seen=64, epoch_time_s=1.5)
    state.start_epoch(2, elapsed_s=11.0)
    assert state == RunState(epoch=2, num_updates=12, best_metric=61.5, best_epoch=0, elapsed_s=11.0)


def test_a_task_is_built_from_settings_alone():
    from timm_mimo.models.factory import create_model
    from timm_mimo.train.tasks import AutoMixTask, MimoTask, build_builder, create_task
    from timm_mimo.train.settings import AugmentSettings
    model = create_model('wrn16_2', num_classes=10)
    settings = RunSettings(model='wrn16_2', epochs=1, mixing=MixingSettings(msda='automix'))
    builder = build_builder(model, 10, 32, 'cut', settings.mixing, AugmentSettings(crop='crop', erase_prob=0.5))
    assert builder.msda is None and builder.augment is not None  # AutoMix mixes the batch itself
    task = create_task(settings, model, builder, 'cut', (32, 32))
    assert isinstance(task, AutoMixTask) and task.mixblock_lr == settings.automix.mixblock_lr
    with pytest.raises(ValueError, match='drop --model-ema'):
        create_task(RunSettings(model='wrn16_2', epochs=1, ema_decay=0.99, mixing=settings.mixing), model, builder,
                    'cut', (32, 32))
    plain = create_task(RunSettings(model='wrn16_2', epochs=1, ema_decay=0.99), model, builder, 'cut', (32, 32))
    assert type(plain) is MimoTask and plain.ema.decay == 0.99


def test_debug_true_in_a_config_shows_the_traceback(tmp_path, capsys):
    config = tmp_path / 'debug.yaml'
    config.write_text('debug: true\nmodel: no_such_model_anywhere\n')
    assert train.cli(['-c', str(config), '--output', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert 'Traceback (most recent call last)' in err and 'no_such_model_anywhere' in err
    config.write_text('debug: false\nmodel: no_such_model_anywhere\n')
    assert train.cli(['-c', str(config), '--output', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.strip().count('\n') == 0

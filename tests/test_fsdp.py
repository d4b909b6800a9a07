"""train.py under FSDP (FSDP1 and FSDP2, 2 CPU processes, gloo; tests/fsdp_cpu_train.py says why a harness).

The weights it saves must be the whole model, not one process's shards: they are compared with the weights of
the same run under DDP (same data and draws per process, gradients averaged alike; BatchNorm statistics are
rank 0's in both: DDP broadcasts rank 0's buffers, and FSDP saves rank 0's).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ARGS = ['--model', 'wrn16_2_mixmo2', '-b', '32', '--batch-repeat', '2', '--lr', '0.05', '--seed', '3',
        '--limit-train-batches', '4']


def launch(script: str, *args, check=True, fsdp_version=2):
    env = dict(os.environ, ACCELERATE_USE_CPU='true', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1',
               FSDP_TEST_VERSION=str(fsdp_version))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', script,
                           *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    launch('train.py', *ARGS, '--epochs', 2, '--output', out, '--experiment', 'ddp')
    return out / 'ddp'


@pytest.fixture(scope='module', params=[1, 2], ids=['fsdp1', 'fsdp2'])
def fsdp(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f'fsdp{request.param}')
    launch('tests/fsdp_cpu_train.py', *ARGS, '--epochs', 2, '--output', out, '--experiment', 'fsdp',
           fsdp_version=request.param)
    return out / 'fsdp', request.param


def test_fsdp_saves_the_whole_weights_that_ddp_saves(fsdp, ddp):
    fsdp, _ = fsdp
    results = json.loads((fsdp / 'results.json').read_text())
    assert results['speed']['distributed'] == 'fsdp' and results['processes'] == 2
    assert json.loads((ddp / 'results.json').read_text())['speed']['distributed'] == 'multi_cpu'
    assert (fsdp / 'checkpoint-0002' / 'state' / 'pytorch_model_fsdp.bin').exists(), 'sharded training state'
    for folder in ('checkpoint-0002', 'best'):
        ours, theirs = (load_file(str(run / folder / 'model.safetensors')) for run in (fsdp, ddp))
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].shape == theirs[key].shape, key
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)
    # evaluation gathered the sharded parameters: the same validation metrics as DDP's
    ddp_results = json.loads((ddp / 'results.json').read_text())
    assert results['last']['validation']['top1'] == pytest.approx(ddp_results['last']['validation']['top1'])
    assert results['last']['validation']['nll'] == pytest.approx(ddp_results['last']['validation']['nll'], abs=1e-4)


def test_fsdp_run_resumes_from_its_sharded_state(fsdp):
    folder, version = fsdp
    launch('tests/fsdp_cpu_train.py', *ARGS, '--epochs', 3, '--resume', folder, fsdp_version=version)
    results = json.loads((folder / 'results.json').read_text())
    assert results['epochs'] == 3 and results['last']['epoch'] == 2
    assert [p.name for p in folder.glob('checkpoint-*')] == ['checkpoint-0003']


def test_fsdp_refuses_a_second_whole_model(tmp_path):
    proc = launch('tests/fsdp_cpu_train.py', *ARGS, '--epochs', 1, '--model-ema', '--output', tmp_path,
                  '--experiment', 'ema', check=False)
    assert proc.returncode != 0
    assert 'error: --model-ema and AutoMix keep a whole copy of the model' in proc.stderr
    assert not (tmp_path / 'ema').exists()

"""Accelerate launch configs under configs/accelerate/: they parse, and the CPU one really launches 2 processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / 'configs' / 'accelerate').glob('*.yaml'))


def test_expected_configs_exist():
    assert {p.name for p in CONFIGS} == {'cpu_2proc.yaml', 'ddp_4gpu.yaml', 'fsdp.yaml', 'deepspeed_zero2.yaml'}


@pytest.mark.parametrize('path', CONFIGS, ids=[p.name for p in CONFIGS])
def test_accelerate_parses_the_config(path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type in (DistributedType.MULTI_GPU, DistributedType.FSDP, DistributedType.DEEPSPEED)
    raw = yaml.safe_load(path.read_text())
    assert config.num_processes == raw['num_processes'] >= 2
    rel = path.relative_to(REPO).as_posix()
    assert f'--config_file {rel} train.py' in path.read_text(), f'{path.name}: the header must give its command'
    if config.distributed_type == DistributedType.FSDP:
        # the setup tests/test_fsdp.py runs: FSDP2 (one DTensor per original parameter, so timm's per-parameter
        # weight-decay groups hold), size-based wrapping, whole weights gathered for the safetensors files
        assert config.fsdp_config['fsdp_version'] == 2
        assert config.fsdp_config['fsdp_auto_wrap_policy'] == 'SIZE_BASED_WRAP'
        assert config.fsdp_config['fsdp_state_dict_type'] == 'FULL_STATE_DICT'
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config['zero_stage'] in (1, 2)


def test_cpu_config_launches_two_processes_and_only_the_main_one_writes(tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU='true', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--config_file',
         str(REPO / 'configs' / 'accelerate' / 'cpu_2proc.yaml'), str(REPO / 'train.py'), '--epochs', '1',
         '--limit-train-batches', '3', '-b', '16', '--output', str(tmp_path), '--experiment', 'acc'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert '2 process(es) x 8 unique images' in out
    assert out.count('best epoch') == 1
    results = json.loads((tmp_path / 'acc' / 'results.json').read_text())
    assert results['processes'] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason='the failure mode is a machine without GPUs')
def test_cpu_launch_without_use_cpu_is_refused_not_run_twice(tmp_path):
    """Without ACCELERATE_USE_CPU each launched process would see no GPU and train alone into one folder."""
    env = {k: v for k, v in os.environ.items() if k != 'ACCELERATE_USE_CPU'}
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--config_file',
         str(REPO / 'configs' / 'accelerate' / 'cpu_2proc.yaml'), str(REPO / 'train.py'), '--output', str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'error: 2 processes were launched but Accelerate sees 1' in proc.stderr
    assert not any(tmp_path.iterdir())

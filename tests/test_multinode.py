"""Multi-node training through Accelerate (issue 24, item 6): two "machines" on this host, one CPU process each
(gloo), training on generated wds/ shards; one machine is SIGKILLed mid-epoch, the other must then stop with an
error rather than wait, and the job resumed from its last checkpoint ends with the weights of an uninterrupted
2-machine run, bit for bit.

`accelerate launch --cpu` cannot be used for this: its CPU launcher starts one plain process per machine and
leaves more processes to mpirun (accelerate/utils/launch.py, prepare_simple_launcher_cmd_env: --num_processes and
--machine_rank are not passed on, no RANK / WORLD_SIZE), so each "machine" would train alone. `--multi_gpu`
launches through torch.distributed.run, which forms the 2-machine group; ACCELERATE_USE_CPU=true makes its
processes gloo CPU ones (README "Multi-node")."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_data_backends import _wds_shards
from test_train import REPO, final_weights

from timm_mimo import rundir

SLURM_SCRIPT = REPO / 'configs' / 'slurm' / 'multinode.sbatch'
# 2 shards of 8 samples: one shard per process; 4 steps of 2 unique images per process an epoch, 2 epochs
# (a checkpoint each), tiny images; the stream's order depends on (seed, epoch) alone, so it resumes at an epoch
RUN = ['--dataset', 'wds/tiny', '--num-classes', '3', '--train-split', 'train-{0000..0001}.tar|16',
       '--val-split', 'val-0000.tar', '--select-last-epoch', '--img-size', '8', '-b', '8', '--batch-repeat', '2',
       '--epochs', '2', '--lr', '0.05', '--seed', '5']
STEPS_PER_EPOCH = 4
NODE_EXIT_S = 60  # the surviving machine must end within this after the other died (measured: under 2 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    # the test's own train.py and timm_mimo in every launched process, one thread each
    path = os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])
    return dict(os.environ, ACCELERATE_USE_CPU='true', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', PYTHONPATH=path,
                **extra)


def _launch_node(rank: int, port: int, script: str, *args, log: Path, **env) -> subprocess.Popen:
    """One machine: its own `accelerate launch` (which starts torch.distributed.run and its one process), in a
    session of its own so that the whole machine can be killed at once."""
    command = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_machines', '2',
               '--num_processes', '2', '--machine_rank', str(rank), '--main_process_ip', '127.0.0.1',
               '--main_process_port', str(port), '--mixed_precision', 'no', '--dynamo_backend', 'no',
               '--num_cpu_threads_per_process', '1', script, *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, env=_env(**env), stdout=log.open('w'), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_machine(node: subprocess.Popen):
    """SIGKILL a machine's launcher and every process under it (torch.distributed.run starts its processes in
    sessions of their own, so killing the launcher's process group would leave them running)."""
    import psutil
    try:
        processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    node.wait()


def _wait_all(nodes, logs, timeout=300):
    deadline = time.time() + timeout
    try:
        for node in nodes:
            node.wait(timeout=max(1, deadline - time.time()))
    finally:
        for node in nodes:
            _kill_machine(node)
    codes = [node.returncode for node in nodes]
    assert codes == [0] * len(nodes), '\n'.join(log.read_text()[-3000:] for log in logs)


@pytest.fixture(scope='module')
def shards(tmp_path_factory) -> Path:
    pytest.importorskip('webdataset')
    folder = tmp_path_factory.mktemp('wds')
    _wds_shards(folder, 'train', shards=2, per_shard=8)
    _wds_shards(folder, 'val', shards=1, per_shard=3, start=100)
    return folder


@pytest.fixture(scope='module')
def slurm_run(shards, tmp_path_factory):
    """The uninterrupted 2-machine run, through configs/slurm/multinode.sbatch itself: srun and scontrol are
    stand-ins that start the script's per-node command once per node (SLURM_PROCID 0 and 1) on this host."""
    out, bin_dir = tmp_path_factory.mktemp('slurm'), tmp_path_factory.mktemp('bin')
    (bin_dir / 'srun').write_text('#!/bin/bash\n'
                                  'while [[ $1 == -* ]]; do shift; done  # srun\'s own options\n'
                                  'for ((r = 0; r < SLURM_NNODES; r++)); do SLURM_PROCID=$r "$@" & done\n'
                                  'status=0; for job in $(jobs -p); do wait $job || status=$?; done; exit $status\n')
    (bin_dir / 'scontrol').write_text('#!/bin/bash\necho 127.0.0.1\n')
    for tool in ('srun', 'scontrol'):
        (bin_dir / tool).chmod(0o755)
    env = _env(PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ['PATH']]),
               SLURM_NNODES='2', SLURM_JOB_NODELIST='node[1-2]', GPUS_PER_NODE='1', MAIN_PORT=str(_free_port()))
    job = subprocess.Popen(['bash', str(SLURM_SCRIPT), *RUN, '--data-dir', str(shards), '--output', str(out),
                            '--experiment', 'whole'], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = job.communicate(timeout=300)
    finally:
        _kill_machine(job)
    assert job.returncode == 0, output[-3000:]
    return out / 'whole', output


@pytest.mark.slow
def test_the_slurm_script_trains_one_job_across_its_nodes(slurm_run):
    folder, output = slurm_run
    results = json.loads((folder / rundir.RESULTS_FILE).read_text())
    assert results['processes'] == 2 and results['speed']['distributed'] == 'multi_cpu'
    assert '2 process(es) x 2 unique images' in output and output.count('best epoch') == 1, output[-3000:]
    assert [p.name for p in folder.glob('checkpoint-*')] == ['checkpoint-0002']


@pytest.mark.slow
def test_a_machine_killed_mid_epoch_stops_the_job_and_the_resumed_job_ends_bit_identical(slurm_run, shards,
                                                                                           tmp_path):
    reference, _ = slurm_run
    folder, marker = tmp_path / 'killed', tmp_path / 'machine1-in-epoch1'
    args = [*RUN, '--data-dir', shards, '--output', tmp_path, '--experiment', 'killed']
    logs = [tmp_path / 'machine0.log', tmp_path / 'machine1.log']
    port = _free_port()
    # machine 1 stalls in the first step of epoch 1 (after the epoch-0 checkpoint); machine 0 waits for it in
    # that step's gradient all-reduce
    nodes = [_launch_node(0, port, 'tests/slow_step_train.py', *args, log=logs[0], SLOW_STEP_FROM='1000000'),
             _launch_node(1, port, 'tests/slow_step_train.py', *args, log=logs[1],
                          SLOW_STEP_FROM=str(STEPS_PER_EPOCH), SLOW_STEP_S='120', SLOW_STEP_MARKER=str(marker))]
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert all(n.poll() is None for n in nodes) and time.time() < deadline, \
                '\n'.join(log.read_text()[-3000:] for log in logs)
            time.sleep(0.05)
        _kill_machine(nodes[1])
        killed_at = time.time()
        try:
            nodes[0].wait(timeout=NODE_EXIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f'machine 0 still runs {NODE_EXIT_S} s after machine 1 died:\n{logs[0].read_text()[-3000:]}')
        survivor_s = time.time() - killed_at
    finally:
        for node in nodes:
            _kill_machine(node)
    assert nodes[0].returncode not in (0, None), logs[0].read_text()[-3000:]
    print(f'machine 0 ended {survivor_s:.1f} s after machine 1 was killed (exit {nodes[0].returncode})')
    assert rundir.complete_checkpoints(folder) == [folder / 'checkpoint-0001']
    assert not (folder / rundir.RESULTS_FILE).exists()

    # both machines again, from the run folder (shared by the machines): epoch 1 replayed from its start
    port = _free_port()
    resumed = [_launch_node(rank, port, 'train.py', '--resume', folder, '--data-dir', shards,
                            log=tmp_path / f'resume{rank}.log') for rank in (0, 1)]
    _wait_all(resumed, [tmp_path / f'resume{rank}.log' for rank in (0, 1)])
    ours, theirs = final_weights(folder), final_weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_accelerate_launch_cpu_on_two_machines_is_refused_rather_than_each_training_alone(tmp_path):
    """`accelerate launch --cpu --num_machines 2` starts one plain process per machine (no process group): each
    would train the whole job alone into the output folder. One error line, and no folder left."""
    proc = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--cpu', '--num_machines', '2', '--num_processes', '2',
         '--machine_rank', '0', '--main_process_ip', '127.0.0.1', '--main_process_port', str(_free_port()),
         '--mixed_precision', 'no', '--dynamo_backend', 'no', '--num_cpu_threads_per_process', '1', 'train.py',
         '--output', str(tmp_path / 'out')], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert errors == [errors[0]] and 'accelerate launch --cpu started this process alone' in errors[0], proc.stderr
    assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').iterdir())

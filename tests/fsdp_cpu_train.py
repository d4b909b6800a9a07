"""Test harness: run train.py with its model sharded by FSDP2 across CPU processes (gloo).

Accelerate only selects FSDP when it finds GPUs (or XPUs, NPUs, ...): with ``ACCELERATE_USE_CPU`` it falls back
to DDP. Torch's FSDP2 (``fully_shard``) itself runs on CPU, so this harness sets, right after each
``Accelerator()`` is built, the distributed type and plugin that ``accelerate launch --use_fsdp
--fsdp_version 2`` sets on a GPU machine. train.py then takes its real FSDP paths: ``prepare`` shards the
model, ``get_state_dict`` gathers it, ``save_state`` / ``load_state`` write and read sharded training state.

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_cpu_train.py <train.py args>
"""
import os
import sys
from pathlib import Path

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_init = accelerate.Accelerator.__init__


def _init_with_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    # both the shared state and this instance's: Accelerate re-reads the former in some calls
    PartialState._shared_state['distributed_type'] = DistributedType.FSDP
    self.state.distributed_type = DistributedType.FSDP
    # size-based wrapping with a small threshold, so that the residual blocks are FSDP units of their own
    # (as in configs/accelerate/fsdp.yaml for the large models) and the root holds the stem and the heads
    version = int(os.environ.get('FSDP_TEST_VERSION', '2'))
    per_version = dict(reshard_after_forward=True) if version == 2 else \
        dict(sharding_strategy='FULL_SHARD', use_orig_params=True, sync_module_states=False)
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version, state_dict_type='FULL_STATE_DICT', auto_wrap_policy='size_based_wrap',
        min_num_params=20_000, cpu_ram_efficient_loading=False, **per_version)


accelerate.Accelerator.__init__ = _init_with_fsdp
if os.environ.get('FSDP_TEST_VERSION') == '1':
    # FSDP1 wraps with device_id = the Accelerator's device: plain 'cpu' (not 'cpu:0', the process index)
    os.environ['ACCELERATE_TORCH_DEVICE'] = 'cpu'

import train  # noqa: E402

if __name__ == '__main__':
    sys.exit(train.cli(sys.argv[1:]))

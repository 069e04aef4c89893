"""Test harness: Ultralytics' multi-GPU (DDP) code path on CPU processes, with the gloo backend.

Python imports this module at start-up when its directory is on PYTHONPATH; it does nothing
unless ULTRALYTICS_DP_TEST_CPU_DDP is set. It patches only what selects CUDA devices, so that
everything else runs as on a multi-GPU machine: the launching process writes Ultralytics' DDP
worker script (cloudpickled trainer state) and runs ``torch.distributed.run``; each worker builds
the trainer from it, joins the process group, wraps the model in DistributedDataParallel, and
trains with Ultralytics' own loop, broadcasts and validation.

* ``parse_device`` / ``select_device``: ``device="0,1"`` is accepted as two devices, and the
  trainer's device is a CUDA *label* until the process group is set up (no tensor goes there), so
  Ultralytics counts world_size=2 and launches workers exactly as it would on two GPUs.
* ``BaseTrainer._setup_ddp``: the process runs on the CPU and joins a gloo process group (rank
  and world size from the launcher, as Ultralytics does).
* ``DistributedDataParallel``: ``device_ids`` is dropped (a CPU module takes none).
* The validator's device for a DDP rank's final validation: the CPU instead of the current CUDA device.
"""

import os

if os.environ.get("ULTRALYTICS_DP_TEST_CPU_DDP"):
    from datetime import timedelta
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    import ultralytics_dp  # noqa: F401  (the plugin's import hooks first, as after pip install)
    import ultralytics.engine.trainer as trainer_module
    import ultralytics.engine.validator as validator_module
    from ultralytics.utils import RANK

    def _setup_ddp(self):
        self.device = torch.device("cpu")
        self.accelerator = None
        dist.init_process_group("gloo", timeout=timedelta(minutes=10), rank=RANK, world_size=self.world_size)

    class _CpuDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__(module, device_ids=None, **kwargs)

    _auto_backend = validator_module.AutoBackend

    trainer_module.parse_device = lambda device, *args, **kwargs: str(device)
    trainer_module.select_device = lambda device, *args, **kwargs: torch.device("cuda", 0)
    trainer_module.BaseTrainer._setup_ddp = _setup_ddp
    torch.nn.parallel.DistributedDataParallel = _CpuDDP
    validator_module.get_torch_device_backend = lambda device_type: SimpleNamespace(current_device=lambda: 0)
    validator_module.AutoBackend = lambda *args, device=None, **kwargs: _auto_backend(
        *args, device=torch.device("cpu"), **kwargs)

"""`model-orchestrator serve` with the stand-in NVML, so a sidecar on a machine without a GPU exports GPU metrics.

    python tests/grafana_scenario/fake_gpu_sidecar.py serve [args...]

The stand-in (tests/support/nvml.py `LiveFakeNvml`: one 80 GB card whose processes are the sidecar's llama-servers
plus one foreign process) is installed as the `pynvml` module before the sidecar starts, so the sidecar's own code
(`gpu.open_gpu_view`, `metrics._GpuCollector`, status) runs unchanged over it. Used only by tests/test_grafana.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the support package

from support.nvml import LiveFakeNvml  # noqa: E402

if __name__ == "__main__":
    sys.modules["pynvml"] = LiveFakeNvml()  # what `import pynvml` in model_orchestrator.platform.gpu now finds
    from model_orchestrator.cli import main

    sys.exit(main(sys.argv[1:]))

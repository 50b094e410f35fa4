import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:  # 8 simulated CPU devices for the sharding tests
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).parent))

import warnings

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

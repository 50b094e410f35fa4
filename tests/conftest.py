import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import warnings

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

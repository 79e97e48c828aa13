"""`tgserve --env`: the runtime facts a bug report needs."""

from __future__ import annotations

import os
import platform
import sys


def print_env() -> None:
    import torch
    import transformers

    import tgserve

    rows = {
        "tgserve": tgserve.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "cuda": str(torch.cuda.is_available()),
        "transformers": transformers.__version__,
    }
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be chosen before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import os
import sys

import torch

# Triton kernels run in the interpreter on machines without a GPU; it must be chosen before
# any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import liteffn  # noqa: F401  (pip install -e .)
except ImportError:  # plain checkout: the repository root is the package
    spec = importlib.util.spec_from_file_location("liteffn", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    sys.modules["liteffn"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["liteffn"])

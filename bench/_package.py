"""Makes `import liteffn` work for bench scripts run from a plain checkout (the device machine
gets the working tree, not an installed package): registers the repository root as `liteffn`."""
import importlib.util
import os
import sys

try:
    import liteffn  # noqa: F401  (installed with pip install -e .)
except ImportError:
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.util.spec_from_file_location("liteffn", os.path.join(_root, "__init__.py"),
                                                   submodule_search_locations=[_root])
    sys.modules["liteffn"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["liteffn"])

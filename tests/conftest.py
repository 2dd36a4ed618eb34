import importlib.util
import os
import sys

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU; it must be chosen before
# any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def _interpreter_scalars_for_numpy_2_4():
    """Triton 3.6's interpreter indexes with int() of a 1-element array, which numpy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars": every kernel test with a loop bound or an index
    taken from a scalar failed in a ComfyUI venv, numpy 2.4.6 + Triton 3.6). Later Tritons squeeze the array
    first; the same here, for the interpreter's patch scope only (undone with the rest after each kernel)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
        patch = interpreter._patch_lang_tensor
    except (ImportError, AttributeError):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    interpreter._patch_lang_tensor = patched


_interpreter_scalars_for_numpy_2_4()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tests' shared helpers (_tiny.py): --import-mode=importlib puts no test folder on the path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import liteffn  # noqa: F401  (pip install -e .)
except ImportError:  # plain checkout: the repository root is the package
    spec = importlib.util.spec_from_file_location("liteffn", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    sys.modules["liteffn"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["liteffn"])
    # Processes the tests start (torch.multiprocessing spawn, torchrun) import `liteffn` by name:
    # a folder holding a `liteffn` link to the checkout goes on their path.
    import atexit
    import shutil
    import tempfile

    _link_dir = tempfile.mkdtemp(prefix="liteffn-path-")
    atexit.register(shutil.rmtree, _link_dir, True)  # removes the link, not what it points to
    try:
        os.symlink(ROOT, os.path.join(_link_dir, "liteffn"))
        sys.path.append(_link_dir)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), _link_dir) if p)
    except OSError:  # no symlinks here: the multi-process tests need `pip install -e .`
        pass


def _triton_language_objects():
    """What Triton's interpreter patches when it runs a kernel (triton/runtime/interpreter.py _patch_lang):
    triton.language and .core and .math, the tensor, dtype and tensor-descriptor classes."""
    try:
        import triton.language as tl
    except ImportError:
        return []
    objs = [tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype]
    return objs + ([tl.core.tensor_descriptor_base] if hasattr(tl.core, "tensor_descriptor_base") else [])


# taken before any test runs a kernel in the interpreter
_TRITON_LANGUAGE = [(o, dict(vars(o))) for o in _triton_language_objects()]


@pytest.fixture
def triton_language_unpatched():
    """triton.language as it was imported. Triton's interpreter (3.9) patches it while it runs a kernel and
    does not undo what a jit function called from another one patched (InterpretedFunction.__call__), so
    after the interpreted kernel tests, compiling a kernel for a GPU would run the interpreter's builtins.
    Put back for the test, and left put back (the interpreter patches again when it next runs)."""
    for obj, saved in _TRITON_LANGUAGE:
        for name, value in saved.items():
            if vars(obj).get(name, None) is not value:
                try:
                    setattr(obj, name, value)
                except (AttributeError, TypeError):  # read-only entries (__dict__, __weakref__) never change
                    pass
    yield


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws the same random numbers whatever ran before it: an unseeded draw made a refit count
    depend on the test order, and CI failed on an order no local run had."""
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _seeded_module():
    """The same for a module's shared fixtures (set up before the per-test seed): what they draw does not depend
    on the modules run before, so one file run alone builds what the whole suite builds."""
    torch.manual_seed(0)

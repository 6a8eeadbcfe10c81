"""Loads the compiled extension (cuflash_attn/_C*.so), turning its two common failures into
messages that say what to do: a source tree that was never built (or one that shadows an
installed copy), and an extension built against another torch than the one imported."""
import importlib
from pathlib import Path

import torch

_REBUILD = ("build it in place with `bash scripts/setup.sh`, or install with "
            "`pip install --no-build-isolation .` (README.md, Quick start)")


def _built_against():
    try:
        from ._build_info import TORCH_VERSION  # written by setup.py at build time
    except ImportError:
        return None
    return TORCH_VERSION


def load_extension():
    package = Path(__file__).resolve().parent
    try:
        return importlib.import_module("._C", __package__)
    except ImportError as error:
        if not any(package.glob("_C*.so")):
            source_tree = (package.parent / "setup.py").is_file()
            hint = (" This is a source tree: an installed copy is shadowed while Python runs here, so run it"
                    " from another directory to use that one." if source_tree else "")
            raise ImportError(f"cuflash_attn: the compiled extension cuflash_attn._C is missing from {package}:"
                              f" {_REBUILD}.{hint}") from error
        built = _built_against()
        if built is not None and built != torch.__version__:
            raise ImportError(f"cuflash_attn: the extension was built against torch {built}, but torch "
                              f"{torch.__version__} is imported; use torch {built}, or rebuild: {_REBUILD}. "
                              f"({error})") from error
        raise ImportError(f"cuflash_attn: the compiled extension failed to load ({error}); it must be built "
                          f"against the torch imported here ({torch.__version__}): {_REBUILD}.") from error

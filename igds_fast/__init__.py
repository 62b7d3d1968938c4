"""igds_fast: Information-Guided Diffusion Sampling for dataset distillation, fast and faithful."""
import os as _os

__version__ = "0.1.0"


def _source_checkout_root(package_dir: str) -> str | None:
    """The checkout root when this package runs uninstalled from a source tree, else None.

    setup.py installs the top-level folders kernels/ and profiling/ as igds_fast.kernels and
    igds_fast.profiling. A checkout used without installing (the GPU machines, which have no network
    for pip) has them beside this package instead: returning the root lets `__path__` find them there.
    """
    root = _os.path.dirname(package_dir)
    if _os.path.isdir(_os.path.join(package_dir, "kernels")):
        return None  # an installed copy: the subpackages are inside
    markers = ("setup.py", _os.path.join("kernels", "__init__.py"), _os.path.join("profiling", "__init__.py"))
    if all(_os.path.isfile(_os.path.join(root, marker)) for marker in markers):
        return root
    return None


_root = _source_checkout_root(_os.path.dirname(_os.path.abspath(__file__)))
if _root is not None and _root not in __path__:
    __path__.append(_root)  # igds_fast.kernels -> ROOT/kernels, igds_fast.profiling -> ROOT/profiling
del _root

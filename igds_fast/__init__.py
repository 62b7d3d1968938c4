"""igds_fast: Information-Guided Diffusion Sampling for dataset distillation, fast and faithful.

The public API (what a user or another IGDS front end needs), loaded on first use so that
`import igds_fast` stays light — the CLI sets MKL's mode before torch loads (igds_fast.cpu_math):

    Sampler, DiffusionSchedule, ScheduleConfig     the reverse loop and its schedule
    GuidanceConfig, IGDSGuidance                   the guidance settings and the IGDS gradient
    CompileConfig                                  the compiled backend's settings
    VariationalEstimator, load_ve                  the variational estimator
    load_adm, load_prior                           guided-diffusion ADM checkpoints, priors of train-prior
    load_dit, ClassifierFreeGuidance               a DiT / MinimaxDiffusion checkpoint and its CFG mix
    load_vae, LatentDecoder                        a latent prior's VAE decoder (a local diffusers folder)
"""
import importlib as _importlib
import os as _os

from igds_fast._version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "Sampler": "igds_fast.sampling.sampler",
    "DiffusionSchedule": "igds_fast.diffusion",
    "ScheduleConfig": "igds_fast.diffusion",
    "GuidanceConfig": "igds_fast.guidance.config",
    "IGDSGuidance": "igds_fast.guidance.image",
    "CompileConfig": "igds_fast.sampling.compiled.config",
    "VariationalEstimator": "igds_fast.ve",
    "load_ve": "igds_fast.ve",
    "load_adm": "igds_fast.models.adm",
    "load_prior": "igds_fast.models.priors",
    "load_dit": "igds_fast.models.dit",
    "ClassifierFreeGuidance": "igds_fast.models.cfg",
    "load_vae": "igds_fast.models.vae",
    "LatentDecoder": "igds_fast.models.vae",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(_importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'igds_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


def _source_checkout_root(package_dir: str) -> str | None:
    """The checkout root when this package runs uninstalled from a source tree, else None.

    pyproject.toml's package-dir installs the top-level folders kernels/ and profiling/ as
    igds_fast.kernels and igds_fast.profiling. A checkout used without installing (the GPU machines,
    which have no network for pip) has them beside this package instead: returning the root lets
    `__path__` find them there. The checkout is recognised by its pyproject.toml beside kernels/ and
    profiling/.
    """
    root = _os.path.dirname(package_dir)
    if _os.path.isdir(_os.path.join(package_dir, "kernels")):
        return None  # an installed copy: the subpackages are inside
    markers = ("pyproject.toml", _os.path.join("kernels", "__init__.py"), _os.path.join("profiling", "__init__.py"))
    if all(_os.path.isfile(_os.path.join(root, marker)) for marker in markers):
        return root
    return None


_root = _source_checkout_root(_os.path.dirname(_os.path.abspath(__file__)))
if _root is not None and _root not in __path__:
    __path__.append(_root)  # igds_fast.kernels -> ROOT/kernels, igds_fast.profiling -> ROOT/profiling
del _root

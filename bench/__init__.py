"""The benchmarks: scripts run from the checkout (`python bench/sampler.py ...`) and the parts they share.

Each script puts the checkout's root on sys.path, so its parts import as a package: `bench.models`
(the presets' random-weight models, their FLOP counts and our samplers in the bench's setting),
`bench.timing` (device synchronisation, the measured matmul peak, timed step loops, fidelity),
`bench.peers` (guided-diffusion's and MinimaxDiffusion's own samplers on the same work) and
`bench.report` (the ratios, the tables, the targets). profiling/torch_trace.py and the tests import
them the same way. Not installed with igds_fast (pyproject lists its packages).
"""

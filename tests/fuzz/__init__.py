"""Coverage-guided fuzzing of every receiving path with atheris (see docs/testing.rst, 'Fuzzing').

``python -m tests.fuzz --list`` names the targets (:mod:`tests.fuzz.targets`);
``python -m tests.fuzz TARGET [libFuzzer flags]`` fuzzes one, starting from the
seed corpus in ``tests/fuzz/corpus/TARGET`` (:mod:`tests.fuzz.make_corpus`
regenerates it).  This package imports nothing on import: :mod:`tests.fuzz.run`
must instrument the groupcomm modules before anything loads them.
"""

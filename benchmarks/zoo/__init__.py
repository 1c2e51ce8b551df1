"""The zoo sweep (``benchmarks/zoo_sweep.py``, docs/zoo.md), split by job.

- :mod:`benchmarks.zoo.checks`: the checks of one converted network (preservation in float64, a
  train step with finite gradients, save -> load bit for bit, batch independence, compile / fx /
  export) and the pieces they need (build, random norm affines, inputs per task);
- :mod:`benchmarks.zoo.record`: one architecture -> one JSON record, stage by stage;
- :mod:`benchmarks.zoo.pool`: the worker process, per-architecture time limit, crash isolation, resume;
- :mod:`benchmarks.zoo.report`: the Markdown summary of the records (``--summarize``).

Where the checks live, and why here: they are a test harness, not library API. They judge a
conversion by the sweep's own criteria, build networks with per-family input-size guesses, and
rebuild them with timm's and torch's init functions patched out (:class:`checks.no_init`); a user
verifying a conversion gets the library's own preservation check instead. So they stay out of the
installed ``ilmconvert`` package, in an importable ``benchmarks`` package that the sweep and
``tests/test_zoo_subset.py`` (and ``tests/helpers.py``) import explicitly.
"""

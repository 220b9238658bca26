"""Learn the per-structure atlas rules of the built-in reference sets and ship them with the package.

Writes ``MRISegAssist/mrisegassist/atlas/builtin/rules/<set>.<engine>.<strategy>.json`` for every built-in set,
engine and strategy of ``mrisegassist.atlas.refine.SHIPPED_*`` (``atlas`` = label fusion alone). Each file is
stamped with what the rules depend on (the installed atlases' content keys, the registration settings, the
structures, the engine's code, the learning procedure's version); at run time a file whose stamp differs is
reported as stale and the rules are learnt on first use instead. Re-run this script (and commit the files)
after changing the registration settings (``registration.FAST``), the learning procedure (``refine.VERSION``),
the engine's code (``refine.engine_code``: its module and the prompt package's common modules) or the built-in
atlases.
``--check`` only reports whether each shipped file is current (exit status 1 when one is not)::

    PYTHONPATH=MRISegAssist .venv/bin/python scripts/learn_atlas_rules.py [--check] [--sets brain] \\
        [--engines atlas,classical] [--strategies A,B]

Learning reads only the references (leave-one-source-out), never a patient's labels. Ctrl-C cancels.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    from mrisegassist.atlas import refine
    from mrisegassist.atlas.augment import augment
    from mrisegassist.atlas.builtin import builtin_reference_set
    from mrisegassist.atlas.registration import FAST
    from mrisegassist.progress import CancelToken, tqdm_progress

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default=",".join(name for name, _ in refine.SHIPPED_SETS),
                   help="comma-separated built-in sets (default: all shipped)")
    p.add_argument("--engines", default=",".join(e or "atlas" for e in refine.SHIPPED_ENGINES),
                   help="comma-separated engines; 'atlas' = label fusion alone")
    p.add_argument("--strategies", default=",".join(refine.SHIPPED_STRATEGIES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--check", action="store_true", help="only report whether the shipped files are current")
    args = p.parse_args(argv)
    augments = dict(refine.SHIPPED_SETS)
    cancel = CancelToken()
    stale = 0
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        refset = builtin_reference_set(name)
        if augments.get(name):
            refset = augment(refset, augments[name])
        for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
            for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
                label = f"builtin:{name} engine {engine} strategy {strategy}"
                rules, how = refine.shipped_rules(name, refset, engine, augment=augments.get(name), settings=FAST,
                                                  strategy=strategy)
                if args.check:
                    stale += rules is None
                    print(f"{label}: {'current' if rules is not None else 'NOT current'} ({how})")
                    continue
                if rules is not None:
                    print(f"{label}: current, kept ({how})")
                    continue
                progress, close = tqdm_progress(label)
                t0 = time.perf_counter()
                try:
                    path = refine.write_shipped_rules(name, refset, engine, augment=augments.get(name),
                                                      settings=FAST, strategy=strategy, device=args.device,
                                                      progress=progress, cancel=cancel)
                except KeyboardInterrupt:
                    cancel.cancel()
                    print("cancelled", file=sys.stderr)
                    return 130
                finally:
                    close()
                print(f"{label}: wrote {path} ({time.perf_counter() - t0:.0f} s; was: {how})")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

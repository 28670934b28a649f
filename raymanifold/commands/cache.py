"""``raymanifold cache``: where the run cache is, how big, and emptying it.

The run cache holds one copy of each checkpoint resolved from a ``runs:/<id>`` URI (and of every checkpoint a
training run logged), so Serve replicas, Ray Data actors and studies on this machine do not download it again.
It lives in ``<output root>/run_cache`` (``RAYMANIFOLD_CACHE`` overrides), is capped at
``RAYMANIFOLD_CACHE_MAX_GB`` (default 5; oldest files go first) and can always be emptied: the tracking store
keeps every checkpoint, and a deleted one is downloaded again when next needed.
"""
from __future__ import annotations

from raymanifold.commands import UsageError


def register(sub, study_sub):
    p = sub.add_parser("cache", help="the run cache of checkpoints downloaded from MLflow: info, clear")
    p.add_argument("action", nargs="?", default="info", choices=("info", "clear"),
                   help="info (default): location, files, size, cap; clear: delete cached checkpoints")
    p.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                   help="clear: only files not modified for this many days (default: all)")
    p.set_defaults(func=cmd_cache)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def cmd_cache(args) -> int:
    from raymanifold import tracking

    if args.older_than < 0:
        raise UsageError(f"--older-than: must be >= 0 days, got {args.older_than}")
    root = tracking.cache_dir()
    if args.action == "clear":
        n, freed = tracking.clear_cache(args.older_than)
        print(f"run cache {root}: deleted {n} checkpoint(s), {_gb(freed)}"
              + (f" (not modified for {args.older_than:g} days)" if args.older_than else ""))
        return 0
    files = tracking.cache_files(root)
    cap = tracking.cache_max_bytes()
    print(f"run cache: {root}")
    print(f"  {len(files)} checkpoint(s), {_gb(sum(p.stat().st_size for p in files))}; cap "
          f"{_gb(cap) if cap else 'none'} ({tracking.CACHE_MAX_GB_ENV}); empty it with `raymanifold cache clear`")
    return 0

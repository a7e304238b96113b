"""End-to-end benchmark (also `pyramid-kv bench-e2e`): see pyramid_kv/bench_e2e.py."""

from pyramid_kv.bench_e2e import main

if __name__ == "__main__":
    raise SystemExit(main())

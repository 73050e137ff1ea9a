"""Long fuzzing runs of the readers and the runtime loader (the suite runs them for seconds).

    python bench/fuzz.py --seconds 600

Runs tests/test_fuzz.py with SWAPMOE_FUZZ_SECONDS set, so every fuzz test mutates files for that
long: GGUF metadata through inspect and re-layout, safetensors headers, and whole loads of the
runtime (llama.cpp included) in subprocesses. A finding fails the run with the offending case.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300)
    a = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SWAPMOE_FUZZ_SECONDS": str(a.seconds)}
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", str(repo / "tests" / "test_fuzz.py")],
                             cwd=repo, env=env))


if __name__ == "__main__":
    main()

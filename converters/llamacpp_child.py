"""Child process of `swapmoe convert`: llama.cpp's converter classes writing the swap-ready layout.

    PYTHONPATH=<conv>/gguf-py:<conv> python -m swapmoe_gguf.converters.llamacpp_child \
        CONV HF_DIR OUT OUTTYPE ERRFILE [--intermediate] [--vocab sentencepiece] [--no-mtp] [--fuse-gate-up-exps]

A process of its own because llama.cpp's converter needs its own gguf-py (newer than the one the
runtime imports) and torch, neither of which belongs on the decoding path. It does what
`convert_hf_to_gguf.py`'s main() does (architecture -> class, lazy tensors), with the class's
`GGUFWriter` replaced by `SwapReadyGGUFWriter`. A failure writes one line to ERRFILE and exits 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _fail(errfile: str, line: str) -> None:
    Path(errfile).write_text(line.replace("\n", " ")[:600])
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("conv")
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("outtype", choices=_OUTTYPES)
    ap.add_argument("errfile")
    ap.add_argument("--intermediate", action="store_true", help="input for llama.cpp's quantizer: alignment 32")
    ap.add_argument("--vocab", choices=("auto", "sentencepiece"), default="auto")
    ap.add_argument("--no-mtp", action="store_true")
    ap.add_argument("--fuse-gate-up-exps", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    a = ap.parse_args(argv)
    held = _Held()
    logging.basicConfig(level=logging.DEBUG if a.verbose > 1 else logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", handlers=[] if a.verbose else [held])
    hf = Path(a.hf_dir)
    try:
        import gguf
    except ImportError as e:
        _fail(a.errfile, f"{a.conv}: llama.cpp's gguf-py cannot be imported ({e})")
    if not str(Path(gguf.__file__).resolve()).startswith(str(Path(a.conv).resolve())):
        _fail(a.errfile, f"internal: gguf-py from {gguf.__file__}, expected llama.cpp's in {a.conv}")
    try:
        import torch
    except ImportError:
        _fail(a.errfile, f"{hf}: llama.cpp's converter needs torch (pip install torch); "
                         "it is not installed in this environment")

    from ..base.errors import SwapMoEError
    from ..fileformat.constants import DEFAULT_ALIGNMENT, PAGE_ALIGNMENT
    from .llamacpp_writer import SwapReadyGGUFWriter

    try:
        from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    except Exception as e:  # noqa: BLE001
        _fail(a.errfile, f"{a.conv}: llama.cpp's converter cannot be imported ({type(e).__name__}: {e})")
    logging.getLogger("hf-to-gguf").setLevel(logging.INFO if a.verbose else logging.WARNING)

    try:
        hparams = ModelBase.load_hparams(hf, False)
        arch = get_model_architecture(hparams, ModelType.TEXT)
        try:
            cls = get_model_class(arch)
        except (NotImplementedError, KeyError):
            _fail(a.errfile, f"{hf / 'config.json'}: architecture {arch} is not supported: not known to llama.cpp's "
                             f"converter (llama-cpp-python {_version(a.conv)})")
        if a.no_mtp:
            if not getattr(cls, "supports_mtp_export", False):
                _fail(a.errfile, f"{hf}: --no-mtp is not supported for {arch} by llama.cpp's converter")
            cls.no_mtp = True
        if a.vocab == "sentencepiece":
            cls.set_vocab = lambda self: self._set_vocab_sentencepiece()  # type: ignore[method-assign]
        SwapReadyGGUFWriter.configure(DEFAULT_ALIGNMENT if a.intermediate else PAGE_ALIGNMENT,
                                      final=not a.intermediate, source=f"hf:{arch}")
        gguf.GGUFWriter = SwapReadyGGUFWriter  # the classes create `gguf.GGUFWriter(...)`: ours
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[a.outtype]
        with torch.inference_mode():
            model = cls(hf, ftype, Path(a.out), eager=False, fuse_gate_up_exps=a.fuse_gate_up_exps)
            _write(model, a.progress)
        w = SwapReadyGGUFWriter.instances[-1]
        print(f"arch={w.arch} n_expert={w.n_expert} moe_layers={len(w.moe_layers)}")
        held.show()
    except SystemExit:
        raise
    except SwapMoEError as e:
        _fail(a.errfile, f"{hf}: {e}")
    except FileNotFoundError as e:
        _fail(a.errfile, f"{e.filename or hf}: missing ({e.strerror or e})")
    except BaseException as e:  # noqa: BLE001  -- llama.cpp's converter raises anything; one line names it
        logging.getLogger(__name__).debug("conversion failed", exc_info=True)
        _fail(a.errfile, f"{hf}: llama.cpp's converter failed: {type(e).__name__}: {e}")


class _Held(logging.Handler):
    """The converter's warnings, shown once the conversion succeeded (a failure is one line, alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("swapmoe: %(levelname)s: llama.cpp's converter: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def show(self) -> None:  # (not `release`: logging.Handler's lock method)
        for line in dict.fromkeys(self.lines):
            print(line, file=sys.stderr)


def _write(model, progress: bool) -> None:  # type: ignore[no-untyped-def]
    """`ModelBase.write()`, with our progress bar instead of its own."""
    model.prepare_tensors()
    model.prepare_metadata(vocab_only=False)
    model.gguf_writer.write_header_to_file(path=model.fname_out)
    model.gguf_writer.write_kv_data_to_file()
    model.gguf_writer.write_tensors_to_file(progress=progress)
    model.gguf_writer.close()


def _version(conv: str) -> str:
    return Path(conv).name.rsplit("-", 1)[-1]


if __name__ == "__main__":
    main()

"""Text queries through ONNX Runtime: the text tower exported once, then run without PyTorch's per-op overhead.

A search server encodes short queries in small batches. There, a transformer's time in PyTorch's eager mode
goes as much to dispatching its hundreds of small operations as to arithmetic; ONNX Runtime runs the same
graph from C++ with fused kernels. On the 2-core dev machine the search server answered 2.4x as many text
queries with it (``benchmarks/search_server.py`` against ``--text-runtime torch``, docs/benchmarks.md).

The export is cached per model fingerprint and PyTorch version under ``cache_root()/onnx``, written
atomically. Before a session is used, it encodes a few probe texts of different lengths and is compared
with the PyTorch tower: if the export failed, the cached file is damaged, or the answers differ, the
encoder falls back to PyTorch (``auto``) or says why (``onnx``). ONNX Runtime comes with the ``search``
extra; the runtime only ever runs on CPU.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lipkit.errors import LipkitError

if TYPE_CHECKING:
    from lipkit.models import DualEncoder

PROBES = (
    "a cat",
    "a photo of two dogs playing in the snow",
    "an old red bicycle leaning against a brick wall next to a blue door in the morning light",
)
TOLERANCE = 1e-4  # largest difference allowed between the two runtimes' unit-length embeddings
INPUT_PREFIX, OUTPUT = "lipkit_text_", "lipkit_text_embedding"  # graph names apart from the tower's own
INSTALL = "pip install 'lipkit[search]' (or: pip install onnxruntime onnxscript)"


class OnnxTextError(LipkitError):
    """The text tower could not be run through ONNX Runtime."""


class OnnxTextRunner:
    """Encodes tokenized text with an ONNX Runtime session: (N, D) float32 unit rows.

    Args:
        session: An ``onnxruntime.InferenceSession`` of the text tower.
        names: The token record's fields the graph takes, in order (``("ids",)`` for a plain id tensor).
    """

    def __init__(self, session: Any, names: Sequence[str]) -> None:
        self.session = session
        self.names = tuple(names)

    def __call__(self, tokens: Any) -> np.ndarray:
        tensors = _token_tensors(tokens)
        feeds = {INPUT_PREFIX + name: t.numpy() for name, t in zip(self.names, tensors, strict=True)}
        return self.session.run(None, feeds)[0]


def onnx_text_runner(
    model: DualEncoder,
    tokenize: Callable[[list[str]], Any],
    fingerprint: str,
    required: bool = False,
    threads: int | None = None,
) -> OnnxTextRunner | None:
    """The model's text tower on ONNX Runtime, checked against PyTorch; None where it cannot be used.

    Args:
        model: The dual encoder, on CPU and in eval mode.
        tokenize: Its batch tokenizer (what :class:`~lipkit.index.encoder.QueryEncoder` uses).
        fingerprint: The model's fingerprint, which names the cached export.
        required: Raise instead of warning and returning None.
        threads: ONNX Runtime's intra-op threads (default: PyTorch's).

    Raises:
        OnnxTextError: ``required`` and ONNX Runtime is missing, the export fails, or it does not match.
    """
    try:
        return _checked_runner(model, tokenize, fingerprint, threads)
    except OnnxTextError as exc:
        if required:
            raise
        warnings.warn(f"{exc}; text queries run on PyTorch", stacklevel=2)
        return None


def _checked_runner(
    model: DualEncoder, tokenize: Callable[[list[str]], Any], fingerprint: str, threads: int | None
) -> OnnxTextRunner:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise OnnxTextError(f"ONNX Runtime is not installed: {INSTALL}") from None
    path = cache_root_onnx() / f"text-{fingerprint[:32]}-torch{torch.__version__.split('+')[0]}.onnx"
    example = tokenize(list(PROBES[:2]))
    names = _token_names(example)
    session = _open_cached(path, threads) if path.is_file() else None
    if session is None:
        _export(model, example, names, path)
        session = _open_cached(path, threads)
        if session is None:
            raise OnnxTextError(f"the text tower's ONNX export at {path} cannot be opened by ONNX Runtime")
    runner = OnnxTextRunner(session, names)
    _compare(model, tokenize, runner)
    return runner


def cache_root_onnx() -> Path:
    """Where exported text towers are kept."""
    from lipkit.utils import cache_root

    return cache_root() / "onnx"


def _export(model: DualEncoder, example: Any, names: tuple[str, ...], path: Path) -> None:
    """Export the text tower with a dynamic batch and length, then write the file atomically."""
    from lipkit.utils import atomic_write

    graph = _TextGraph(model, type(example) if is_dataclass(example) else None, names)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    shapes = (tuple({0: batch, 1: length} for _ in names),)  # forward(*inputs): one tuple argument
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph, tuple(_token_tensors(example)), dynamo=True, input_names=[INPUT_PREFIX + n for n in names],
                output_names=[OUTPUT], dynamic_shapes=shapes, verbose=False,
            )  # fmt: skip
            buffer = io.BytesIO()
            program.save(buffer, external_data=False)
    except Exception as exc:  # the exporter raises many kinds for a graph it cannot trace
        raise OnnxTextError(f"the text tower cannot be exported to ONNX ({_reason(exc)})") from None
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _reason(exc: Exception) -> str:
    """The line of an exporter error that says what failed (its message is pages of advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "## Exception summary" in lines[:-1]:
        lines = lines[lines.index("## Exception summary") + 1 :]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _open_cached(path: Path, threads: int | None) -> Any:
    """An ONNX Runtime session of ``path``, or None (a damaged file is removed)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # idle pool threads sleep instead of spinning: in a server they would take the cores that HTTP needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own error kinds for a truncated or garbled file
        warnings.warn(f"cached ONNX export {path} cannot be opened ({exc}); exporting again", stacklevel=3)
        path.unlink(missing_ok=True)
        return None


def _compare(model: DualEncoder, tokenize: Callable[[list[str]], Any], runner: OnnxTextRunner) -> None:
    """Both runtimes on the probe texts, one at a time and together: they must agree within TOLERANCE."""
    for batch in ([PROBES[0]], [PROBES[2]], list(PROBES)):
        tokens = tokenize(batch)
        with torch.inference_mode():
            expected = model.encode_text(tokens, normalize=True).float().numpy()
        got = runner(tokens)
        gap = float(np.abs(expected - got).max()) if got.shape == expected.shape else float("inf")
        if gap > TOLERANCE:
            raise OnnxTextError(f"the ONNX text tower differs from PyTorch's by {gap:.2g} (allowed {TOLERANCE})")


def _token_names(tokens: Any) -> tuple[str, ...]:
    if is_dataclass(tokens):
        return tuple(f.name for f in fields(tokens) if getattr(tokens, f.name) is not None)
    return ("ids",)


def _token_tensors(tokens: Any) -> list[torch.Tensor]:
    if is_dataclass(tokens):
        return [value for f in fields(tokens) if (value := getattr(tokens, f.name)) is not None]
    return [tokens]


class _TextGraph(nn.Module):
    """``encode_text(tokens, normalize=True)`` with the token record's tensors as plain inputs."""

    def __init__(self, model: DualEncoder, record: type | None, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.record, self.names = model, record, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        tokens = self.record(**dict(zip(self.names, inputs, strict=True))) if self.record else inputs[0]
        return self.model.encode_text(tokens, normalize=True)

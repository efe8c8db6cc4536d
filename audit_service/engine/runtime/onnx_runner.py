"""ONNX models through onnxruntime, with tensors kept on the model's device.

On CPU the input tensor's memory is handed to onnxruntime as a numpy view and the result wrapped
back without a copy; on CUDA, IO binding points onnxruntime at the torch tensors' device memory,
so no logits cross to the host. The session is built from the checked bytes, never from a path,
so it cannot resolve file references either (``load_model`` reads external data into the graph first).
"""

from __future__ import annotations

import os
import re
import threading

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..errors import ModelError, model_failures
from .base import ModelFormat
from .chunks import PROBE_BATCH, check_batch, probe_logits, run_chunked, run_in_fixed_batches
from .onnx_batch import RELAX_TOLERANCE, relax_batch
from .onnx_graph import GraphSignature, check_graph
from .onnx_outputs import select_probability_output
from .validation import short_error

THREADS_ENV = "AUDIT_ORT_THREADS"

_NP_TO_TORCH = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float64): torch.float64,
}


def session_threads() -> int:
    """intra-op threads: ``AUDIT_ORT_THREADS`` when set, else the cores this process may use."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def providers_for(device: torch.device) -> list:
    """CUDA first only for a CUDA device: onnxruntime-gpu lists CUDA as available even without a GPU."""
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRunner:
    """A checked ONNX classifier behind the ``ModelRunner`` protocol."""

    format: ModelFormat = "onnx"

    def __init__(self, data: bytes, model: onnx.ModelProto, sha256: str, device: torch.device) -> None:
        self.sha256 = sha256
        #: the external data files read into the graph (``external_data``; set by ``load_model``)
        self.external_data: tuple[str, ...] = ()
        model, output_note = select_probability_output(model)  # a classic ML export: label + probabilities
        if output_note is not None:
            data = model.SerializeToString()
        self._model: onnx.ModelProto | None = model
        self._signature: GraphSignature = check_graph(model)
        self.input_shape = self._signature.input_shape
        self.fixed_batch = self._signature.fixed_batch
        self._session = self._open_session(data, device)
        #: the backends, then what was done to the graph to run it (the output picked, the batch relaxed)
        self.providers = list(self._session.get_providers()) + ([output_note] if output_note else [])
        self.device = torch.device("cuda", device.index or 0) if device.type == "cuda" else torch.device("cpu")
        self.num_classes, self._output_dtype = self._probe()
        if self.fixed_batch is not None:
            self.providers.append(self._try_relaxed_batch(device))
        self.gradient_note: str | None = None
        #: how gradients are obtained, once ``torch_module()`` has run (see ``onnx_convert.Conversion``)
        self.gradient_path: str | None = None
        #: max |twin - onnxruntime| relative to max(1, logit scale) on the check batch, once converted
        self.twin_error: float | None = None
        self._module: torch.nn.Module | None = None
        self._module_done = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    def _open_session(self, data: bytes, device: torch.device, quiet: bool = False) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = session_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # errors only: provider fallbacks are reported through `providers`; a trial graph's failures are not errors
        options.log_severity_level = 4 if quiet else 3
        try:
            session = ort.InferenceSession(data, sess_options=options, providers=providers_for(device))
        except Exception as exc:
            raise ModelError(
                f"Expected a model onnxruntime can run, but building the session failed: {short_error(exc)}",
                field="model",
            ) from None
        if device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise ModelError(
                "Expected onnxruntime's CUDA execution provider to load for device 'cuda', but it did "
                "not (CUDA/cuDNN libraries missing?); use device 'cpu' or 'auto'",
                field="device",
            )
        return session

    def _probe(self) -> tuple[int, np.dtype]:
        """C and the logits' numpy dtype, from the probe every runner loads through (``chunks.probe_logits``)."""
        out = probe_logits(
            self._run_cpu,
            self.input_shape,
            torch.device("cpu"),
            self.fixed_batch or PROBE_BATCH,
            declared=self._signature.declared_classes,
        )
        return int(out.shape[1]), out.numpy().dtype

    def _try_relaxed_batch(self, device: torch.device) -> str:
        """Switch a fixed-batch graph to its relaxed copy (``onnx_batch``) when that runs whole batches and
        reproduces the fixed-batch runs on a seeded batch; says which, for the report's providers."""
        size = self.fixed_batch
        assert size is not None and self._model is not None
        kept = f"batch-{size} graph: {size} sample{'s' if size > 1 else ''} per run"
        relaxed, _ = relax_batch(self._model, size)
        try:
            session = self._open_session(relaxed.SerializeToString(), device, quiet=True)
        except ModelError as exc:
            return f"{kept} (relaxing its batch failed: {exc.message[-40:]})"
        sample = torch.rand((2 * size + 1, *self.input_shape), generator=torch.Generator().manual_seed(0))
        original = self._session
        try:
            reference = run_in_fixed_batches(self._run_cpu, sample, size)
            self._session, self.fixed_batch = session, None
            batched = self._run_cpu(sample)
        except Exception as exc:  # noqa: BLE001 - a graph that names its batch: keep one run per batch
            self._session, self.fixed_batch = original, size
            node = re.search(r"running (\w+) node", str(exc))
            return f"{kept} (relaxed, {f'its {node.group(1)} node' if node else 'it'} fails on a larger batch)"
        scale = float(reference.abs().max().clamp_min(1e-12))
        error = float((batched - reference).abs().max()) / scale if batched.shape == reference.shape else None
        if error is None or not error <= RELAX_TOLERANCE:
            self._session, self.fixed_batch = original, size
            why = f"differed by {error:.1g}" if error is not None else f"returned shape {tuple(batched.shape)}"
            return f"{kept} (relaxed, it {why})"
        self._model = relaxed  # the gradient twin is converted from the relaxed graph too
        return f"batch-{size} graph run over whole batches, its batch relaxed (checked: {error:.0g})"

    # ------------------------------------------------------------------ running
    def logits(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(N, *input_shape) -> (N, num_classes) float32 on ``device``, run in chunks of ``batch_size``."""
        x = check_batch(x, self.input_shape, self.device)
        size = self.fixed_batch or batch_size
        return run_chunked(self._forward, x, size, self.num_classes)

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        """A graph with a hard-coded batch gets full batches (``chunks.run_in_fixed_batches``: zero padding, its
        rows dropped)."""
        run = self._run_bound if self.device.type == "cuda" else self._run_cpu
        size = self.fixed_batch
        with model_failures(f"on a batch of {size or chunk.shape[0]}"):
            return run(chunk) if size is None else run_in_fixed_batches(run, chunk, size)

    def _run_cpu(self, chunk: torch.Tensor) -> torch.Tensor:
        array = chunk.contiguous().numpy()  # shares memory with the tensor
        if array.dtype != self._signature.input_dtype:
            array = array.astype(self._signature.input_dtype)
        (out,) = self._session.run([self._signature.output_name], {self._signature.input_name: array})
        return torch.from_numpy(np.asarray(out))

    def _run_bound(self, chunk: torch.Tensor) -> torch.Tensor:
        """IO binding on the torch tensors' own memory: on CUDA nothing is copied through the host.

        Used for CUDA devices; it works on CPU memory too, which is how the tests check the binding.
        """
        device_type = "cuda" if chunk.is_cuda else "cpu"
        index = (chunk.device.index or 0) if chunk.is_cuda else 0
        in_type = np.dtype(self._signature.input_dtype).type
        chunk = chunk.to(_NP_TO_TORCH[np.dtype(in_type)]).contiguous()
        out = torch.empty(
            (chunk.shape[0], self.num_classes), dtype=_NP_TO_TORCH[self._output_dtype], device=chunk.device
        )
        binding = self._session.io_binding()
        binding.bind_input(
            self._signature.input_name, device_type, index, in_type, tuple(chunk.shape), chunk.data_ptr()
        )
        binding.bind_output(
            self._signature.output_name, device_type, index, self._output_dtype.type, tuple(out.shape), out.data_ptr()
        )
        if chunk.is_cuda:
            torch.cuda.current_stream(chunk.device).synchronize()  # the input must be written before ORT reads it
        self._session.run_with_iobinding(binding)
        return out

    def _raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits without the finiteness check (for comparing against a converted module)."""
        x = check_batch(x, self.input_shape, self.device)
        return self._forward(x).float()

    # ------------------------------------------------------------------ gradients
    def torch_module(self) -> torch.nn.Module | None:
        """The graph converted by onnx2torch and checked against onnxruntime, or None (see ``gradient_note``)."""
        with self._lock:
            if not self._module_done:
                from .onnx_convert import convert_checked  # onnx2torch is slow to import; only when needed

                assert self._model is not None  # held until the conversion is done
                conversion = convert_checked(
                    self._model, self._raw_logits, self.input_shape, self.device, self.fixed_batch
                )
                self._module, self.gradient_note = conversion.module, conversion.note
                self.twin_error = conversion.max_error
                if conversion.module is not None:
                    steps = f" after {', '.join(conversion.steps)}" if conversion.steps else ""
                    self.gradient_path = (
                        f"onnx2torch twin{steps}; max |twin - onnxruntime| "
                        f"{conversion.max_error:.1e} (relative to max(1, |logits|))"
                    )
                self._module_done = True
                self._model = None  # the protobuf (up to the size cap) is not needed any more
        return self._module

    def __repr__(self) -> str:
        return (
            f"OnnxRunner(input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"device={self.device}, providers={self.providers}, sha256={self.sha256[:12]}...)"
        )

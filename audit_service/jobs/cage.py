"""The model cage: the audited model runs alone in its own confined process; the engine never shares a
byte of memory or a writable file with it.

Why: a TorchScript or ``.pt2`` model is a program, and a program in the engine's process can reach whatever
that process decides from (its files, its memory, its exit status). So the sandbox is two processes:

* the **engine** (``jobs.sandbox``): our code. It reads the task, the probes and labels, computes every metric,
  the verdict and the report, and writes ``result.json`` and ``progress.json`` into its work dir;
* the **cage** (this module), forked by the engine after the engine confined itself, confined once more
  (Landlock nested inside the engine's: read the Python environment and the model's own files, write
  ``WORKDIR/cage`` only; the same seccomp filter; every other descriptor sealed; ``PR_SET_PDEATHSIG``). It
  loads the model and answers requests on a socket pair: logits, forward passes with a kept autograd graph
  and vector-Jacobian products on it, the layout check, the symmetrized export.

The model sees its inputs and returns tensors; nothing else of the audit passes through it. The engine checks
every reply (shape, dtype, finiteness, size before it reads) and treats the cage's death as the model's crash.
What the cage can still do is what any black box can: answer differently when it is being audited.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch

from ..engine.errors import AuditError, ModelError, ModelRuntimeError, ProbeError, SpecError
from ..engine.runtime.chunks import check_batch, check_finite
from ..engine.runtime.layout import LayoutChoice
from ..engine.runtime.validation import MAX_INPUT_ELEMENTS, max_model_bytes
from .failures import cap_text, classify_exception, signal_reason
from .wire import WireError, receive, send

#: graphs the cage keeps until their one vector-Jacobian product (the engine differentiates each graph once)
MAX_GRAPHS = 2
#: the most the engine sends in one request (a batch of inputs)
MAX_REQUEST_BYTES = 8 << 30
#: how long a cage may take to leave after it was asked to
EXIT_GRACE_S = 5.0
_ERRORS = {cls.__name__: cls for cls in (AuditError, ModelError, ModelRuntimeError, ProbeError, SpecError)}


class CageCrashed(RuntimeError):
    """The model's process ended (or broke the protocol) while the engine waited on it."""


# ============================================================================ the engine's side
class Cage:
    """The engine's end of one caged model process: requests, replies, and the process's end."""

    def __init__(self, pid: int, sock: socket.socket, directory: Path,
                 model_data: dict[str, str] | None = None) -> None:
        self.pid, self.sock, self.directory = pid, sock, directory
        #: the ONNX model's external data files {name: path}, granted to the cage and hashed here with the model
        self.model_data = dict(model_data or {})
        #: the data files the last loaded model's graph named (the cage's word; None before a load)
        self.external_data: tuple[str, ...] | None = None
        self._free: list[int] = []
        self._status: int | None = None

    def call(self, header: dict, tensors: Sequence[torch.Tensor] = (),
             shapes: Sequence[tuple[int, ...]] = ()) -> tuple[dict, list[torch.Tensor]]:
        """One request; the reply must carry exactly ``shapes`` (floating point) or an error, which is raised."""
        if self._free:
            header = {**header, "free": self._free}
            self._free = []
        limit = sum(8 * max(1, _numel(s)) for s in shapes) + 64
        try:
            send(self.sock, header, tensors)
            reply, out = receive(self.sock, max_tensor_bytes=limit)
        except (WireError, OSError) as exc:
            raise self._crashed(exc) from None
        if isinstance(reply.get("error"), dict):
            raise _remote_error(reply["error"])
        if len(out) != len(shapes) or any(tuple(t.shape) != tuple(s) or not t.is_floating_point()
                                          for t, s in zip(out, shapes)):
            got = [tuple(t.shape) for t in out]
            raise ModelRuntimeError(f"Expected the model's process to return tensors of shape {list(shapes)}, "
                                    f"but it returned {got}", field="model")
        return reply, out

    def release(self, handle: int) -> None:
        self._free.append(handle)  # sent with the next request: a finalizer must not talk on the socket

    def load(self, path: str | Path, device: str | torch.device = "auto", max_bytes: int | None = None,
             input_shape: Sequence[int] | None = None) -> "CagedRunner":
        """``runtime.load_model``'s signature, loaded in the cage: the engine's ``load``."""
        reply, _ = self.call({"op": "load", "model": str(path), "device": str(device), "max_bytes": max_bytes,
                              "input_shape": list(input_shape) if input_shape is not None else None})
        runner = CagedRunner(self, _checked_info(reply), path, max_bytes)
        self.external_data = runner.external_data
        return runner

    def symmetrize(self, spec: dict, output: Path) -> dict:
        reply, _ = self.call({"op": "symmetrize", "spec": spec, "output": str(output)})
        return {"group": str(reply.get("group"))[:200], "order": int(reply.get("order", 0)),
                "input_shape": [int(d) for d in reply.get("input_shape", [])][:8]}

    def close(self) -> int | None:
        """Ask the cage to leave, then make sure it has: SIGKILL after ``EXIT_GRACE_S``. Its exit status."""
        try:
            send(self.sock, {"op": "exit"})
        except OSError:
            pass
        deadline = time.monotonic() + EXIT_GRACE_S
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.poll() is None:
            _kill(self.pid)
            while self.poll() is None:
                time.sleep(0.01)
        self.sock.close()
        return self._status

    def poll(self) -> int | None:
        if self._status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self._status = -signal.SIGKILL
                return self._status
            if pid:
                self._status = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self._status

    def _crashed(self, exc: BaseException) -> CageCrashed:
        deadline = time.monotonic() + 2.0
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        rc = self.poll()
        if rc is None:
            _kill(self.pid)
            return CageCrashed(f"the model's process broke the protocol ({exc}) and was killed")
        if rc < 0:
            return CageCrashed(f"the model's process {signal_reason(rc)[1]}")
        return CageCrashed(f"the model's process exited with status {rc} mid-request")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _remote_error(err: dict) -> BaseException:
    """The cage's ``{type, message, field}`` as the exception the engine would have seen in-process."""
    kind = str(err.get("type") or "")[:64]
    message = cap_text(str(err.get("message") or "the model failed"))
    field = str(err["field"])[:128] if err.get("field") else None
    if kind in _ERRORS:
        return _ERRORS[kind](message, field=field)
    if kind == "out_of_memory":
        return MemoryError(message)
    return _named(kind)(message)


_NAMED: dict[str, type] = {}


def _named(kind: str) -> type:
    """A ``RuntimeError`` subclass named like the cage's exception, so messages read as they did in-process."""
    name = kind if kind.isidentifier() else "ModelFailure"
    if name not in _NAMED:
        _NAMED[name] = type(name, (RuntimeError,), {"__module__": "model"})
    return _NAMED[name]


def _checked_info(reply: dict) -> dict:
    """The cage's description of its model, held to types and sizes (it is the model's word, not ours)."""
    try:
        shape = tuple(int(d) for d in reply["input_shape"])
        info = {"format": str(reply["format"]), "input_shape": shape, "num_classes": int(reply["num_classes"]),
                "device": torch.device(str(reply["device"])), "providers": [str(p)[:100] for p in reply["providers"]][:8],
                "gradient_note": _short(reply.get("gradient_note")), "gradient_path": _short(reply.get("gradient_path")),
                "twin_error": float(reply["twin_error"]) if reply.get("twin_error") is not None else None,
                "has_module": bool(reply["has_module"]),
                "external_data": tuple(str(n)[:255] for n in reply.get("external_data") or ())[:1000]}
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelRuntimeError(f"Expected the model's process to describe the model, but it sent {exc!r}",
                                field="model") from None
    if (info["format"] not in ("onnx", "torchscript", "pt2") or not 1 <= len(shape) <= 8
            or min(shape) < 1 or _numel(shape) > MAX_INPUT_ELEMENTS or not 1 <= info["num_classes"] <= 1 << 20
            or info["device"].type not in ("cpu", "cuda")):
        raise ModelRuntimeError(f"Expected the model's process to describe a classifier, but it sent {reply!r:.300}",
                                field="model")
    return info


def _short(value: Any) -> str | None:
    return None if value is None else cap_text(str(value), 300)


class CagedRunner:
    """The ``ModelRunner`` of a model that lives in a cage: same protocol, every call a request."""

    def __init__(self, cage: Cage, info: dict, path: str | Path, max_bytes: int | None) -> None:
        self.cage = cage
        self.input_shape: tuple[int, ...] = info["input_shape"]
        self.num_classes: int = info["num_classes"]
        self.device: torch.device = info["device"]
        self.providers: list[str] = info["providers"]
        self.gradient_note: str | None = info["gradient_note"]
        self.gradient_path: str | None = info["gradient_path"]
        self.twin_error: float | None = info["twin_error"]
        self.external_data: tuple[str, ...] = info["external_data"]
        self.sha256, magic = _digest(path, max_bytes, cage.model_data)
        # the format from the file's own bytes: a zip is a program (the cage says which), else ONNX
        self.format = info["format"] if magic == b"PK" and info["format"] != "onnx" else "onnx"
        self._module = CagedModule(self) if info["has_module"] else None

    def logits(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        x = check_batch(x, self.input_shape, self.device)
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        header = {"op": "logits", "batch_size": int(batch_size),
                  "autocast": str(autocast).removeprefix("torch.") if autocast is not None else None}
        _, (y,) = self.cage.call(header, [x], [(x.shape[0], self.num_classes)])
        y = y.to(device=self.device, dtype=torch.float32)
        check_finite(y)
        return y

    def forward(self, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, int | None]:
        """The differentiable module's output on ``x``; with ``grad``, the handle of the graph the cage keeps."""
        reply, (y,) = self.cage.call({"op": "forward", "grad": grad}, [x], [(x.shape[0], self.num_classes)])
        return y.to(device=x.device, dtype=x.dtype), (int(reply["handle"]) if grad else None)

    def vjp(self, handle: int, grad_y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        _, (gx,) = self.cage.call({"op": "vjp", "handle": handle}, [grad_y], [tuple(like.shape)])
        return gx.to(device=like.device, dtype=like.dtype)

    def torch_module(self) -> torch.nn.Module | None:
        return self._module

    def __repr__(self) -> str:
        return f"CagedRunner({self.format}, pid={self.cage.pid}, input_shape={self.input_shape})"


def _digest(path: str | Path, max_bytes: int | None, model_data: dict[str, str]) -> tuple[str, bytes]:
    """The runtime's ``model_sha256`` of the model file and the external data files the engine staged."""
    from ..engine.runtime.external_data import model_files_sha256

    return model_files_sha256(path, model_data, max_bytes or max_model_bytes())


class CagedModule(torch.nn.Module):
    """The caged model's differentiable module: forward passes and their gradients happen in the cage."""

    def __init__(self, runner: CagedRunner) -> None:
        super().__init__()
        self._runner = [runner]  # a list: not registered as a submodule
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _RemoteForward.apply(x, self._runner[0])
        return self._runner[0].forward(x.detach(), grad=False)[0]

    def choose_own_layout(self, input_shape: tuple[int, ...], requested: str, sample: torch.Tensor) -> LayoutChoice:
        """``runtime.layout.choose_layout``, run where the weights are."""
        reply, _ = self._runner[0].cage.call({"op": "layout", "requested": requested,
                                              "input_shape": list(input_shape)}, [sample])
        fmt = "channels_last" if reply.get("memory_format") == "channels_last" else "contiguous"
        return LayoutChoice(fmt, cap_text(str(reply.get("reason")), 300))

    def cuda_batch_limit(self, x: torch.Tensor) -> int:
        reply, _ = self._runner[0].cage.call({"op": "batch_limit"}, [x[:4]])
        return max(1, int(reply.get("limit", 1)))


class _Graph:
    """A graph kept in the cage, released (with the next request) when the engine's autograd node goes."""

    def __init__(self, runner: CagedRunner, handle: int) -> None:
        self.runner, self.handle = runner, handle
        weakref.finalize(self, runner.cage.release, handle)


class _RemoteForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, runner: CagedRunner) -> torch.Tensor:  # type: ignore[override]
        y, handle = runner.forward(x.detach(), grad=True)
        ctx.graph = _Graph(runner, handle)
        ctx.like = torch.empty_like(x, device="meta")
        ctx.x_device = x.device
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        like = torch.empty(ctx.like.shape, dtype=ctx.like.dtype, device=ctx.x_device)
        return ctx.graph.runner.vjp(ctx.graph.handle, grad_y, like), None


# ============================================================================ starting a cage
def start_cage(cage_dir: Path, readable: Sequence[str], model_data: dict[str, str] | None = None) -> Cage:
    """Fork the cage (call this single-threaded, before any model work): it confines itself to reading the
    environment and ``readable`` and writing ``cage_dir``, then serves requests until told to leave.
    ``model_data``: the model's external data files {name: path} (``readable`` grants them)."""
    (cage_dir / "tmp").mkdir(parents=True, exist_ok=True)
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the cage
        rc = 1
        try:
            ours.close()
            rc = _cage_main(theirs, cage_dir, list(readable))
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            os._exit(rc)
    theirs.close()
    return Cage(pid, ours, cage_dir, model_data)


def _cage_main(sock: socket.socket, cage_dir: Path, readable: list[str]) -> int:  # pragma: no cover - the cage
    from .confine import confine_paths, die_with_parent, seal_descriptors

    die_with_parent()
    seal_descriptors(keep={0, 1, 2, sock.fileno()})
    tmp = str((cage_dir / "tmp").resolve())
    os.environ.update({"TMPDIR": tmp, "HOME": tmp, "XDG_CACHE_HOME": tmp, "CUDA_CACHE_PATH": tmp,
                       "TORCHINDUCTOR_CACHE_DIR": tmp})
    import tempfile

    tempfile.tempdir = None
    os.chdir(cage_dir)
    refused = None
    try:
        confine_paths(readable, cage_dir, model=readable[0] if readable else None)
    except AuditError as exc:  # the file system could not be confined: no program is loaded here
        refused = exc
    return _Server(sock, refused).run()


class _Server:
    """The cage's request loop (one request at a time, in order)."""

    def __init__(self, sock: socket.socket, refused: AuditError | None) -> None:
        self.sock, self.refused = sock, refused
        self.runner: Any = None
        self.graphs: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.next_handle = 0

    def run(self) -> int:
        while True:
            try:
                header, tensors = receive(self.sock, MAX_REQUEST_BYTES)
            except WireError:
                return 0  # the engine is gone
            if header.get("op") == "exit":
                return 0
            for handle in header.get("free", []):
                self.graphs.pop(handle, None)
            try:
                reply, out = getattr(self, f"_op_{header.get('op')}")(header, tensors)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - the model's failure is the engine's to report
                reply, out = {"error": _describe(exc)}, []
            send(self.sock, reply, out)

    def _op_load(self, header: dict, _tensors: list) -> tuple[dict, list]:
        if self.refused is not None:
            raise self.refused
        from ..engine.runtime import load_model

        runner = self.runner = load_model(header["model"], device=header["device"], max_bytes=header.get("max_bytes"),
                                          input_shape=header.get("input_shape"))
        module = runner.torch_module()
        return {"format": runner.format, "input_shape": list(runner.input_shape), "num_classes": runner.num_classes,
                "device": str(runner.device), "providers": list(runner.providers),
                "gradient_note": runner.gradient_note, "gradient_path": getattr(runner, "gradient_path", None),
                "twin_error": getattr(runner, "twin_error", None), "has_module": module is not None,
                "external_data": list(getattr(runner, "external_data", ()))}, []

    def _op_logits(self, header: dict, tensors: list) -> tuple[dict, list]:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(header.get("autocast") or "")
        ctx = torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            y = self.runner.logits(tensors[0].to(self.runner.device), int(header["batch_size"]))
        return {}, [y.float()]

    def _op_forward(self, header: dict, tensors: list) -> tuple[dict, list]:
        module = self._module()
        x = tensors[0].to(self.runner.device)
        if not header.get("grad"):
            with torch.no_grad():
                return {}, [module(x).detach()]
        x.requires_grad_(True)
        with torch.enable_grad():
            y = module(x)
        handle, self.next_handle = self.next_handle, self.next_handle + 1
        self.graphs[handle] = (x, y)
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return {"handle": handle}, [y.detach()]

    def _op_vjp(self, header: dict, tensors: list) -> tuple[dict, list]:
        handle = int(header["handle"])
        if handle not in self.graphs:
            raise RuntimeError(f"graph {handle} was used or dropped already: the engine differentiates each "
                               f"forward pass once")
        x, y = self.graphs.pop(handle)  # used once, freed as it is used (as autograd.grad without retain_graph)
        (gx,) = torch.autograd.grad(y, x, tensors[0].to(device=y.device, dtype=y.dtype))
        return {}, [gx]

    def _op_layout(self, header: dict, tensors: list) -> tuple[dict, list]:
        from ..engine.runtime.layout import choose_layout

        choice = choose_layout(self._module(), tuple(header["input_shape"]), header["requested"],
                               tensors[0].to(self.runner.device))
        return {"memory_format": choice.memory_format, "reason": choice.reason}, []

    def _op_batch_limit(self, _header: dict, tensors: list) -> tuple[dict, list]:
        from ..engine.metrics.saliency import cuda_batch_limit

        x = tensors[0].to(self.runner.device)
        return {"limit": cuda_batch_limit(self._module(), x) if x.is_cuda else 1 << 30}, []

    def _op_symmetrize(self, header: dict, _tensors: list) -> tuple[dict, list]:
        from ..engine.groups import build_group
        from ..engine.spec import parse_audit_spec
        from ..engine.symmetrization import export_symmetrized_onnx

        spec = parse_audit_spec(header["spec"])
        group = build_group(spec.group, tuple(self.runner.input_shape))
        if not group.exact:
            raise SpecError(f"Expected an exact finite group to average over, but {group.name} is sampled or "
                            f"interpolated: an average over it would not be invariant", field="group")
        export_symmetrized_onnx(self._module(), group, tuple(self.runner.input_shape), header["output"])
        return {"group": group.name, "order": int(group.order), "input_shape": list(self.runner.input_shape)}, []

    def _module(self) -> torch.nn.Module:
        module = self.runner.torch_module() if self.runner is not None else None
        if module is None:
            note = getattr(self.runner, "gradient_note", None) or "it could not be converted"
            raise AuditError(f"Expected a model with a torch twin, but this model has none ({note})", field="model")
        return module


def _describe(exc: BaseException) -> dict:
    """What the engine needs to raise the same error: AuditErrors by class, memory as such, else by name."""
    described = classify_exception(exc)
    if isinstance(exc, AuditError) or described["type"] == "out_of_memory":
        return described
    from ..engine.runtime.validation import short_error

    return {"type": type(exc).__name__, "message": short_error(exc, 500), "field": None}


"""``torch.export`` programs (``torch.export.save`` -> ``.pt2``) without unpickling anything.

What ``torch.export.load`` (torch 2.14, ``torch/export/pt2_archive/_package.py``) does with a file:
the graph is JSON (``models/model.json``) and plain weights and tensor constants are raw bytes
described by JSON configs, which is safe; but it also

* unpickles every weight or constant marked ``use_pickle`` (tensor subclasses) with
  ``torch.load`` with ``weights_only=False``, and constants named ``custom_obj_*`` / ``opaque_obj_*`` with
  TorchScript's and Python's unpickler;
* reads the legacy ``data/weights/<model>.pt`` and older zip layouts through ``torch.load``;
* unpickles the example inputs (``data/sample_inputs/<model>.pt``) with ``weights_only=True`` and,
  when that fails, **retries with** ``weights_only=False`` — arbitrary code for a crafted file;
* loads AOTInductor shared libraries (``data/aotinductor/``), i.e. native code.

So this module checks the archive with ``zipfile`` and JSON only (an allowlist of members, no
``use_pickle`` entries, no custom/opaque objects, graph targets in the ``aten`` / ``prims``
namespaces, sample inputs whose pickle names only tensor-rebuilding globals) and then rebuilds the
program from the same pieces ``torch.export.load`` uses, passing *no* sample inputs, so nothing is
unpickled at all. The example inputs are not needed: the input shape comes from the graph.
"""

from __future__ import annotations

import io
import json
import pickletools
import warnings
import zipfile

import torch

from ..errors import AuditError, ModelError
from .base import ModelFormat
from .chunks import (GuardedModule, check_inputs, forward_without_grad, pad_batch, probe_num_classes,
                     run_chunked, run_in_fixed_batches)
from .validation import check_input_shape, is_pt2_archive, short_error  # noqa: F401 - re-exported

PROBE_BATCH = 2
MODEL_NAME = "model"
_ALLOWED_TARGET_PREFIXES = ("torch.ops.aten.", "torch.ops.prims.", "_operator.", "torch.sym_", "math.")
#: globals a pickle of plain tensors (what torch.save writes for example inputs) may name
_TENSOR_PICKLE_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
                          ("torch._utils", "_rebuild_parameter"), ("collections", "OrderedDict"),
                          ("torch", "Size"), ("torch", "device"), ("builtins", "tuple"), ("builtins", "dict")}


def _refuse(why: str) -> ModelError:
    return ModelError(f"Expected a torch.export archive (torch.export.save) that loads without unpickling, but "
                      f"{why}", field="model")


def check_pt2_archive(data: bytes) -> None:
    """``ModelError`` unless the archive holds one exported program that loads with no pickle at all."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise _refuse(f"the zip is damaged: {exc}") from None
    with archive:
        names = archive.namelist()
        roots = {name.split("/", 1)[0] for name in names}
        if len(roots) != 1 or any("/" not in name for name in names):
            raise _refuse("its members do not sit under one archive folder")
        (root,) = roots
        members = {name[len(root) + 1:]: name for name in names}
        for rel in members:
            if rel.startswith("data/aotinductor/") or rel.startswith("data/executorch/"):
                raise _refuse(f"it carries compiled native code ('{rel}'), which is never loaded; save the "
                              "program alone with torch.export.save(ep, path)")
            allowed = (rel in ("archive_format", "archive_version", "byteorder", ".data/version",
                               ".data/serialization_id", f"models/{MODEL_NAME}.json")
                       or rel.startswith(("data/weights/weight_", "data/constants/tensor_", "extra/"))
                       or rel in (f"data/weights/{MODEL_NAME}_weights_config.json",
                                  f"data/constants/{MODEL_NAME}_constants_config.json",
                                  f"data/sample_inputs/{MODEL_NAME}.pt"))
            if not allowed:
                raise _refuse(f"it holds '{rel}', which is not part of a single saved program (weights saved in "
                              "the legacy pickled format, custom objects, or a second program are refused)")
        for config in (f"data/weights/{MODEL_NAME}_weights_config.json",
                       f"data/constants/{MODEL_NAME}_constants_config.json", f"models/{MODEL_NAME}.json"):
            if config not in members:
                raise _refuse(f"'{config}' is missing (saved by an older torch? re-save with torch.export.save)")
        for config in (f"data/weights/{MODEL_NAME}_weights_config.json",
                       f"data/constants/{MODEL_NAME}_constants_config.json"):
            entries = _json(archive, members[config]).get("config", {})
            for fqn, meta in entries.items():
                if not isinstance(meta, dict) or meta.get("use_pickle") or not meta.get("tensor_meta"):
                    raise _refuse(f"'{fqn}' is stored as a pickle (a tensor subclass or a custom object), and "
                                  "torch.export.load would unpickle it with weights_only=False")
                path = str(meta.get("path_name", ""))
                if not path.startswith(("weight_", "tensor_")):
                    raise _refuse(f"'{fqn}' is stored as '{path}', not as raw tensor bytes")
        _check_targets(_json(archive, members[f"models/{MODEL_NAME}.json"]))
        sample = members.get(f"data/sample_inputs/{MODEL_NAME}.pt")
        if sample is not None:
            _check_sample_inputs(archive.read(sample))


def _json(archive: zipfile.ZipFile, name: str) -> dict:
    try:
        value = json.loads(archive.read(name))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse(f"'{name}' is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _refuse(f"'{name}' does not hold a JSON object")
    return value


def _check_targets(program: dict) -> None:
    graph = program.get("graph_module", {}).get("graph", {})
    if graph.get("custom_obj_values"):
        raise _refuse("the graph uses custom (TorchScript-class) objects, which load through a pickle")
    for node in graph.get("nodes", []):
        target = str(node.get("target", ""))
        if not target.startswith(_ALLOWED_TARGET_PREFIXES):
            raise _refuse(f"the graph calls '{target}'; only core ATen/prims operators are accepted "
                          "(custom operators need the exporter's Python code)")


def _check_sample_inputs(blob: bytes) -> None:
    """The example-input pickle may name only tensor-rebuilding globals (it is still never unpickled)."""
    if not blob:
        return
    pickles: list[bytes] = []
    if blob[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as inner:
                pickles = [inner.read(n) for n in inner.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise _refuse(f"its example inputs are a damaged archive ({exc})") from None
    else:
        pickles = [blob]
    for data in pickles:
        for module, name in pickle_globals(data):
            ok = (module, name) in _TENSOR_PICKLE_GLOBALS or (
                module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)))
            if not ok:
                raise _refuse(f"its example inputs are a pickle that names '{module}.{name}'; torch.export.load "
                              "retries such a pickle with weights_only=False, which runs arbitrary code")


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """(module, name) of every global a pickle imports, read with pickletools (nothing is executed).

    ``STACK_GLOBAL`` takes its names from the stack; they are tracked through string pushes and the
    memo. A name that cannot be resolved statically is reported as ``("?", "?")`` (refused).
    """
    found: list[tuple[str, str]] = []
    strings: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append((module, attr))
            elif name == "STACK_GLOBAL":
                module, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
                found.append((module or "?", attr or "?"))
                strings.append(None)
            elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                          "BINSTRING", "STRING"):
                strings.append(str(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = strings[-1] if strings else None
            elif name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                strings.append(memo.get(int(arg)))
            elif name not in ("PROTO", "FRAME", "MARK"):
                strings.append(None)
    except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and friends on junk
        raise _refuse(f"its example inputs are not a readable pickle ({short_error(exc)})") from None
    return found


def load_program(data: bytes):
    """The ``ExportedProgram`` in a checked archive, rebuilt without example inputs (no unpickling)."""
    check_pt2_archive(data)
    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
        from torch.export.pt2_archive._package import PT2ArchiveReader, _load_constants, _load_state_dict

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = PT2ArchiveReader(io.BytesIO(data))
            serialized = _bytes_to_dataclass(schema.ExportedProgram,
                                             reader.read_bytes(f"models/{MODEL_NAME}.json"))
            state_dict = _load_state_dict(reader, MODEL_NAME)
            constants = _load_constants(reader, MODEL_NAME)
            if not isinstance(state_dict, dict) or not isinstance(constants, dict):
                raise _refuse("its weights are in the legacy pickled format")
            return ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, b"")
    except AuditError:
        raise
    except Exception as exc:
        raise ModelError(f"Expected a torch.export archive this torch ({torch.__version__}) can read, but "
                         f"loading failed: {short_error(exc)}", field="model") from None


class ExportedProgramRunner:
    """A ``torch.export`` classifier behind the ``ModelRunner`` protocol; its module is differentiable."""

    format: ModelFormat = "pt2"

    def __init__(self, data: bytes, sha256: str, device: torch.device,
                 input_shape: tuple[int, ...] | None = None) -> None:
        self.sha256 = sha256
        self.device = device
        self.providers = [f"torch.export ({device})"]
        self.gradient_note: str | None = None
        self.gradient_path = "torch.export program (autograd through its ATen graph)"
        program = load_program(data)
        shape, self.fixed_batch, min_batch, declared = _signature(program)
        if input_shape is not None and shape is not None and tuple(input_shape) != shape:
            raise ModelError(f"Expected probes of the program's input shape {shape}, but they have shape "
                             f"{tuple(input_shape)}", field="probes")
        shape = shape or (tuple(input_shape) if input_shape is not None else None)
        if shape is None:
            raise ModelError("Expected the program to fix every input size but the batch, but some are dynamic; "
                             "pass probes so that the shape is known", field="input_shape")
        self.input_shape = check_input_shape(list(shape), "the exported program's input")
        try:
            module = program.module()
            module = module.to(device)
        except Exception as exc:
            raise ModelError(f"Expected an exported program that runs as a module, but: {short_error(exc)}",
                             field="model") from None
        for param in module.parameters():
            param.requires_grad_(False)
        self._module = module
        self._guarded = GuardedModule(_BatchSizes(module, self.fixed_batch, min_batch))
        self._guarded.training = False  # exported programs refuse .eval(); they were traced in their mode
        self.num_classes = self._probe(declared)

    def _probe(self, declared: int | None) -> int:
        classes = probe_num_classes(self._module, self.input_shape, self.device, self.fixed_batch or PROBE_BATCH,
                                    "the program")
        if declared is not None and declared != classes:
            raise ModelError(f"Expected the {declared} classes the program declares, but it returned {classes}",
                             field="model")
        return classes

    def logits(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(N, *input_shape) -> (N, num_classes) float32 on ``device``, run in chunks of ``batch_size``."""
        x = check_inputs(x, self.input_shape, self.device)
        return run_chunked(self._forward, x, self.fixed_batch or batch_size, self.num_classes)

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        return forward_without_grad(self._guarded.inner, chunk)  # _BatchSizes: padding, one tensor out

    def torch_module(self) -> torch.nn.Module:
        return self._guarded

    def __repr__(self) -> str:
        return (f"ExportedProgramRunner(input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"device={self.device}, sha256={self.sha256[:12]}...)")


class _BatchSizes(torch.nn.Module):
    """The program's module returning one tensor; batches are padded to what the program accepts
    (its hard-coded batch size, or the lower bound of its dynamic batch, e.g. 2 for ``Dim("batch")``)."""

    def __init__(self, module: torch.nn.Module, fixed_batch: int | None, min_batch: int = 1) -> None:
        super().__init__()
        self.program = module
        self.fixed_batch = fixed_batch
        self.min_batch = min_batch

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        out = self.program(x)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_batch is None:
            return self._call(pad_batch(x, self.min_batch))[:x.shape[0]]
        return run_in_fixed_batches(self._call, x, self.fixed_batch)


def _signature(program) -> tuple[tuple[int, ...] | None, int | None, int, int | None]:
    """(per-sample input shape or None when a non-batch size is dynamic, fixed batch or None, the smallest
    batch a dynamic batch accepts, classes or None)."""
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelError(f"Expected a program with exactly one input tensor (a batch of samples), but got "
                         f"{len(user_inputs)}: {', '.join(map(str, user_inputs)) or 'none'}", field="model")
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    value = nodes[user_inputs[0]].meta.get("val") if user_inputs[0] in nodes else None
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        raise ModelError("Expected the program's input to be a tensor of shape (batch, ...), rank >= 2",
                         field="model")
    batch, *rest = value.shape
    fixed = int(batch) if isinstance(batch, int) else None
    min_batch = 1
    if fixed is None:
        try:
            lower = program.range_constraints[batch.node.expr].lower
            min_batch = max(1, int(lower))
        except Exception:  # noqa: BLE001 - no constraint recorded: any batch size
            min_batch = 1
    shape = tuple(int(d) for d in rest) if all(isinstance(d, int) for d in rest) else None
    declared = None
    outputs = [n for n in program.graph.nodes if n.op == "output"]
    if outputs and outputs[0].args and isinstance(outputs[0].args[0], (tuple, list)):
        results = outputs[0].args[0]
        if len(results) != 1:
            raise ModelError(f"Expected a program with exactly one output (the logits), but it returns "
                             f"{len(results)}", field="model")
        val = getattr(results[0], "meta", {}).get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 2 and isinstance(val.shape[1], int):
            declared = int(val.shape[1])
    return shape, fixed, min_batch, declared

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
``use_pickle`` entries, no custom/opaque objects, sample inputs whose pickle names only
tensor-rebuilding globals) and then rebuilds the program from the same pieces ``torch.export.load``
uses, passing *no* sample inputs, so nothing is unpickled at all. The example inputs are not needed:
the input shape comes from the graph.

The graph itself is a program too. Being in the ``aten`` namespace does not make an operator safe:
``aten.from_file(path, shared=True)`` maps a file and ``aten.copy_`` writes into it, ``aten.set_`` /
``aten.resize_`` repoint or grow a tensor's memory, ``aten.empty`` returns stale heap bytes, and any
in-place or ``out=`` operator can rewrite the caller's probes or the program's own weights between
calls. So every node must call an operator named in an allow-list (what stock classifiers export to,
before and after ``run_decompositions()``), and an operator that writes into an argument (its schema's
``Tensor(a!)``) is accepted only from a short in-place list (``relu_``, ``add_``, ... as
``nn.ReLU(inplace=True)`` exports) and only into a tensor the graph computed itself, never an input,
weight or constant (or a view of one). The signature may not write results back into inputs or
buffers, and the shape expressions, which the loader hands to ``sympy.sympify`` (``eval``), must be
plain size arithmetic.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import warnings
import zipfile
from typing import Iterator

import torch

from ..errors import AuditError, ModelError
from .archive import check_zip_bounds
from .base import ModelFormat
from .chunks import pad_batch, run_in_fixed_batches
from .torch_runner import TorchRunner
from .validation import check_input_shape, is_pt2_archive, short_error  # noqa: F401 - re-exported

MODEL_NAME = "model"
#: ATen operators (overload packets) that return new tensors; an overload that writes into an argument
#: (``out=``) is still refused by its schema
_PURE_OPS = frozenset(
    f"aten.{name}"
    for name in """
    convolution conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear addmm mm bmm
    baddbmm matmul mv scaled_dot_product_attention lstm gru embedding
    batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training instance_norm layer_norm
    native_layer_norm group_norm native_group_norm rms_norm
    relu relu6 gelu silu hardswish hardsigmoid hardtanh sigmoid tanh elu selu celu leaky_relu prelu softplus
    mish glu threshold softmax _softmax log_softmax _log_softmax clamp clamp_min clamp_max
    max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d
    avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d
    _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d upsample_nearest1d
    upsample_nearest2d upsample_nearest3d upsample_bilinear2d upsample_bicubic2d pixel_shuffle pixel_unshuffle
    channel_shuffle
    add sub rsub mul div neg abs exp log log1p log2 sqrt rsqrt pow reciprocal erf sin cos maximum minimum
    where masked_fill sign floor ceil round trunc fmod remainder nan_to_num isnan isinf logical_not
    logical_and logical_or eq ne lt le gt ge
    sum mean amax amin max min argmax argmin std var prod any all logsumexp linalg_vector_norm norm cumsum
    topk sort
    full full_like zeros zeros_like ones ones_like new_zeros new_ones new_full arange scalar_tensor eye
    lift_fresh_copy clone _to_copy copy
    cat stack flip roll rot90 repeat constant_pad_nd pad reflection_pad1d reflection_pad2d replication_pad1d
    replication_pad2d index index_select gather slice_scatter select_scatter
    sym_size sym_stride sym_numel sym_storage_offset _assert_scalar _assert_async _assert_tensor_metadata
    sym_constrain_range sym_constrain_range_for_size _local_scalar_dense item
    """.split()
)
#: operators whose result may be (a view of) one of their inputs; ``dropout`` and ``type_as`` return
#: their input as it is, and so may ``einsum`` and ``sum_to_size``
_VIEW_OPS = frozenset(
    f"aten.{name}"
    for name in """
    view view_as reshape flatten unflatten permute transpose t expand expand_as broadcast_to slice select
    narrow unsqueeze squeeze split split_with_sizes chunk unbind movedim alias detach contiguous to as_strided
    dropout feature_dropout alpha_dropout native_dropout type_as einsum sum_to_size
    """.split()
)
#: in-place operators as stock models export them (``nn.ReLU(inplace=True)``, ``out += identity``),
#: accepted only into a tensor the graph computed itself
_INPLACE_OPS = frozenset(
    f"aten.{name}"
    for name in """
    relu_ relu6_ hardswish_ hardsigmoid_ hardtanh_ silu_ gelu_ sigmoid_ tanh_ elu_ leaky_relu_ clamp_
    clamp_min_ add_ sub_ mul_ div_ dropout_ feature_dropout_ alpha_dropout_ fill_ zero_ masked_fill_
    """.split()
)
#: arithmetic on symbolic sizes (a dynamic batch), as the serializer names it
_SYMBOLIC_TARGETS = frozenset(
    {
        "_operator.add",
        "_operator.sub",
        "_operator.mul",
        "_operator.floordiv",
        "_operator.truediv",
        "_operator.mod",
        "_operator.neg",
        "_operator.pos",
        "_operator.eq",
        "_operator.ne",
        "_operator.lt",
        "_operator.le",
        "_operator.gt",
        "_operator.ge",
        "_operator.and_",
        "_operator.or_",
        "_operator.getitem",
        "torch.sym_int",
        "torch.sym_float",
        "torch.sym_not",
        "torch.sym_max",
        "torch.sym_min",
        "torch.sym_ite",
        "torch.sym_sqrt",
        "math.trunc",
        "math.floor",
        "math.ceil",
    }
)
#: refused by name, with the reason
_REFUSED_OPS = {
    "aten.from_file": "reads or writes files",
    "aten.save": "writes files",
    **dict.fromkeys(
        (
            "aten.set_",
            "aten.set",
            "aten.set_data",
            "aten.as_strided_",
            "aten.resize_",
            "aten.resize",
            "aten.resize_as_",
            "aten.resize_as",
            "aten._resize_output_",
            "aten._unsafe_view",
            "aten._reshape_alias",
        ),
        "repoints, resizes or aliases a tensor's raw memory",
    ),
    **dict.fromkeys(
        (
            "aten.empty",
            "aten.empty_like",
            "aten.empty_strided",
            "aten.empty_permuted",
            "aten.new_empty",
            "aten.new_empty_strided",
        ),
        "returns uninitialized memory",
    ),
    "aten.copy_": "writes into an existing tensor",
    "aten._print": "has a side effect (printing)",
    "aten.set_grad_enabled": "changes global state",
}
#: operators that update their running statistics in place unless the flag argument is false
_HIDDEN_WRITES = {
    "aten.batch_norm": ("training", ("running_mean", "running_var")),
    "aten.instance_norm": ("use_input_stats", ("running_mean", "running_var")),
}
#: a token of a sympy ``srepr`` shape expression: a name, a quoted symbol name or number, a number, an operator
_EXPR_TOKEN = re.compile(r"\s*(?:([A-Za-z_]\w*)|'[\w.+-]*'|\d+(?:\.\d+)?(?:e[+-]?\d+)?|[-+*/%(),<>=!])", re.ASCII)
_EXPR_NAMES = frozenset(
    """
    Symbol Integer Float Rational Add Mul Pow Max Min Mod Abs Eq Ne Lt Le Gt Ge And Or Not true false True False
    oo floor ceiling StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality BooleanTrue
    BooleanFalse positive integer real nonnegative negative finite precision FloorDiv ModularIndexing Where
    PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv
    IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat
    Identity
    """.split()
)
#: globals a pickle of plain tensors (what torch.save writes for example inputs) may name
_TENSOR_PICKLE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "tuple"),
    ("builtins", "dict"),
}


def _refuse(why: str) -> ModelError:
    return ModelError(
        f"Expected a torch.export archive (torch.export.save) that loads without unpickling, but {why}", field="model"
    )


def check_pt2_archive(data: bytes) -> None:
    """``ModelError`` unless the archive holds one exported program that loads with no pickle at all."""
    check_zip_bounds(data, "a torch.export program")
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
        members = {name[len(root) + 1 :]: name for name in names}
        for rel in members:
            if rel.startswith("data/aotinductor/") or rel.startswith("data/executorch/"):
                raise _refuse(
                    f"it carries compiled native code ('{rel}'), which is never loaded; save the "
                    "program alone with torch.export.save(ep, path)"
                )
            allowed = (
                rel
                in (
                    "archive_format",
                    "archive_version",
                    "byteorder",
                    ".data/version",
                    ".data/serialization_id",
                    f"models/{MODEL_NAME}.json",
                )
                or rel.startswith(("data/weights/weight_", "data/constants/tensor_", "extra/"))
                or rel
                in (
                    f"data/weights/{MODEL_NAME}_weights_config.json",
                    f"data/constants/{MODEL_NAME}_constants_config.json",
                    f"data/sample_inputs/{MODEL_NAME}.pt",
                )
            )
            if not allowed:
                raise _refuse(
                    f"it holds '{rel}', which is not part of a single saved program (weights saved in "
                    "the legacy pickled format, custom objects, or a second program are refused)"
                )
        for config in (
            f"data/weights/{MODEL_NAME}_weights_config.json",
            f"data/constants/{MODEL_NAME}_constants_config.json",
            f"models/{MODEL_NAME}.json",
        ):
            if config not in members:
                raise _refuse(f"'{config}' is missing (saved by an older torch? re-save with torch.export.save)")
        for config in (
            f"data/weights/{MODEL_NAME}_weights_config.json",
            f"data/constants/{MODEL_NAME}_constants_config.json",
        ):
            entries = _json(archive, members[config]).get("config", {})
            for fqn, meta in entries.items():
                if not isinstance(meta, dict) or meta.get("use_pickle") or not meta.get("tensor_meta"):
                    raise _refuse(
                        f"'{fqn}' is stored as a pickle (a tensor subclass or a custom object), and "
                        "torch.export.load would unpickle it with weights_only=False"
                    )
                path = str(meta.get("path_name", ""))
                if not path.startswith(("weight_", "tensor_")):
                    raise _refuse(f"'{fqn}' is stored as '{path}', not as raw tensor bytes")
        _check_graph(_json(archive, members[f"models/{MODEL_NAME}.json"]))
        sample = members.get(f"data/sample_inputs/{MODEL_NAME}.pt")
        if sample is not None:
            _check_sample_inputs(archive.read(sample))


def _json(archive: zipfile.ZipFile, name: str) -> dict:
    try:
        value = json.loads(archive.read(name))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _refuse(f"'{name}' is not valid JSON ({short_error(exc)})") from None
    if not isinstance(value, dict):
        raise _refuse(f"'{name}' does not hold a JSON object")
    return value


def _refuse_program(why: str) -> ModelError:
    return ModelError(f"Expected a torch.export program of pure tensor operators, but {why}", field="model")


def _refuse_op(op: str, why: str) -> ModelError:
    return _refuse_program(
        f"the graph calls '{op}' ({why}); only the ATen operators that classifiers export to "
        "are accepted, in-place ones only into tensors the graph computed itself"
    )


def _check_graph(program: dict) -> None:
    """Every node calls an allow-listed operator, and nothing writes into the program's inputs or weights."""
    if program.get("guards_code"):
        raise _refuse_program("it carries guard code, which torch.export turns into Python and runs")
    for expr in _expressions(program):
        if not _plain_expression(expr):
            raise _refuse_program(
                f"its shape expression {expr[:80]!r} is not plain size arithmetic "
                "(torch.export.load evaluates it as Python)"
            )
    module = program.get("graph_module", {})
    graph = module.get("graph", {})
    if graph.get("custom_obj_values"):
        raise _refuse("the graph uses custom (TorchScript-class) objects, which load through a pickle")
    for spec in module.get("signature", {}).get("output_specs", []):
        kind = next(iter(spec), "?") if isinstance(spec, dict) else "?"
        if kind != "user_output":
            raise _refuse_program(
                f"its signature has a '{kind}' output, which writes back into an input, weight "
                "or buffer (export with model.eval() and leave the input unchanged)"
            )
    defined = set(_tensor_names(graph.get("inputs", [])))
    made_here: set[str] = set()  # tensors the graph computed (or views of them): never inputs or weights
    for node in graph.get("nodes", []):
        if not isinstance(node, dict):
            raise _refuse_program("its graph holds a node that is not a JSON object")
        _check_node(node, made_here)
        for name in _tensor_names(node.get("outputs", [])):
            if name in defined:
                raise _refuse_program(f"the graph defines the tensor '{name}' twice")
            defined.add(name)


def _check_node(node: dict, made_here: set[str]) -> None:
    target = str(node.get("target", ""))
    if target in _SYMBOLIC_TARGETS:
        return
    name = target.removeprefix("torch.ops.")
    parts = name.split(".")
    is_op = target.startswith("torch.ops.") and len(parts) == 3
    op = f"{parts[0]}.{parts[1]}" if is_op else name
    if op not in _PURE_OPS | _VIEW_OPS | _INPLACE_OPS:
        writes = is_op and (parts[1].endswith("_") and not parts[1].endswith("__") or parts[2].endswith("out"))
        raise _refuse_op(
            name,
            _REFUSED_OPS.get(op)
            or (
                "writes into an existing tensor: an in-place or out= variant"
                if writes
                else "not on the allow-list of pure tensor operators"
            ),
        )
    try:
        schema = torch._C._get_schema(op.replace(".", "::", 1), "" if parts[2] == "default" else parts[2])
    except RuntimeError:
        raise _refuse_op(name, f"no such overload in torch {torch.__version__}") from None
    args: dict[str, list[str]] = {}
    for entry in node.get("inputs", []):
        if isinstance(entry, dict):
            args.setdefault(str(entry.get("name")), []).extend(_tensor_names(entry.get("arg")))
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if written and op not in _INPLACE_OPS:
        raise _refuse_op(name, f"writes into its argument '{written[0]}': an in-place or out= variant")
    flag, stats = _HIDDEN_WRITES.get(op, ("", ()))
    if flag and not any(
        e.get("name") == flag and e.get("arg") == {"as_bool": False}
        for e in node.get("inputs", [])
        if isinstance(e, dict)
    ):
        written += stats  # training-mode statistics are updated in place
    for arg in written:
        outside = [t for t in args.get(arg, []) if t not in made_here]
        if outside:
            raise _refuse_op(
                name,
                f"writes in place into '{outside[0]}', an input, weight, buffer or constant "
                "of the program or a view of one; export with model.eval() and leave the "
                "input unchanged",
            )
    fresh = op in _INPLACE_OPS or (op not in _VIEW_OPS and all(r.alias_info is None for r in schema.returns))
    if fresh or all(t in made_here for ts in args.values() for t in ts):
        made_here.update(_tensor_names(node.get("outputs", [])))


def _items(value: object) -> Iterator[tuple[str, object]]:
    """Every (key, value) pair of every dict inside ``value``, lists and dicts at any depth (no recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                yield str(key), inner
                stack.append(inner)


def _tensor_names(value: object) -> list[str]:
    """Names of the tensors a serialized argument (or list of them) refers to, at any depth."""
    names: list[str] = []
    for key, inner in _items(value):
        if key == "as_tensor" and isinstance(inner, dict):
            names.append(str(inner.get("name")))
        elif key == "as_tensors" and isinstance(inner, list):
            names.extend(str(t.get("name")) for t in inner if isinstance(t, dict))
    return names


def _expressions(program: dict) -> list[str]:
    """Every ``expr_str`` in the program: symbolic sizes the deserializer parses with ``sympy.sympify``."""
    return [str(inner) for key, inner in _items(program) if key == "expr_str"]


def _plain_expression(expr: str) -> bool:
    """A sympy ``srepr`` of size arithmetic: known function names, symbol names, numbers and operators."""
    expr = expr.strip()
    pos = 0
    while pos < len(expr) <= 10_000:
        match = _EXPR_TOKEN.match(expr, pos)
        if match is None:
            return False
        word = match.group(1)
        if word is not None and word not in _EXPR_NAMES and not re.fullmatch(r"[a-z]+[0-9]+", word):
            return False
        pos = match.end()
    return pos == len(expr)


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
                module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype))
            )
            if not ok:
                raise _refuse(
                    f"its example inputs are a pickle that names '{module}.{name}'; torch.export.load "
                    "retries such a pickle with weights_only=False, which runs arbitrary code"
                )


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
                pushed = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
                found.append((pushed[0] or "?", pushed[1] or "?"))
                strings.append(None)
            elif name in (
                "SHORT_BINUNICODE",
                "BINUNICODE",
                "BINUNICODE8",
                "UNICODE",
                "SHORT_BINSTRING",
                "BINSTRING",
                "STRING",
            ):
                strings.append(str(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[_memo_index(arg)] = strings[-1] if strings else None
            elif name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                strings.append(memo.get(_memo_index(arg)))
            elif name not in ("PROTO", "FRAME", "MARK"):
                strings.append(None)
    except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and friends on junk
        raise _refuse(f"its example inputs are not a readable pickle ({short_error(exc)})") from None
    return found


def _memo_index(arg: object) -> int:
    """A pickle memo opcode's index (an int; anything else is a damaged pickle, refused by the caller)."""
    if not isinstance(arg, int):
        raise ValueError(f"a memo index that is not an int: {arg!r}")
    return arg


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
            serialized = _bytes_to_dataclass(schema.ExportedProgram, reader.read_bytes(f"models/{MODEL_NAME}.json"))
            state_dict = _load_state_dict(reader, MODEL_NAME)
            constants = _load_constants(reader, MODEL_NAME)
            if not isinstance(state_dict, dict) or not isinstance(constants, dict):
                raise _refuse("its weights are in the legacy pickled format")
            return ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, b"")
    except AuditError:
        raise
    except Exception as exc:
        raise ModelError(
            f"Expected a torch.export archive this torch ({torch.__version__}) can read, but "
            f"loading failed: {short_error(exc)}",
            field="model",
        ) from None


class ExportedProgramRunner(TorchRunner):
    """A ``torch.export`` classifier behind the ``ModelRunner`` protocol; its module is differentiable."""

    format: ModelFormat = "pt2"

    def __init__(
        self, data: bytes, sha256: str, device: torch.device, input_shape: tuple[int, ...] | None = None
    ) -> None:
        super().__init__(sha256, device, "torch.export", "torch.export program (autograd through its ATen graph)")
        program = load_program(data)
        shape, self.fixed_batch, min_batch, declared = _signature(program)
        if input_shape is not None and shape is not None and tuple(input_shape) != shape:
            raise ModelError(
                f"Expected probes of the program's input shape {shape}, but they have shape {tuple(input_shape)}",
                field="probes",
            )
        shape = shape or (tuple(input_shape) if input_shape is not None else None)
        if shape is None:
            raise ModelError(
                "Expected the program to fix every input size but the batch, but some are dynamic; "
                "pass probes so that the shape is known",
                field="input_shape",
            )
        checked = check_input_shape(list(shape), "the exported program's input")
        try:
            module = program.module()
            module = module.to(device)
        except Exception as exc:
            raise ModelError(
                f"Expected an exported program that runs as a module, but: {short_error(exc)}", field="model"
            ) from None
        batches = _BatchSizes(module, self.fixed_batch, min_batch)  # padding, one tensor out
        self._hold(module, checked, "the program", runs=batches, declared=declared)
        if self.fixed_batch is not None:
            self.providers.append(batches.try_vmap(self.input_shape, device))


class _BatchSizes(torch.nn.Module):
    """The program's module returning one tensor; batches are padded to what the program accepts
    (its hard-coded batch size, or the lower bound of its dynamic batch, e.g. 2 for ``Dim("batch")``)."""

    def __init__(self, module: torch.nn.Module, fixed_batch: int | None, min_batch: int = 1) -> None:
        super().__init__()
        self.program = module
        self.fixed_batch = fixed_batch
        self.min_batch = min_batch
        #: whole batches through ``torch.vmap`` over the fixed-batch program (``try_vmap``), else one call a batch
        self.vmapped = False

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        out = self.program(x)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_batch is None:
            return self._call(pad_batch(x, self.min_batch))[: x.shape[0]]
        if self.vmapped:
            return self._over_groups(x, self.fixed_batch)
        return run_in_fixed_batches(self._call, x, self.fixed_batch)

    def _over_groups(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """``x`` as (groups, size, ...) (the last group zero-padded), the program vmapped over the groups."""
        n = x.shape[0]
        groups = -(-n // size)
        grouped = pad_batch(x, groups * size).reshape(groups, size, *x.shape[1:])
        return torch.vmap(self._call)(grouped).reshape(groups * size, -1)[:n]

    def try_vmap(self, input_shape: tuple[int, ...], device: torch.device) -> str:
        """Switch to ``torch.vmap`` when it runs the program and matches one call per batch on seeded inputs
        (ResNet-18 exported at batch 1: 256 samples in 0.5 s instead of 24 s on 2 CPU cores). Says which."""
        size = self.fixed_batch
        assert size is not None, "try_vmap is for a program with a fixed batch"
        sample = torch.randn((3 * size, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
        try:
            with torch.no_grad():
                reference = run_in_fixed_batches(self._call, sample, size)
                batched = self._over_groups(sample, size)
            error = float((batched - reference).abs().max()) / float(reference.abs().max().clamp_min(1e-12))
        except Exception as exc:  # noqa: BLE001 - an op without a batching rule: keep one call per batch
            return f"batch-{size} program: one call per {size} samples (torch.vmap failed: {type(exc).__name__})"
        if not error <= VMAP_TOLERANCE:
            return f"batch-{size} program: one call per {size} samples (torch.vmap differed by {error:.1g})"
        self.vmapped = True
        return f"batch-{size} program run over whole batches with torch.vmap (checked: {error:.0g})"


#: vmapped logits must match one call per batch within this share of their largest magnitude
VMAP_TOLERANCE = 1e-4


def _signature(program) -> tuple[tuple[int, ...] | None, int | None, int, int | None]:
    """(per-sample input shape or None when a non-batch size is dynamic, fixed batch or None, the smallest
    batch a dynamic batch accepts, classes or None)."""
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelError(
            f"Expected a program with exactly one input tensor (a batch of samples), but got "
            f"{len(user_inputs)}: {', '.join(map(str, user_inputs)) or 'none'}",
            field="model",
        )
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    value = nodes[user_inputs[0]].meta.get("val") if user_inputs[0] in nodes else None
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        raise ModelError("Expected the program's input to be a tensor of shape (batch, ...), rank >= 2", field="model")
    batch, *rest = value.shape
    fixed = int(batch) if isinstance(batch, int) else None
    min_batch = 1
    if isinstance(batch, torch.SymInt):  # a dynamic batch: the smallest size its range constraint allows
        try:
            min_batch = max(1, int(program.range_constraints[batch.node.expr].lower))
        except Exception:  # noqa: BLE001 - no constraint recorded: any batch size
            min_batch = 1
    shape = tuple(int(d) for d in rest) if all(isinstance(d, int) for d in rest) else None
    declared = None
    outputs = [n for n in program.graph.nodes if n.op == "output"]
    if outputs and outputs[0].args and isinstance(outputs[0].args[0], (tuple, list)):
        results = outputs[0].args[0]
        if len(results) != 1:
            raise ModelError(
                f"Expected a program with exactly one output (the logits), but it returns {len(results)}", field="model"
            )
        val = getattr(results[0], "meta", {}).get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 2 and isinstance(val.shape[1], int):
            declared = int(val.shape[1])
    return shape, fixed, min_batch, declared

"""Block files: ``save_blocks`` writes the trained blocks of a patched model, ``load_blocks`` reads them back.

A blocks directory holds (format version 4):
- ``smt_blocks.<h>.safetensors``: one ``"{module}.block_weight"`` (n, b, b) tensor per patched module, and in
  its safetensors metadata the layout (block size, per module its weight shape, dtype and blocks in order), the
  base-weight fingerprint and the ``SMTConfig`` the model was patched with (or null). ``<h>`` is the first 16
  hex digits of the file's SHA-256.
- ``smt_blocks.json``, the manifest: the same layout, fingerprint and config for people to read, plus the name
  and SHA-256 of the safetensors file.

So the layout and config travel with the tensors (the checksum covers them) and the JSON copy must agree. The
manifest is written last and names a file that was complete before it, so a crash at any point leaves the old
or the new save loadable; files of the previous save are removed only after the new manifest is in place.
Every field is type-checked on load; a bad file raises ``BlockFileError`` (a ``ValueError``) naming the field,
before the model is touched. Version 2 directories (the same without a config) load with no config; version 1
directories (``smt_blocks.safetensors`` + ``smt_blocks.json``, the layout in the JSON only) still load, with a
warning. Version 3 is version 4 with the older, evenly spaced fingerprint sampling (``fingerprint`` scheme 1); its
fingerprints are checked as they were sampled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from smt_kernels.config import SMTConfig
from smt_kernels.fingerprint import FINGERPRINT_SCHEME, base_fingerprint, compare_fingerprints
from smt_kernels.kernels.backend import scatter_blocks
from smt_kernels.layout import BlockLayout, check_block_size, num_blocks_along
from smt_kernels.patch import CONFIG_ATTR, _patch, plan_patch, require_patched
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear

logger = logging.getLogger(__name__)

FORMAT = "smt_kernels.blocks"
FORMAT_VERSION = 4
META_FILE = "smt_blocks.json"
V1_BLOCKS_FILE = "smt_blocks.safetensors"
_BLOCKS_NAME = re.compile(r"smt_blocks\.([0-9a-f]{16})\.safetensors")
_TMP_PREFIX = ".smt_blocks."
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LAYOUT_KEYS = ("block_size", "num_blocks", "modules", "fingerprint")
_MANIFEST_KEYS = {
    1: {"format", "version", "safetensors_sha256", *_LAYOUT_KEYS},
    2: {"format", "version", "blocks_file", "safetensors_sha256", *_LAYOUT_KEYS},
    3: {"format", "version", "blocks_file", "safetensors_sha256", "smt_config", *_LAYOUT_KEYS},
    4: {"format", "version", "blocks_file", "safetensors_sha256", "smt_config", *_LAYOUT_KEYS},
}
# the fingerprint sampling scheme (smt_kernels.fingerprint) of each format version: 4 samples every b×b tile
_FINGERPRINT_SCHEME = {1: 1, 2: 1, 3: 1, 4: FINGERPRINT_SCHEME}
_CONFIG_KEY = "smt_config"
_CONFIG_FIELDS = {f.name for f in fields(SMTConfig)}
_MODULE_KEYS = {"shape", "dtype", "blocks"}


class BlockFileError(ValueError):
    """A blocks directory that is not exactly what ``save_blocks`` wrote (corrupt, truncated, edited, mixed)."""


class BlockFileTypeError(BlockFileError, TypeError):
    """A field of a blocks file with the wrong JSON type (e.g. a block index 2.0, true or "2"): a bad file, so a
    ``BlockFileError``, and a ``TypeError`` like the same index passed to ``patch``."""


@dataclass(frozen=True)
class _Manifest:
    version: int
    layout: dict[str, Any]  # block_size, num_blocks, modules, fingerprint as in the JSON
    blocks_file: str
    sha256: str
    config: SMTConfig | None = None  # version 3 on; None when the model was patched without one

    @property
    def block_size(self) -> int:
        return self.layout["block_size"]

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.layout["modules"]

    @property
    def selection(self) -> dict[str, list[list[int]]]:
        return {n: v["blocks"] for n, v in self.modules.items()}

    @property
    def fingerprint_scheme(self) -> int:
        return _FINGERPRINT_SCHEME[self.version]


# ------------------------------------------------------------------------------------------------------- writing


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and one rename.

    The file is created with mode 0o666 less the process umask, as ``open`` would.
    """
    tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _dump_meta(meta: Mapping[str, Any]) -> str:
    """JSON with one line per top-level key and per module / fingerprint entry (diffable, not one huge line)."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, dict):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _canonical_header(data: bytes) -> bytes:
    """The safetensors bytes with the header's metadata in sorted key order: safetensors writes it in a random
    order, so the same blocks would get another checksum (and file name) on every save."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
    text = json.dumps({**ordered, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor data stays 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def _remove_stale(path: Path, keep: str) -> None:
    """Blocks files of earlier saves and temporary files of interrupted ones (one writer per directory)."""
    for entry in path.iterdir():
        name = entry.name
        stale = (name == V1_BLOCKS_FILE or _BLOCKS_NAME.fullmatch(name)) and name != keep
        if stale or (name.startswith(_TMP_PREFIX) and name.endswith(".tmp")):
            try:
                os.unlink(entry)
            except FileNotFoundError:
                pass


def save_blocks(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the trained blocks of a patched model into directory ``path`` (created if needed); returns it.

    Writes ``smt_blocks.<h>.safetensors`` (the blocks, with the layout, the base-weight fingerprint and the
    ``SMTConfig`` the model was patched with in its metadata), then the manifest ``smt_blocks.json``, each
    through a temporary file and a rename, and then removes the previous save's blocks file. A crash at any
    point leaves the old or the new save loadable. Files follow the process umask.
    """
    cfg, mods = require_patched(model, "save_blocks")
    block_size = cfg["block_size"]
    config = cfg.get("config")
    config = config.to_dict() if config is not None else None
    tensors, modules = {}, {}
    for name, m in mods.items():
        if _dtype_name(m.block_weight.dtype) not in _DTYPES:  # load_blocks would refuse the file
            raise ValueError(
                f"save_blocks: {name}'s blocks are {m.block_weight.dtype}; block files hold "
                f"{', '.join(_DTYPES)} (convert the model back first)"
            )
        tensors[f"{name}.block_weight"] = m.block_weight.detach().to("cpu").contiguous()
        modules[name] = {
            "shape": [m.out_features, m.in_features],
            "dtype": _dtype_name(m.block_weight.dtype),
            "blocks": [[int(r), int(c)] for r, c in m.block_indices.tolist()],
        }
    selection = {n: v["blocks"] for n, v in modules.items()}
    # everything slow happens before the first write
    layout = {
        "block_size": block_size,
        "num_blocks": sum(len(v["blocks"]) for v in modules.values()),
        "modules": modules,
        "fingerprint": base_fingerprint(model, selection, block_size),
    }
    data = _canonical_header(
        save_safetensors(
            tensors,
            metadata={
                "format": FORMAT,
                "version": str(FORMAT_VERSION),
                "layout": json.dumps(layout),
                _CONFIG_KEY: json.dumps(config),
            },
        )
    )
    sha = hashlib.sha256(data).hexdigest()
    blocks_file = f"smt_blocks.{sha[:16]}.safetensors"
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **layout,
        _CONFIG_KEY: config,
        "blocks_file": blocks_file,
        "safetensors_sha256": sha,
    }

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    existed = (path / blocks_file).exists()  # the same blocks saved before: the old manifest may name this file
    _atomic_write(path / blocks_file, data)
    try:
        _atomic_write(path / META_FILE, _dump_meta(manifest).encode())
    except BaseException:
        if not existed:  # no manifest names the new file: do not leave it behind
            (path / blocks_file).unlink(missing_ok=True)
        raise
    _remove_stale(path, keep=blocks_file)
    return path


# ------------------------------------------------------------------------------------------------------- reading


def _fail(where: str, msg: str, error: type[BlockFileError] = BlockFileError) -> BlockFileError:
    return error(f"{where}: {msg}")


def _int(value: Any, where: str) -> int:
    if type(value) is not int:  # JSON true/false and 1.0 are not indices or sizes
        raise _fail(where, f"must be an integer, got {value!r} ({type(value).__name__})", BlockFileTypeError)
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"must be a string, got {value!r:.60} ({type(value).__name__})", BlockFileTypeError)
    return value


def _dict(value: Any, where: str, keys: set[str] | None = None) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, f"must be an object, got {type(value).__name__}", BlockFileTypeError)
    if keys is not None and set(value) != keys:
        missing, extra = sorted(keys - set(value)), sorted(set(value) - keys)
        raise _fail(where, f"has the wrong keys: missing {missing}, unexpected {extra}")
    return value


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise _fail(where, f"must be a list, got {value!r:.60} ({type(value).__name__})", BlockFileTypeError)
    return value


def _check_module(name: str, entry: Any, block_size: int, where: str) -> None:
    where = f"{where} modules[{name!r}]"
    _dict(entry, where, _MODULE_KEYS)
    shape = _list(entry["shape"], f"{where}.shape")
    if len(shape) != 2 or any(_int(v, f"{where}.shape") <= 0 for v in shape):
        raise _fail(f"{where}.shape", f"must be two positive integers, got {shape}")
    dtype = _str(entry["dtype"], f"{where}.dtype")
    if dtype not in _DTYPES:
        raise _fail(f"{where}.dtype", f"must be one of {sorted(_DTYPES)}, got {dtype!r}")
    grid = (num_blocks_along(shape[0], block_size), num_blocks_along(shape[1], block_size))
    blocks = _list(entry["blocks"], f"{where}.blocks")
    if not blocks:
        raise _fail(f"{where}.blocks", "is empty (a saved module has at least one block)")
    for k, pair in enumerate(blocks):
        pair = _list(pair, f"{where}.blocks[{k}]")
        if len(pair) != 2:
            raise _fail(f"{where}.blocks[{k}]", f"must be a [row_block, col_block] pair, got {pair}")
        for v, limit in zip(pair, grid, strict=True):
            if not 0 <= _int(v, f"{where}.blocks[{k}]") < limit:
                raise _fail(
                    f"{where}.blocks[{k}]",
                    f"{pair} is out of range: a {shape[0]}×{shape[1]} weight with "
                    f"block_size {block_size} has {grid[0]}×{grid[1]} blocks",
                )
    try:
        BlockLayout.build(blocks, shape[0], shape[1], block_size)
    except (ValueError, TypeError) as err:
        raise _fail(f"{where}.blocks", str(err)) from None


def _check_layout(layout: dict[str, Any], where: str) -> None:
    """Type- and range-check block_size, num_blocks, modules and fingerprint in place; raise BlockFileError."""
    block_size = _int(layout["block_size"], f"{where} block_size")
    try:
        check_block_size(block_size)
    except ValueError as err:
        raise _fail(f"{where} block_size", str(err)) from None
    modules = _dict(layout["modules"], f"{where} modules")
    if not modules:
        raise _fail(f"{where} modules", "is empty")
    for name, entry in modules.items():
        if not name:
            raise _fail(f"{where} modules", "has an empty module name")
        _check_module(name, entry, block_size, where)
    total = sum(len(v["blocks"]) for v in modules.values())
    if _int(layout["num_blocks"], f"{where} num_blocks") != total:
        raise _fail(f"{where} num_blocks", f"is {layout['num_blocks']} but the modules list {total} blocks")
    for key, digest in _dict(layout["fingerprint"], f"{where} fingerprint").items():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{32}", digest):
            raise _fail(f"{where} fingerprint[{key!r}]", f"must be 32 hex digits, got {digest!r:.60}")


def _config(value: Any, block_size: int, where: str) -> SMTConfig | None:
    """The stored SMTConfig (or None), every field type-checked, and its block size the layout's."""
    if value is None:
        return None
    _dict(value, where, _CONFIG_FIELDS)
    _list(value["targets"], f"{where}.targets")
    for key in ("num_blocks", "block_size"):
        if value[key] is not None:
            _int(value[key], f"{where}.{key}")
    try:
        config = SMTConfig.from_dict(value)
    except TypeError as err:
        raise _fail(where, str(err), BlockFileTypeError) from None
    except ValueError as err:
        raise _fail(where, str(err)) from None
    if config.block_size != block_size:
        raise _fail(f"{where}.block_size", f"is {config.block_size} but the blocks are {block_size}×{block_size}")
    return config


def _read_manifest(path: Path) -> _Manifest:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {META_FILE} in {path} (save_blocks writes it with the blocks)")
    try:
        raw = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise BlockFileError(f"{meta_path} is not valid JSON (corrupt or truncated): {err}") from None
    where = str(meta_path)
    _dict(raw, where)
    if raw.get("format") != FORMAT:
        raise _fail(
            where, f"is not an smt_kernels blocks file (format {FORMAT!r} expected, got {raw.get('format')!r:.60})"
        )
    version = raw.get("version")
    if type(version) is not int or version not in _MANIFEST_KEYS:
        raise _fail(
            where, f"has format version {version!r:.60}; this smt_kernels reads versions {sorted(_MANIFEST_KEYS)}"
        )
    _dict(raw, where, _MANIFEST_KEYS[version])
    layout = {k: raw[k] for k in _LAYOUT_KEYS}
    _check_layout(layout, where)
    sha = _str(raw["safetensors_sha256"], f"{where} safetensors_sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _fail(f"{where} safetensors_sha256", f"must be 64 hex digits, got {sha!r:.80}")
    if version == 1:
        logger.warning(
            "%s is format version 1: its layout is not bound to the tensors, so an edited block order "
            "cannot be detected; save_blocks again to write version %d",
            meta_path,
            FORMAT_VERSION,
        )
        return _Manifest(1, layout, V1_BLOCKS_FILE, sha)
    blocks_file = _str(raw["blocks_file"], f"{where} blocks_file")
    match = _BLOCKS_NAME.fullmatch(blocks_file)
    if match is None or match.group(1) != sha[:16]:
        raise _fail(
            f"{where} blocks_file",
            f"must be 'smt_blocks.{sha[:16]}.safetensors' (the first 16 digits "
            f"of safetensors_sha256), got {blocks_file!r:.80}",
        )
    config = _config(raw[_CONFIG_KEY], layout["block_size"], f"{where} {_CONFIG_KEY}") if version >= 3 else None
    return _Manifest(version, layout, blocks_file, sha, config)


def _embedded_layout(data: bytes, version: int, where: str) -> tuple[dict[str, Any], SMTConfig | None]:
    """The layout and config stored in the safetensors header's metadata (the checksum already matched)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        meta = header["__metadata__"]
        if meta["format"] != FORMAT or meta["version"] != str(version):
            raise ValueError(f"format {meta['format']!r} version {meta['version']!r}, expected {version}")
        layout = json.loads(meta["layout"])
        config = json.loads(meta[_CONFIG_KEY]) if version >= 3 else None
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise _fail(where, f"has no smt_kernels layout in its metadata ({type(err).__name__}: {err})") from None
    _dict(layout, f"{where} metadata", set(_LAYOUT_KEYS))
    _check_layout(layout, f"{where} metadata")
    return layout, _config(config, layout["block_size"], f"{where} metadata {_CONFIG_KEY}")


def _compare_layouts(
    manifest: _Manifest, embedded: dict[str, Any], config: SMTConfig | None, meta_where: str, file_where: str
) -> None:
    """BlockFileError naming the first fields where the JSON copy and the tensors' own layout and config differ."""
    differ = []
    if manifest.config != config:
        differ.append(f"{_CONFIG_KEY}: the JSON says {manifest.config}, the tensors were saved with {config}")
    for key in _LAYOUT_KEYS:
        if key == "modules":
            mine, theirs = manifest.modules, embedded["modules"]
            if set(mine) != set(theirs):
                differ.append(
                    f"modules: the JSON lists {sorted(set(mine) - set(theirs))[:4]} that the tensors do "
                    f"not, and lacks {sorted(set(theirs) - set(mine))[:4]}"
                )
                continue
            for name in mine:
                for field in ("shape", "dtype", "blocks"):
                    if mine[name][field] != theirs[name][field]:
                        differ.append(
                            f"modules[{name!r}].{field}: the JSON says {mine[name][field]!s:.80}, the "
                            f"tensors were saved with {theirs[name][field]!s:.80}"
                        )
        elif manifest.layout[key] != embedded[key]:
            differ.append(f"{key}: the JSON says {manifest.layout[key]!s:.80}, the tensors {embedded[key]!s:.80}")
    if differ:
        raise BlockFileError(
            f"{meta_where} does not describe {file_where} (edited, or mixed with another save): "
            + "; ".join(differ[:3])
            + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")
        )


def _read_tensors(path: Path, manifest: _Manifest) -> dict[str, torch.Tensor]:
    """The block tensors, after checking the file's SHA-256, its embedded layout and every name/shape/dtype."""
    blocks_path = path / manifest.blocks_file
    if not blocks_path.is_file():
        raise FileNotFoundError(f"no {manifest.blocks_file} in {path} ({META_FILE} names it)")
    data = blocks_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise BlockFileError(
            f"{blocks_path} is corrupt or truncated: its SHA-256 is {digest[:16]}…, "
            f"{META_FILE} says {manifest.sha256[:16]}…"
        )
    if manifest.version >= 2:
        layout, config = _embedded_layout(data, manifest.version, str(blocks_path))
        _compare_layouts(manifest, layout, config, str(path / META_FILE), str(blocks_path))
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise BlockFileError(f"{blocks_path} cannot be read as safetensors: {err}") from None
    expected = {f"{n}.block_weight" for n in manifest.modules}
    if set(tensors) != expected:
        raise BlockFileError(
            f"{blocks_path} holds tensors {sorted(set(tensors) - expected)[:4]} that the layout "
            f"does not list and lacks {sorted(expected - set(tensors))[:4]}"
        )
    b = manifest.block_size
    for name, v in manifest.modules.items():
        t = tensors[f"{name}.block_weight"]
        want = (len(v["blocks"]), b, b)
        if tuple(t.shape) != want or _dtype_name(t.dtype) != v["dtype"]:
            raise BlockFileError(
                f"{name}.block_weight is {tuple(t.shape)} {_dtype_name(t.dtype)} in the file; "
                f"its layout says {want} {v['dtype']}"
            )
    return tensors


def _read_saved(path: Path) -> tuple[_Manifest, dict[str, torch.Tensor]]:
    """The manifest and the tensors it names. A save into the same directory may replace both between the two
    reads (and remove the file the old manifest named): then the new pair is read."""
    manifest = _read_manifest(path)
    for _ in range(2):
        try:
            return manifest, _read_tensors(path, manifest)
        except FileNotFoundError:
            newer = _read_manifest(path)
            if newer == manifest:
                raise
            manifest = newer
    return manifest, _read_tensors(path, manifest)


class SavedBlocks(tuple):
    """What ``read_blocks`` returns: the pair ``(block_size, blocks)`` (unpack it as before) with what else the
    file says: ``.config`` (the saved ``SMTConfig``; None for files saved without one, and for format versions 1
    and 2), ``.shapes`` ({module: (out_features, in_features)} of the weights the blocks were trained in),
    ``.fingerprint`` (the base-weight digests) and ``.fingerprint_scheme`` (how they were sampled)."""

    config: SMTConfig | None
    shapes: dict[str, tuple[int, int]]
    fingerprint: dict[str, str]
    fingerprint_scheme: int

    def __new__(
        cls,
        block_size: int,
        blocks: dict[str, tuple[torch.Tensor, torch.Tensor]],
        config: SMTConfig | None,
        shapes: dict[str, tuple[int, int]] | None = None,
        fingerprint: dict[str, str] | None = None,
        fingerprint_scheme: int = FINGERPRINT_SCHEME,
    ) -> SavedBlocks:
        self = super().__new__(cls, (block_size, blocks))
        self.config = config
        self.shapes = dict(shapes or {})
        self.fingerprint = dict(fingerprint or {})
        self.fingerprint_scheme = fingerprint_scheme
        return self

    def __reduce__(self):
        # a tuple subclass with a __new__ of its own: pickle and copy need its arguments, not the tuple's items
        args = (self[0], self[1], self.config, self.shapes, self.fingerprint, self.fingerprint_scheme)
        return (SavedBlocks, args)

    @property
    def block_size(self) -> int:
        return self[0]

    @property
    def blocks(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self[1]


def read_blocks(path: str | os.PathLike) -> SavedBlocks:
    """(block_size, {module: (block_indices int64 (n, 2), block_weight (n, b, b))}) of a ``save_blocks``
    directory, with the saved ``SMTConfig``, weight shapes and fingerprint as attributes (``SavedBlocks``),
    without a model, after every check that ``load_blocks`` makes of the files themselves."""
    path = Path(path)
    manifest, tensors = _read_saved(path)
    blocks = {
        name: (torch.tensor(v["blocks"], dtype=torch.int64).reshape(-1, 2), tensors[f"{name}.block_weight"])
        for name, v in manifest.modules.items()
    }
    shapes = {name: (v["shape"][0], v["shape"][1]) for name, v in manifest.modules.items()}
    return SavedBlocks(
        manifest.block_size,
        blocks,
        manifest.config,
        shapes,
        manifest.layout["fingerprint"],
        manifest.fingerprint_scheme,
    )


def _check_patched_like(cfg, mods, manifest: _Manifest, path: Path) -> None:
    mine = cfg.get("config")
    if mine is not None and manifest.config is not None and mine != manifest.config:
        raise ValueError(f"the model was patched with {mine}, the blocks in {path} were saved with {manifest.config}")
    if cfg["block_size"] != manifest.block_size:
        raise ValueError(
            f"the model is patched with block_size {cfg['block_size']}, the file in {path} has "
            f"block_size {manifest.block_size}"
        )
    saved = manifest.modules
    if set(mods) != set(saved):
        only_model = sorted(set(mods) - set(saved))
        only_file = sorted(set(saved) - set(mods))
        raise ValueError(
            f"the file in {path} has another layout: modules only in the model {only_model[:4]}, "
            f"only in the file {only_file[:4]}"
        )
    for name, m in mods.items():
        v = saved[name]
        if [m.out_features, m.in_features] != v["shape"]:
            raise ValueError(
                f"{name}: the model's weight is {m.out_features}×{m.in_features}, the file's "
                f"{v['shape'][0]}×{v['shape'][1]}"
            )
        if m.block_indices.tolist() != v["blocks"]:
            raise ValueError(
                f"{name}: the file in {path} has another layout ({len(v['blocks'])} blocks "
                f"{v['blocks'][:4]}...) than the model ({m.num_blocks} blocks "
                f"{m.block_indices.tolist()[:4]}...)"
            )
        if _dtype_name(m.block_weight.dtype) != v["dtype"]:
            raise ValueError(
                f"{name}: the model's blocks are {_dtype_name(m.block_weight.dtype)}, the file's {v['dtype']}"
            )


def _nf4_block_dtypes(model: nn.Module, manifest: _Manifest) -> dict[str, torch.dtype]:
    """{module: saved block dtype} of the file's modules that are 4-bit NF4Linear layers in ``model``: their
    blocks take the file's dtype (an nn.Linear's blocks have its weight's dtype, checked in _check_plain_fits)."""
    modules = dict(model.named_modules())
    return {n: _DTYPES[v["dtype"]] for n, v in manifest.modules.items() if isinstance(modules.get(n), NF4Linear)}


def _check_plain_fits(model: nn.Module, manifest: _Manifest) -> None:
    for p in plan_patch(model, manifest.selection, manifest.block_size, _nf4_block_dtypes(model, manifest)):
        lin = getattr(p.parent, p.attr)
        shape = manifest.modules[p.name]["shape"]
        if [lin.out_features, lin.in_features] != shape:
            raise ValueError(
                f"{p.name}: the model's weight is {lin.out_features}×{lin.in_features}, the "
                f"file's {shape[0]}×{shape[1]}"
            )
        dtype = manifest.modules[p.name]["dtype"]
        if not isinstance(lin, NF4Linear) and _dtype_name(lin.weight.dtype) != dtype:
            raise ValueError(
                f"{p.name}: the model's weight is {_dtype_name(lin.weight.dtype)} but the blocks "
                f"were saved as {dtype}; convert the model first"
            )


@torch.no_grad()
def load_blocks(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load blocks written by ``save_blocks`` onto ``model``; returns the model.

    ``model`` is either patched with the same selection (same modules, same blocks in the same order, same
    block size and dtype) or a plain model, which is then patched with the saved selection (4-bit ``NF4Linear``
    targets of a ``quantize_base`` model get blocks of the saved dtype). Blocks trained on a 16-bit base do not
    load onto a 4-bit one, nor the reverse, unless ``strict=False``: the error says which base they came from.
    Everything is checked before anything changes: every JSON field's type and range, the blocks file's SHA-256,
    that the JSON's layout is the one stored with the tensors, tensor names/shapes/dtypes, the model's fit, and
    (``strict``) the fingerprint of the base weights outside the blocks. A bad file raises ``BlockFileError``
    (a ValueError), a missing one FileNotFoundError, a model that does not fit ValueError; the model is then
    unchanged. The saved ``SMTConfig`` (if any) is recorded as ``model.smt_config["config"]``; one that differs
    from the config a patched model already has is a ValueError.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    path = Path(path)
    manifest, tensors = _read_saved(path)
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is not None:
        cfg, mods = require_patched(model, "load_blocks")
        _check_patched_like(cfg, mods, manifest, path)
    else:
        _check_plain_fits(model, manifest)
        mods = None
    if strict:
        compare_fingerprints(
            manifest.layout["fingerprint"],
            base_fingerprint(model, manifest.selection, manifest.block_size, manifest.fingerprint_scheme),
        )

    if mods is None:
        dtypes = _nf4_block_dtypes(model, manifest)
        _patch(model, manifest.selection, manifest.block_size, False, dtypes, config=manifest.config)
        _, mods = require_patched(model, "load_blocks")
    elif manifest.config is not None:
        cfg["config"] = manifest.config  # the model had none, or the same one (_check_patched_like)
    for name, m in mods.items():
        m.block_weight.copy_(tensors[f"{name}.block_weight"])
        if not isinstance(m, NF4SparseBlockLinear):  # an NF4 layer has no dense weight: its forward overlays them
            # keep the dense weight consistent with the blocks even before the next forward
            scatter_blocks(m.weight.data, m.block_weight.detach(), m.block_indices)
    return model

"""``SMTConfig``: how blocks are chosen (targets, budget, block size, score, strategy), as one object.

In the style of PEFT's ``LoraConfig``: build it once, hand it to ``select_blocks(model, batches, config=...)`` and
``patch(model, selection, config=...)``; ``save_blocks`` stores it with the blocks and ``load_blocks`` /
``read_blocks`` give it back. The allowed scores and strategies are ``smt_kernels.select``'s own.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from smt_kernels.layout import check_block_size
from smt_kernels.select import DEFAULT_TARGETS, SCORES, STRATEGIES


@dataclass(frozen=True)
class SMTConfig:
    """SMT's settings; validated on construction (a ValueError or TypeError naming the field and the value).

    Attributes:
        targets: projection names (last component of a module name, e.g. "q_proj") or full module names.
        ratio: fraction of the target weight elements to train, in (0, 1]. Exactly one of ratio / num_blocks.
        num_blocks: blocks to train, in total (strategy "global") or per matrix ("per_matrix").
        block_size: b, a power of two in [16, 256].
        score: one of ``smt_kernels.select.SCORES``.
        strategy: one of ``smt_kernels.select.STRATEGIES``.
    """

    targets: tuple[str, ...] = DEFAULT_TARGETS
    ratio: float | None = None
    num_blocks: int | None = None
    block_size: int = 256
    score: str = "abs_mean"
    strategy: str = "global"

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__, and only after every check passed
        set_ = object.__setattr__
        set_(self, "targets", _targets(self.targets))
        if (self.num_blocks is None) == (self.ratio is None):
            raise ValueError(
                f"SMTConfig: give exactly one of num_blocks or ratio (got num_blocks={self.num_blocks!r}, "
                f"ratio={self.ratio!r})"
            )
        if self.num_blocks is not None:
            n = self.num_blocks
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"SMTConfig: num_blocks must be a positive int, got {n!r}")
            set_(self, "num_blocks", int(n))
        else:
            r = self.ratio
            ok = not isinstance(r, bool) and isinstance(r, numbers.Real) and math.isfinite(r) and 0 < r <= 1
            if not ok:
                raise ValueError(f"SMTConfig: ratio must be in (0, 1], got {r!r}")
            set_(self, "ratio", float(r))
        check_block_size(self.block_size)
        if self.score not in SCORES:
            raise ValueError(f"SMTConfig: score must be one of {SCORES}, got {self.score!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"SMTConfig: strategy must be one of {STRATEGIES}, got {self.strategy!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (``targets`` a list)."""
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SMTConfig:
        """The config ``to_dict`` gave; missing fields take their defaults, unknown ones are a ValueError."""
        if not isinstance(data, Mapping):
            raise TypeError(f"SMTConfig.from_dict needs a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"SMTConfig.from_dict: unknown fields {unknown}; known {[f.name for f in fields(cls)]}")
        return cls(**data)


def _targets(targets: Any) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, Sequence) or isinstance(targets, bytes):
        raise TypeError(f"SMTConfig: targets must be a list of module names, got {targets!r:.80}")
    if not targets:
        raise ValueError("SMTConfig: targets is empty; name at least one projection, e.g. ('q_proj', 'v_proj')")
    bad = [t for t in targets if not isinstance(t, str) or not t.strip()]
    if bad:
        raise TypeError(f"SMTConfig: targets must be non-empty strings, got {bad[:3]!r:.80}")
    repeated = sorted({t for t in targets if list(targets).count(t) > 1})
    if repeated:
        raise ValueError(f"SMTConfig: targets name {repeated} more than once")
    return tuple(targets)


def resolve_config(config: SMTConfig | None, where: str, **keywords: Any) -> SMTConfig | None:
    """``config``, checked against the keyword arguments a caller was also given (None = not given).

    Without ``config``: None if no keyword was given, else an ``SMTConfig`` of the keywords (validated). With it:
    a keyword that is given and differs from the config's value is a ValueError naming both; ``config`` is
    returned unchanged.
    """
    given = {k: v for k, v in keywords.items() if v is not None}
    if config is None:
        return SMTConfig(**given) if given else None
    if not isinstance(config, SMTConfig):
        raise TypeError(f"{where}: config must be an smt_kernels.SMTConfig, got {type(config).__name__}")
    known = {f.name for f in fields(SMTConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"{where}: unknown settings {unknown}; SMTConfig has {sorted(known)}")
    # each keyword is validated as SMTConfig validates it (True is not 1 blocks, 16.0 not block size 16) ...
    SMTConfig(**{**config.to_dict(), **given, **({"ratio": None} if "num_blocks" in given else {}),
                 **({"num_blocks": None} if "ratio" in given else {})})  # fmt: skip
    conflicts = []
    for key, value in given.items():
        if key == "targets" and not isinstance(value, str | bytes) and isinstance(value, Sequence):
            value = tuple(value)
        elif key == "targets" and isinstance(value, str):
            value = (value,)
        if value != getattr(config, key):
            conflicts.append(f"{key}={value!r} but config.{key}={getattr(config, key)!r}")
    if conflicts:
        raise ValueError(f"{where}: {'; '.join(conflicts)}; give each setting once (in the config or as a keyword)")
    return config

"""The sweep's small languages: seed ranges, ``--grid key=[v1,v2,...]`` and named arms.

Grid values are parsed exactly as ``rlp train key=value`` parses an override (OmegaConf's ``from_dotlist``,
whose values are YAML flow), so
``interventions=[[],[reset],[l2,reset]]`` is a list of three intervention lists. Each value is written back
as an ordinary ``key=value`` override for its trial, and checked to parse back to the same value.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: Keys the sweep sets itself on every trial; a grid, an arm or an override may not set them.
SWEEP_KEYS = {
    "seed": "use --seeds",
    "name": "the sweep names each trial after its arm",
    "logging.root_dir": "use --out",
    "threads": "use --cpus-per-trial",
}
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
_LABEL_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


class SweepError(ValueError):
    """Bad sweep input: the message is one line naming the option and what would be valid."""


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> 0..4, ``"0,2,5"``, or both (``"0-2,7"``); duplicates are dropped, order kept."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise SweepError(
                f"--seeds: '{part}' in '{text}' is not a seed or a range; "
                "valid: non-negative integers as 0-4, 0,2,5 or 0-2,7"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise SweepError(f"--seeds: range '{part}' runs backwards; write it as {last}-{first}")
        seeds.extend(s for s in range(first, last + 1) if s not in seeds)
    return seeds


def override_key(override: str) -> str:
    """The key of a ``key=value`` override (stripped)."""
    return override.split("=", 1)[0].strip()


def check_not_sweep_key(key: str, where: str) -> None:
    """Refuse a key the sweep sets on every trial (:data:`SWEEP_KEYS`)."""
    if key in SWEEP_KEYS:
        raise SweepError(f"{where}: '{key}' is set by the sweep ({SWEEP_KEYS[key]})")


def render_value(value: Any) -> str:
    """A value as ``rlp train`` reads an override's value (YAML flow, through OmegaConf's ``from_dotlist``):
    ``[reset,l2]``, ``0.001``, ``null``, ``'a=b'``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in ("true", "false", "null", "nan", "inf"):
            return value
        return "'" + value.replace("'", "''") + "'"  # a YAML single-quoted scalar
    if isinstance(value, list):
        return "[" + ",".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render_value(v)}" for k, v in value.items()) + "}"
    raise SweepError(f"cannot write {value!r} as an override value")


def _parse_value(key: str, text: str) -> Any:
    """``text`` parsed as the value of ``key=text``, exactly as ``rlp train`` would parse it."""
    value: Any = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={text}"]), resolve=True)
    for part in key.split("."):
        value = value[part]
    return value


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """``key=[v1,v2,...]`` -> ``(key, ["key=v1", "key=v2", ...])``: one override per value.

    :raises SweepError: not ``key=[...]``, an empty list, or a value that does not parse.
    """
    key, sep, text = spec.partition("=")
    key = key.strip()
    form = "key=[v1,v2,...], e.g. interventions=[[],[reset],[l2]] or agent.learning_rate=[1e-3,1e-4]"
    if not sep or not key:
        raise SweepError(f"--grid '{spec}': expected {form}")
    check_not_sweep_key(key, f"--grid '{spec}'")
    try:
        values = _parse_value(key, text.strip())
    except (OmegaConfBaseException, yaml.YAMLError, KeyError, TypeError) as exc:
        raise SweepError(
            f"--grid '{spec}': does not parse ({' '.join(str(exc).splitlines()[0].split())}); expected {form}"
        ) from None
    if not isinstance(values, list) or not values:
        raise SweepError(f"--grid '{spec}': the values must be a non-empty list in brackets; expected {form}")
    overrides = []
    for value in values:
        override = f"{key}={render_value(value)}"
        try:
            same = _parse_value(key, render_value(value)) == value  # the trial must see exactly this value
        except (OmegaConfBaseException, yaml.YAMLError):
            same = False
        if not same:
            raise SweepError(f"--grid '{spec}': value {value!r} does not survive as an override ({override})")
        overrides.append(override)
    return key, overrides


def value_label(value: Any) -> str:
    """A short name for a grid value: ``[]`` -> ``none``, ``[l2,reset]`` -> ``l2-reset``, ``0.001``."""
    if isinstance(value, list):
        return "-".join(value_label(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return "-".join(f"{k}-{value_label(v)}" for k, v in value.items()) or "empty"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def sanitize_label(text: str) -> str:
    """A folder name that the run's ``name`` accepts: letters, digits, ``_ . -``, not starting with ``. -``."""
    label = _LABEL_BAD.sub("-", text).strip("-").lstrip(".-")
    return label or "x"


def expand_grid(grids: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The cartesian product of ``--grid`` options: ``[(label, overrides), ...]`` in order.

    With one grid key the label is the value's (``none``, ``reset``); with several it is
    ``<last key part>-<value>`` joined by ``_`` (``learning_rate-0.001_width-64``). No grid: one empty point.
    """
    axes: list[list[tuple[str, str]]] = []
    keys: list[str] = []
    for spec in grids:
        key, overrides = parse_grid(spec)
        if key in keys:
            raise SweepError(f"--grid: key '{key}' is given twice; put all its values in one list")
        keys.append(key)
        values = [_parse_value(key, o.split("=", 1)[1]) for o in overrides]
        short = key.rsplit(".", 1)[-1]
        axes.append(
            [(value_label(v) if len(grids) == 1 else f"{short}-{value_label(v)}", o) for v, o in zip(values, overrides)]
        )
    points = []
    for combo in itertools.product(*axes):
        label = sanitize_label("_".join(part for part, _ in combo)) if combo else ""
        points.append((label, tuple(o for _, o in combo)))
    return points


def load_arms(path: Path, names: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The named arms of an arms file (``arms: {name: [override, ...]}``, as ``configs/arms.yaml``).

    :raises SweepError: a missing or malformed file, or an arm it does not define.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SweepError(f"--arms-file: cannot read {path} ({exc.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise SweepError(f"--arms-file: {path} is not valid YAML") from None
    arms = data.get("arms") if isinstance(data, dict) else None
    if not isinstance(arms, dict) or not all(
        isinstance(v, list) and all(isinstance(o, str) for o in v) for v in arms.values()
    ):
        raise SweepError(f"--arms-file: {path} must hold 'arms:' mapping each name to a list of key=value overrides")
    out = []
    for name in names:
        if name not in arms:
            raise SweepError(f"--arms: '{name}' is not an arm of {path}; valid: {', '.join(arms)}, fresh")
        for override in arms[name]:
            if "=" not in override:
                raise SweepError(f"--arms-file: arm '{name}' in {path}: '{override}' is not key=value")
            check_not_sweep_key(override_key(override), f"arm '{name}' in {path}")
        out.append((sanitize_label(name), tuple(arms[name])))
    return out
